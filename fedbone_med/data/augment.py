"""Train-time augmentation of a batch, reproducible from (site seed, round, step).

The site's ``data.augment`` chain (allow-listed MONAI / albumentations transforms, see
:mod:`.transforms`) runs on each training sample when its batch is drawn. Its random state
is re-seeded for every sample from the site's seed, the round, the step and the position in
the batch, so a run resumed from a checkpoint draws exactly the augmentations an
uninterrupted run would. Geometric transforms must list the label key too so that masks
move with their images.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose
from torch import Tensor

from ..config import TaskConfig


def augment_batch(chain: Compose, task: TaskConfig, x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Augment each sample of (x (B, C, H, W), y) with ``chain``; returns new tensors."""
    images, labels = [], []
    for i in range(x.shape[0]):
        sample: dict[str, np.ndarray] = {"image": x[i].numpy()}
        if task.type == "segmentation":
            label = y[i].numpy()
            sample["label"] = (label[None] if task.mode == "multiclass" else label).astype(np.uint8)  # (C, H, W)
        chain.set_random_state(seed=(seed + i) % 2**32)
        out = chain(sample)
        images.append(torch.as_tensor(np.asarray(out["image"]), dtype=torch.float32))
        if task.type == "segmentation":
            lab = torch.as_tensor(np.asarray(out["label"]))
            labels.append(lab[0].to(torch.int64) if task.mode == "multiclass" else lab.to(torch.float32))
    return torch.stack(images), (torch.stack(labels) if labels else y)
