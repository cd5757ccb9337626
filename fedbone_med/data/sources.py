"""Where a site's (image, target) pairs come from, as tensors ready for its head.

``source = "phantom"`` draws the project's synthetic fundus and OCT images
(:mod:`fedbone_med.data.phantoms`) for one of the tasks in :data:`PHANTOM_TASKS`.
Real files (raster, DICOM, NIfTI, CSV, npz) come through declarative MONAI pipelines.

Images are float32 (C, H, W) in [0, 1]; targets follow :mod:`fedbone_med.models.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import SiteConfig, TaskConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class PhantomTask:
    modality: str
    task: TaskConfig
    sample: Callable[[int, int], tuple[np.ndarray, Any]]
    description: str


def _fundus(seed: int, size: int):
    from .phantoms import make_fundus

    return make_fundus(seed, size)


def _oct(seed: int, size: int):
    from .phantoms import make_oct

    return make_oct(seed, size)


def _fundus_sample(target: Callable[[Any], Any]) -> Callable[[int, int], tuple[np.ndarray, Any]]:
    def sample(seed: int, size: int) -> tuple[np.ndarray, Any]:
        p = _fundus(seed, size)
        return np.ascontiguousarray(p.image.transpose(2, 0, 1)), target(p)  # (3, H, W)

    return sample


def _oct_sample(target: Callable[[Any], Any]) -> Callable[[int, int], tuple[np.ndarray, Any]]:
    def sample(seed: int, size: int) -> tuple[np.ndarray, Any]:
        p = _oct(seed, size)
        return p.image[None], target(p)  # (1, H, W)

    return sample


PHANTOM_TASKS: dict[str, PhantomTask] = {
    "dr_grade": PhantomTask(
        "fundus",
        TaskConfig(type="classification", num_classes=5, ordinal=True),
        _fundus_sample(lambda p: p.grade),
        "diabetic retinopathy grade 0-4 from fundus photographs",
    ),
    "macular_edema": PhantomTask(
        "fundus",
        TaskConfig(type="classification", num_classes=2),
        _fundus_sample(lambda p: p.macular_edema),
        "diabetic macular oedema (exudates near the fovea) from fundus photographs",
    ),
    "vessels": PhantomTask(
        "fundus",
        TaskConfig(type="segmentation", num_classes=1, mode="binary"),
        _fundus_sample(lambda p: p.vessels[None]),
        "retinal vessel segmentation",
    ),
    "disc": PhantomTask(
        "fundus",
        TaskConfig(type="segmentation", num_classes=1, mode="binary"),
        _fundus_sample(lambda p: p.disc[None]),
        "optic disc segmentation",
    ),
    "lesions": PhantomTask(
        "fundus",
        TaskConfig(type="segmentation", num_classes=5, mode="multiclass"),
        _fundus_sample(lambda p: p.lesions),
        "five-class DR lesion segmentation (background, MA, HE, EX, SE)",
    ),
    "oct_layers": PhantomTask(
        "oct",
        TaskConfig(type="segmentation", num_classes=9, mode="multiclass"),
        _oct_sample(lambda p: p.layers),
        "OCT retinal layer segmentation (8 layers + intraretinal fluid)",
    ),
    "oct_edema": PhantomTask(
        "oct",
        TaskConfig(type="classification", num_classes=2),
        _oct_sample(lambda p: p.edema),
        "macular oedema (intraretinal fluid) from OCT B-scans",
    ),
    "oct_disease": PhantomTask(
        "oct",
        TaskConfig(type="classification", num_classes=3),
        _oct_sample(lambda p: p.label),
        "OCT normal / macular oedema / drusen",
    ),
}


@dataclass
class ArraySplit:
    """One split held in memory: images (N, C, H, W) float32 and targets."""

    images: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


@dataclass
class SiteData:
    train: ArraySplit
    val: ArraySplit
    split: dict | None = None  # how the split was made (counts, membership digest), for the run output
    augment: Any = None  # a MONAI Compose applied to training samples at batch time (see augment.py)


def _target_tensor(task: TaskConfig, targets: list) -> Tensor:
    if task.type == "classification":
        return torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    arr = np.stack(targets)
    if task.mode == "multiclass":
        return torch.from_numpy(arr.astype(np.int64))  # (N, H, W)
    return torch.from_numpy(arr.astype(np.float32))  # (N, C, H, W)


def check_task_fits(cfg: SiteConfig, spec: PhantomTask) -> None:
    """The site's declared modality and task must match what its data provides."""
    problems = []
    if cfg.modality != spec.modality:
        problems.append(f"modality: data task {cfg.data.task!r} is {spec.modality}, not {cfg.modality}")
    want, have = spec.task, cfg.task
    if (want.type, want.num_classes, want.mode if want.type == "segmentation" else None) != (
        have.type,
        have.num_classes,
        have.mode if have.type == "segmentation" else None,
    ):
        problems.append(
            f"task: data task {cfg.data.task!r} provides {want.type} with num_classes = {want.num_classes}"
            + (f", mode = {want.mode!r}" if want.type == "segmentation" else "")
            + f"; the [task] table says {have.type} with num_classes = {have.num_classes}"
            + (f", mode = {have.mode!r}" if have.type == "segmentation" else "")
        )
    if problems:
        raise ConfigError(f"site '{cfg.name}': " + "; ".join(problems))


def _generate(spec: PhantomTask, seeds: range, size: int) -> ArraySplit:
    images, targets = [], []
    for s in seeds:
        image, target = spec.sample(s, size)
        images.append(image)
        targets.append(target)
    return ArraySplit(torch.from_numpy(np.stack(images).astype(np.float32)), _target_tensor(spec.task, targets))


def load_site_data(cfg: SiteConfig, data_root: str | Path | None = None) -> SiteData:
    """Materialise a site's train and validation splits (and its augmentation, if any).

    ``data_root`` (a command's ``--data-root``) holds the dataset folders that manifests name
    by relative root; default ``$FEDBONE_DATA_ROOT``, else ``../shared/data``.
    """
    data = _load_splits(cfg, data_root)
    if cfg.data.augment:
        from .pipeline import load_augment
        from .transforms import build_transforms

        data.augment = build_transforms(load_augment(cfg.data.augment))
    return data


def _load_splits(cfg: SiteConfig, data_root: str | Path | None = None) -> SiteData:
    d = cfg.data
    if d.source == "manifest":
        from .manifest_data import load_manifest_site_data

        return load_manifest_site_data(cfg, data_root)
    spec = PHANTOM_TASKS.get(d.task)
    if spec is None:
        raise ConfigError(
            f"site '{cfg.name}': unknown phantom task {d.task!r}; known: {', '.join(sorted(PHANTOM_TASKS))}"
        )
    check_task_fits(cfg, spec)
    # Disjoint seed ranges per split; the site's data seed moves the whole draw.
    base = 1_000_003 * (d.seed + 1)
    train = _generate(spec, range(base, base + d.n_train), d.image_size)
    val = _generate(spec, range(base + 500_000, base + 500_000 + d.n_val), d.image_size)
    return SiteData(train, val)
