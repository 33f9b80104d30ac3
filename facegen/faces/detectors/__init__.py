"""Face detector kinds, one module each (``faces.detector.kind``; the table is
:data:`facegen.config.faces.DETECTORS`; ``none``, no detector, is not a module).

A kind's module has ``build(settings) -> FaceDetector`` (:class:`facegen.faces.detect.FaceDetector`)
and ``DEFAULT_MIN_SCORE`` (its scores mean different things), and may have ``check(settings)`` (the
kind's settings rules, run when a config loads). Top-level imports stay light.
"""
