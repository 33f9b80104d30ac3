"""Network definitions and checkpoint readers shared by several stages, one file per model family.

Faces (embedders, detectors), generators and training all build their networks from here, so no
stage reaches into another stage's package for a model; nothing here knows about Ray.
"""
