"""Face-recognition training: margin heads, training-state checkpoints, curriculum data, Ray Train loop.

Backbones and their checkpoint formats live in :mod:`facegen.models`. ``facegen.train.loop``
(Ray Train) is imported on demand so that importing this package never imports Ray.
"""

from facegen.train.checkpoint import load_training_state, save_training_state
from facegen.train.heads import ArcFace, CosFace, MarginClassifier, build_head

__all__ = ["ArcFace", "CosFace", "MarginClassifier", "build_head", "load_training_state", "save_training_state"]
