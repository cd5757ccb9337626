"""Deterministic synthetic fundus photographs and OCT B-scans with ground truth.

The phantoms let every command and test run without real data. They are realistic
enough for a small CNN/transformer to learn the tasks (vessel/disc/cup/lesion
segmentation, DR grading, macular-oedema detection, OCT layer segmentation,
oedema/drusen classification) and fast: vectorised numpy, about 3 ms for a 64 px
fundus image (40 ms at 512 px) and under 1 ms for a 64 px B-scan on one CPU core.

What each generator models, and what it does not, is described in
:mod:`fedbone_med.data.phantom_fundus` and :mod:`fedbone_med.data.phantom_oct`;
:mod:`fedbone_med.data.phantom_io` writes phantoms as PNG, DICOM and NIfTI files.
Everything is a pure function of the integer ``seed`` (``np.random.default_rng``;
the global RNG is never used).
"""

from __future__ import annotations

from fedbone_med.data.phantom_fundus import (
    LESION_CLASSES,
    MAX_SIZE,
    MIN_SIZE,
    N_GRADES,
    SEVERE_HAEMORRHAGES,
    FundusPhantom,
    grade_from_counts,
    make_fundus,
    make_fundus_batch,
)
from fedbone_med.data.phantom_oct import (
    FLUID_CLASS,
    LAYER_CLASSES,
    OCT_LABELS,
    OCTPhantom,
    make_oct,
    make_oct_batch,
    make_oct_volume,
)

__all__ = [
    "FLUID_CLASS",
    "LAYER_CLASSES",
    "LESION_CLASSES",
    "MAX_SIZE",
    "MIN_SIZE",
    "N_GRADES",
    "OCT_LABELS",
    "SEVERE_HAEMORRHAGES",
    "FundusPhantom",
    "OCTPhantom",
    "grade_from_counts",
    "make_fundus",
    "make_fundus_batch",
    "make_oct",
    "make_oct_batch",
    "make_oct_volume",
]
