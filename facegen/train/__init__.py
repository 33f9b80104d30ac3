"""Face-recognition training: IResNet backbones, margin heads, checkpoints, curriculum data, Ray Train loop.

``facegen.train.loop`` (Ray Train) is imported on demand so that loading a backbone never imports Ray.
"""

from facegen.train.checkpoint import load_backbone, load_training_state, save_backbone, save_training_state
from facegen.train.heads import ArcFace, CosFace, MarginClassifier, build_head
from facegen.train.iresnet import IResNet, build_backbone, iresnet18, iresnet34, iresnet50, iresnet100

__all__ = [
    "ArcFace",
    "CosFace",
    "IResNet",
    "MarginClassifier",
    "build_backbone",
    "build_head",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "load_backbone",
    "load_training_state",
    "save_backbone",
    "save_training_state",
]
