"""Configuration is data: unknown keys, wrong types and bad values are reported, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbone_med.config import SiteConfig, experiment_from_mapping, load_experiment, load_site
from fedbone_med.configtools import config_hash, from_mapping
from fedbone_med.errors import ConfigError, ModelError, RegistryError
from fedbone_med.models import CutSpec, build_backbone, build_site_model

ROOT = Path(__file__).resolve().parents[1]

SITE = {
    "name": "s1",
    "modality": "fundus",
    "data": {"task": "vessels", "image_size": 32},
    "task": {"type": "segmentation", "mode": "binary", "num_classes": 1},
    "model": {"head": "segmentation"},
}


def test_every_shipped_site_and_experiment_loads():
    for path in sorted((ROOT / "sites").glob("*.toml")):
        load_site(path)
    exp = load_experiment(ROOT / "pipelines" / "demo.toml")
    assert len(exp.sites) >= 3
    assert len({s.data.task for s in exp.sites}) == len(exp.sites), "demo sites must have different tasks"
    from fedbone_med.config import ServeConfig, load_serve_config

    server = load_serve_config(ROOT / "pipelines" / "server.toml")
    assert server.network.min_sites == 2 and server.sites == ()
    # an experiment file serves too: only its site names are kept
    assert load_serve_config(ROOT / "pipelines" / "demo.toml") == ServeConfig.of(exp)


def test_the_reproduction_variants_load_and_fit_their_backbones():
    variants = sorted((ROOT / "pipelines" / "ophthalmic" / "variants").glob("*.toml"))
    assert {p.stem for p in variants} >= {"cut-deeper", "cut-patch", "project-every4"}
    for path in variants:
        exp = load_experiment(path)
        assert len(exp.sites) == 5, path.name
        cut = CutSpec.of(build_backbone(exp.server.backbone))
        for site in exp.sites:
            build_site_model(site, cut)  # raises ModelError if the site does not fit the cut


def test_network_settings_are_checked():
    from fedbone_med.config import NetworkConfig

    with pytest.raises(ConfigError) as info:
        from_mapping(NetworkConfig, {"address": "nohost", "min_sites": 0, "step_deadline_s": -1.0}, where="x")
    msg = str(info.value)
    assert "address" in msg and "min_sites" in msg and "step_deadline_s" in msg
    with pytest.raises(ConfigError, match="'float8' is not one of"):
        from_mapping(NetworkConfig, {"wire_dtype": "float8"}, where="x")


def test_project_every_is_checked():
    from fedbone_med.config import ServerConfig

    cfg = from_mapping(ServerConfig, {"aggregation": {"method": "projection", "project_every": 4}}, where="x")
    assert cfg.aggregation.project_every == 4
    with pytest.raises(ConfigError, match="project_every: must be > 0"):
        from_mapping(ServerConfig, {"aggregation": {"project_every": 0}}, where="x")
    with pytest.raises(ConfigError, match="project_every: only applies to a projecting method"):
        from_mapping(ServerConfig, {"aggregation": {"method": "mean", "project_every": 2}}, where="x")
    with pytest.raises(ConfigError, match="server_lr: only applies to cadence"):
        from_mapping(ServerConfig, {"aggregation": {"server_lr": 0.5}}, where="x")
    cfg = from_mapping(ServerConfig, {"aggregation": {"cadence": "round", "server_lr": 0.5}}, where="x")
    assert cfg.aggregation.cadence == "round" and cfg.aggregation.server_lr == 0.5
    with pytest.raises(ConfigError, match="cadence"):
        from_mapping(ServerConfig, {"aggregation": {"cadence": "epoch"}}, where="x")


def test_a_checkpoint_from_before_an_option_existed_resumes_if_the_option_is_at_its_default():
    import json
    from dataclasses import replace

    from fedbone_med.configtools import field_default, resume_changes, to_plain
    from fedbone_med.errors import CheckpointError

    cfg = load_experiment(ROOT / "pipelines" / "demo.toml")
    assert field_default(type(cfg), "server.aggregation.project_every") == 1
    old = to_plain(cfg)
    del old["server"]["aggregation"]["project_every"]  # written by a version without the option
    before = json.dumps(old, sort_keys=True)
    changed = resume_changes(before, cfg, completed_rounds=1, where="ckpt")
    assert changed == ["server.aggregation.project_every"]  # reported, not refused
    every3 = replace(cfg, server=replace(cfg.server, aggregation=replace(cfg.server.aggregation, project_every=3)))
    with pytest.raises(CheckpointError, match="server.aggregation.project_every changed"):
        resume_changes(before, every3, completed_rounds=1, where="ckpt")


def test_a_site_option_added_later_resumes_at_its_default_and_site_changes_are_named():
    import json
    from dataclasses import replace

    from fedbone_med.configtools import field_default, resume_changes, to_plain
    from fedbone_med.errors import CheckpointError

    cfg = load_experiment(ROOT / "pipelines" / "demo.toml")
    assert cfg.sites[1].train.eval_batch_size == field_default(type(cfg), "sites[1].train.eval_batch_size") == 64
    old = to_plain(cfg)
    del old["sites"][1]["train"]["eval_batch_size"]  # a site option this checkpoint's version did not have
    before = json.dumps(old, sort_keys=True)
    assert resume_changes(before, cfg, completed_rounds=1, where="ckpt") == ["sites[1].train.eval_batch_size"]
    # a site's setting that did change is refused, by its own name (not "sites")
    sites = list(cfg.sites)
    sites[1] = replace(sites[1], train=replace(sites[1].train, eval_batch_size=32))
    with pytest.raises(CheckpointError, match=r"ckpt was written with another configuration: "
                                              r"sites\[1\]\.train\.eval_batch_size changed;"):
        resume_changes(before, replace(cfg, sites=tuple(sites)), completed_rounds=1, where="ckpt")
    sites[1] = replace(sites[1], train=replace(sites[1].train, eval_batch_size=64, lr=0.5))
    with pytest.raises(CheckpointError, match=r"sites\[1\]\.train\.lr changed"):
        resume_changes(json.dumps(to_plain(cfg), sort_keys=True), replace(cfg, sites=tuple(sites)),
                       completed_rounds=1, where="ckpt")
    # a site added or removed is refused too
    with pytest.raises(CheckpointError, match=r"sites\[3\]\.name"):
        resume_changes(json.dumps(to_plain(cfg), sort_keys=True), replace(cfg, sites=cfg.sites[:3]),
                       completed_rounds=1, where="ckpt")


def test_unknown_key_is_named_with_a_suggestion_and_the_allowed_keys():
    bad = {**SITE, "data": {**SITE["data"], "imge_size": 64}}
    with pytest.raises(ConfigError) as info:
        from_mapping(SiteConfig, bad, where="site.toml")
    msg = str(info.value)
    assert "unknown key 'imge_size'" in msg and "did you mean 'image_size'" in msg and "allowed keys:" in msg


@pytest.mark.parametrize(("typo", "meant"), [("lr_rate", "lr"), ("batchsize", "batch_size"), ("optimiser", "optimizer"),
                                             ("eval_batch", "eval_batch_size")])
def test_a_misspelt_key_suggests_the_key_it_starts_like(typo, meant):
    bad = {**SITE, "train": {typo: 1}}
    with pytest.raises(ConfigError, match=f"unknown key '{typo}' \\(did you mean '{meant}'\\?\\)"):
        from_mapping(SiteConfig, bad, where="site.toml")


def test_an_experiment_key_typo_suggests_the_right_key(tmp_path):
    exp = tmp_path / "exp.toml"
    site = ROOT / "sites" / "phantom-dr.toml"
    exp.write_text(f'name = "x"\nseed = 0\nrounds = 1\nstepz = 3\n[[sites]]\nconfig = "{site}"\n')
    with pytest.raises(ConfigError, match="unknown key 'stepz' \\(did you mean 'steps_per_round'\\?\\)"):
        load_experiment(exp)


def test_all_problems_are_reported_together():
    bad = {**SITE, "colour": "red", "train": {"batch_size": "sixteen", "lr": -1.0}, "task": {"type": "regression"}}
    with pytest.raises(ConfigError) as info:
        from_mapping(SiteConfig, bad, where="site.toml")
    msg = str(info.value)
    for part in ("unknown key 'colour'", "batch_size: expected an integer", "'regression' is not one of",
                 "missing required key 'num_classes'"):
        assert part in msg, part


def test_value_ranges_are_checked():
    bad = {**SITE, "train": {"lr": 0.0}, "model": {"stride": 3, "adapt_dim": 30, "adapt_heads": 4}}
    with pytest.raises(ConfigError) as info:
        from_mapping(SiteConfig, bad, where="s")
    msg = str(info.value)
    assert "lr: must be > 0" in msg and "stride: must be 1, 2, 4 or 8" in msg and "adapt_heads: must divide" in msg


def test_booleans_are_not_numbers_and_ints_are_accepted_as_floats():
    cfg = from_mapping(SiteConfig, {**SITE, "train": {"lr": 1}}, where="s")
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got bool"):
        from_mapping(SiteConfig, {**SITE, "train": {"batch_size": True}}, where="s")


def test_head_that_does_not_fit_the_task_is_a_model_error():
    cfg = from_mapping(SiteConfig, {**SITE, "model": {"head": "classification"}}, where="s")
    cut = CutSpec(16, (32, 64), (2, 4))
    with pytest.raises(ModelError, match="head 'classification' does not fit a segmentation task"):
        build_site_model(cfg, cut)


def test_unknown_registry_names_list_the_known_ones():
    with pytest.raises(RegistryError, match="unknown backbone 'resnet9000'; known: swin-b, swin-s, swin-t, swin-tiny"):
        build_backbone("resnet9000")
    cfg = from_mapping(SiteConfig, {**SITE, "model": {"head": "segmentation", "embedding": "vit"}}, where="s")
    with pytest.raises(RegistryError, match="unknown embedding 'vit'; known: conv-stem, conv-stem-swin, patch"):
        build_site_model(cfg, CutSpec(16, (32, 64), (2, 4)))


def test_data_task_that_contradicts_the_task_table_is_refused(tmp_path):
    from fedbone_med.data.sources import load_site_data

    cfg = from_mapping(SiteConfig, {**SITE, "task": {"type": "segmentation", "mode": "multiclass", "num_classes": 3}},
                       where="s")
    with pytest.raises(ConfigError, match="provides segmentation with num_classes = 1"):
        load_site_data(cfg)


def test_experiment_site_references_overrides_and_duplicate_names(tmp_path):
    (tmp_path / "a.toml").write_text((ROOT / "sites" / "phantom-vessels.toml").read_text())
    exp = experiment_from_mapping(
        {
            "name": "x",
            "sites": [{"config": "a.toml", "train": {"batch_size": 4}}],
            "site_overrides": {"data": {"image_size": 32}},
        },
        base_dir=tmp_path,
    )
    assert exp.sites[0].train.batch_size == 4 and exp.sites[0].data.image_size == 32
    with pytest.raises(ConfigError, match="site names must be unique"):
        experiment_from_mapping({"name": "x", "sites": [{"config": "a.toml"}, {"config": "a.toml"}]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="configuration file not found"):
        experiment_from_mapping({"name": "x", "sites": [{"config": "missing.toml"}]}, base_dir=tmp_path)


def test_config_hash_is_stable_and_sensitive():
    a = from_mapping(SiteConfig, SITE, where="s")
    b = from_mapping(SiteConfig, {**SITE, "train": {"lr": 2e-3}}, where="s")
    assert config_hash(a) == config_hash(from_mapping(SiteConfig, dict(SITE), where="s"))
    assert config_hash(a) != config_hash(b)


def test_server_backbone_has_no_batchnorm_and_presets_scale():
    from torch import nn

    from fedbone_med.models import refuse_batchnorm

    for name in ("swin-tiny", "swin-t"):
        bb = build_backbone(name)
        refuse_batchnorm(bb)  # raises if any BatchNorm is present
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bb.modules())
    swin_t = sum(p.numel() for p in build_backbone("swin-t").parameters())
    # Swin-T body (~27.5M) plus the patch merging MONAI's Swin applies after its last stage
    # (4*768 -> 1536 channels: 4.72M), without the patch embedding and classifier.
    assert 32.0e6 < swin_t < 32.5e6, swin_t
    with pytest.raises(ConfigError, match="BatchNorm"):
        refuse_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
