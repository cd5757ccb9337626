"""Models: site embeddings, server backbones, task adaptation, heads, and the split."""

from .adaptation import ADAPTATIONS
from .backbones import BACKBONES, Backbone, SwinBackbone, build_backbone, refuse_batchnorm
from .embeddings import EMBEDDINGS
from .heads import HEADS
from .losses import TaskLoss, class_probabilities, decode
from .split import CutSpec, FedBoneModel, SiteModel, build_site_model

__all__ = [
    "ADAPTATIONS",
    "BACKBONES",
    "Backbone",
    "EMBEDDINGS",
    "HEADS",
    "CutSpec",
    "FedBoneModel",
    "SiteModel",
    "SwinBackbone",
    "TaskLoss",
    "build_backbone",
    "build_site_model",
    "class_probabilities",
    "decode",
    "refuse_batchnorm",
]
