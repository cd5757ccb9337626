"""benchmarks/pipeline.py measures the site's own pipeline: its MONAI path gives the same tensors
as the site's loader, and its smoke run writes the figures the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset

from fedbone_med.config import load_site
from fedbone_med.data.manifest import default_data_root, list_samples
from fedbone_med.data.manifest_data import site_chain
from fedbone_med.data.pipeline import load_manifest
from fedbone_med.data.sources import load_site_data

pytestmark = pytest.mark.realdata
ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "sites" / "chase-db1-vessels.toml"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _chase_present():
    if not (default_data_root() / "chase_db1").is_dir():
        pytest.fail(f"CHASE_DB1 not found under {default_data_root()}; set FEDBONE_DATA_ROOT")


def test_cached_monai_path_matches_site_loader():
    bench = _bench()
    cfg = load_site(SITE, {"data": {"image_size": 64}})
    m = load_manifest(cfg.data.manifest)
    train = [s for s in list_samples(m) if s.split == "train"]
    items = [{"index": i, "path": str(s.image)} for i, s in enumerate(train)]
    ds = CacheDataset(items, transform=bench._compose(m, train, site_chain(cfg, m), []), num_workers=0,
                      progress=False)
    data = load_site_data(cfg)
    assert len(ds) == len(data.train)
    for i in range(len(ds)):
        d = ds[i]
        assert torch.equal(d["image"], data.train.images[i])
        assert torch.equal(d["label"], data.train.targets[i])


def test_smoke_run_writes_loader_figures(tmp_path):
    out = tmp_path / "pipeline.json"
    result = _bench().main(["--out", str(out), "--quick", "--no-train", "--size", "64", "--loader-threads", "1"],
                           print_fn=lambda _: None)
    saved = json.loads(out.read_text())
    assert saved["loader_vs_train_consumption_ratio"] is None and result["quick"]
    modes = saved["loader"]["threads"]["1"]
    assert {"plain_load", "plain_augment_per_epoch", "monai_dataset_per_epoch", "cache_dataset_per_epoch",
            "persistent_dataset_warm_per_epoch"} <= set(modes)
    assert all(v["images_per_s"] > 0 for v in modes.values())
    assert saved["load_average"]["before"] is not None and saved["machine"]["cpu_count"]
