"""Shared fixtures: tiny backbones and sites so that tests run in seconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from fedbone_med.config import (
    AggregationConfig,
    BackboneConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ServerConfig,
    SiteConfig,
    TaskConfig,
    TrainConfig,
)

# CI runs the property tests with a fixed derivation of examples, so that a run is repeatable;
# locally they draw fresh examples every time.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


TINY_BACKBONE = BackboneConfig(
    name="swin-tiny", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4
)


def tiny_server(method: str = "projection", lr: float = 1e-3) -> ServerConfig:
    return ServerConfig(
        backbone=TINY_BACKBONE,
        optimizer=OptimizerConfig(lr=lr),
        aggregation=AggregationConfig(method=method),
    )


def site_cfg(name: str, task: str, modality: str, task_cfg: TaskConfig, *, size: int = 32, head: str | None = None,
             n_train: int = 32, n_val: int = 16, batch: int = 8, embed_dim: int | None = None) -> SiteConfig:
    return SiteConfig(
        name=name,
        modality=modality,  # type: ignore[arg-type]
        data=DataConfig(task=task, image_size=size, n_train=n_train, n_val=n_val),
        task=task_cfg,
        model=ModelConfig(head=head or task_cfg.type, adapt_dim=16, adapt_heads=2, embed_dim=embed_dim),
        train=TrainConfig(batch_size=batch, eval_batch_size=16),
    )


CLS5 = TaskConfig(type="classification", num_classes=5, ordinal=True)
SEG1 = TaskConfig(type="segmentation", num_classes=1, mode="binary")
SEG9 = TaskConfig(type="segmentation", num_classes=9, mode="multiclass")
CLS2 = TaskConfig(type="classification", num_classes=2)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Same thread count everywhere so that float reductions are reproducible run to run.
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


class SimulatedCrash(Exception):
    """Raised by :func:`resume_after_crash` right after round 0's checkpoint."""


def resume_after_crash(cfg, out):
    """Run ``cfg`` in ``out``, 'crash' right after round 0's checkpoint, then resume it in a new
    Federation (as a restarted process would); returns (resumed federation, its results)."""
    from fedbone_med.experiments.federation import Federation

    def crash(record: dict) -> None:
        if record["round"] == 0:
            raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        Federation(cfg, out).run(progress=False, on_round=crash)
    resumed = Federation(cfg, out)
    return resumed, resumed.run(resume=True, progress=False)


@pytest.fixture
def servers():
    """gRPC servers a test starts (append them): stopped when the test ends, whatever happened."""
    started: list = []
    yield started
    for s in started:
        s.stop(0)
