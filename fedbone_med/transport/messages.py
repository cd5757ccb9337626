"""What crosses between a site and the server, besides the tensors themselves.

Tensors travel beside these headers: z (site -> server, ``forward``), the feature maps F
(server -> site), dF (site -> server, ``backward``) and dz (server -> site). Nothing here
may carry patient data: no images, labels, file names or identifiers of patients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from ..models.split import CutSpec


@dataclass(frozen=True)
class StepHeader:
    """Identifies one forward or backward message. Bound to the ciphertext on the wire."""

    run_id: str
    site: str
    round: int
    step: int
    sequence: int
    mode: Literal["train", "eval"] = "train"


@dataclass(frozen=True)
class JoinRequest:
    site: str
    modality: str
    task_type: str
    num_train: int
    software_version: str


@dataclass(frozen=True)
class Schedule:
    """The federation's training schedule, which a networked site learns from the server at join."""

    rounds: int
    steps_per_round: int
    seed: int  # the federation seed; a site derives its own seeds from it and its name
    embedding_fedavg: bool
    wire_dtype: str = "float32"  # what activations and gradients travel as: float32, float16 or bfloat16


@dataclass(frozen=True)
class JoinReply:
    run_id: str
    cut: CutSpec
    round: int  # the round this site starts in
    step: int  # the training step this site starts at
    config_hash: str
    schedule: Schedule | None = None


@dataclass(frozen=True)
class RoundReport:
    """A site's end-of-round report: aggregate metrics only, and optionally its embedding for FedAvg."""

    site: str
    round: int
    samples: int
    train_loss: float
    metrics: dict[str, float]
    embedding: dict[str, Tensor] | None = None
    embedding_signature: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundSync:
    """The server's end-of-round answer: the averaged embedding for the site's group, if any."""

    round: int
    embedding: dict[str, Tensor] | None
    group: tuple[str, ...]
