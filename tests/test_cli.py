"""The command-line tools: installed, answer --help, run an experiment, and fail clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedbone_med.cli import fedbone, site

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", ["fedbone", "fedbone-site", "fedbone-server", "fedbone-audit"])
def test_console_scripts_are_installed_and_print_help(tool):
    exe = shutil.which(tool) or str(Path(sys.executable).parent / tool)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and tool in out.stdout


def test_serve_without_a_provisioning_directory_names_what_is_missing(tmp_path, capsys):
    from fedbone_med.cli import server

    cfg = tmp_path / "server.toml"
    cfg.write_text('name = "x"\nsites = ["a"]\n')
    code = server.main(["serve", "--config", str(cfg), "--kit", str(tmp_path / "nokit"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 9 and "registry.json" in err and "fedbone-server provision" in err
    cfg.write_text('name = "x"\nsites = ["a"]\nbogus = 1\n')
    code = server.main(["serve", "--config", str(cfg), "--kit", str(tmp_path / "nokit"), "--out", str(tmp_path / "o")])
    assert code == 2 and "bogus" in capsys.readouterr().err


# A one-round experiment on a tiny backbone; the caller appends its [[sites]].
TINY_EXPERIMENT = """
name = "{name}"
rounds = 1
steps_per_round = {steps}
[server.backbone]
name = "swin-tiny"
embed_dim = 16
depths = [1, 1, 1, 1]
num_heads = [1, 2, 2, 4]
"""


def test_fedbone_run_writes_results_and_prints_the_table(tmp_path, capsys):
    exp = tmp_path / "exp.toml"
    exp.write_text(
        TINY_EXPERIMENT.format(name="cli", steps=2) + f"""
[[sites]]
config = "{ROOT / 'sites' / 'phantom-vessels.toml'}"
[sites.data]
image_size = 32
n_train = 8
n_val = 4
[[sites]]
config = "{ROOT / 'sites' / 'phantom-oct-edema.toml'}"
[sites.data]
image_size = 32
n_train = 8
n_val = 8
"""
    )
    assert fedbone.main(["run", str(exp), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fundus-vessels" in out and "oct-edema" in out and "dice" in out and "auc" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["final"]) == {"fundus-vessels", "oct-edema"}
    assert (tmp_path / "out" / "checkpoints" / "server.pt").is_file()


def test_unknown_config_key_exits_2_with_an_actionable_message(tmp_path, capsys):
    bad = tmp_path / "site.toml"
    bad.write_text((ROOT / "sites" / "phantom-vessels.toml").read_text() + "\n[transport]\nretries = 3\n")
    assert site.main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and "unknown key 'transport'" in err


def test_missing_experiment_file_exits_2(tmp_path, capsys):
    assert fedbone.main(["run", str(tmp_path / "nope.toml"), "--out", str(tmp_path)]) == 2
    assert "configuration file not found" in capsys.readouterr().err


def test_insecure_dev_mode_is_refused_off_loopback_at_both_ends(tmp_path, capsys):
    from fedbone_med.cli import server
    from fedbone_med.crypto.provision import provision

    provision(tmp_path / "p", ["fundus-vessels"])
    cfg = tmp_path / "server.toml"
    cfg.write_text('name = "x"\nsites = ["fundus-vessels"]\n')
    code = server.main(["serve", "--config", str(cfg), "--kit", str(tmp_path / "p"), "--out", str(tmp_path / "o"),
                        "--address", "10.1.2.3:0", "--insecure-dev"])
    assert code == 2 and "only on loopback" in capsys.readouterr().err
    code = site.main(["train", "--config", str(ROOT / "sites" / "phantom-vessels.toml"),
                      "--kit", str(tmp_path / "p" / "sites" / "fundus-vessels"), "--out", str(tmp_path / "s"),
                      "--server", "10.1.2.3:50051", "--insecure-dev", "--quiet"])
    assert code == 2 and "loopback only" in capsys.readouterr().err


def test_fedbone_run_data_root_points_every_site_at_another_copy(tmp_path, capsys, monkeypatch):
    from fedbone_med.data.manifest import DATA_ROOT_ENV

    shared = ROOT.parent / "shared" / "data" / "retinamnist" / "retinamnist.npz"
    if not shared.is_file():
        pytest.skip(f"RetinaMNIST is not at {shared} (see ../shared/data/README.md)")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "not-used"))  # --data-root wins over the environment
    exp = tmp_path / "exp.toml"
    exp.write_text(TINY_EXPERIMENT.format(name="data-root", steps=1) + f"""
[[sites]]
config = "{ROOT / 'sites' / 'retinamnist-dr.toml'}"
[sites.data]
image_size = 32
""")
    # A hospital's own copy of the data set, somewhere else
    copy = tmp_path / "hospital-copy"
    (copy / "retinamnist").mkdir(parents=True)
    shutil.copy(shared, copy / "retinamnist" / "retinamnist.npz")
    assert fedbone.main(["run", str(exp), "--out", str(tmp_path / "a"), "--quiet", "--data-root", str(copy)]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["sites"]["retinamnist-dr"]["n_train"] == 1080
    # An empty folder: the site's data root error names the folder given
    (tmp_path / "empty").mkdir()
    assert fedbone.main(["run", str(exp), "--out", str(tmp_path / "b"), "--quiet",
                         "--data-root", str(tmp_path / "empty")]) != 0
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert fedbone.main(["run", str(exp), "--out", str(tmp_path / "c"), "--data-root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "not a directory" in err


def test_a_write_the_file_system_refuses_is_one_line_naming_the_file_and_errno(tmp_path, capsys):
    exp = tmp_path / "exp.toml"
    exp.write_text(TINY_EXPERIMENT.format(name="cli", steps=1) + f"""
[[sites]]
config = "{ROOT / 'sites' / 'phantom-oct-edema.toml'}"
[sites.data]
image_size = 32
n_train = 8
n_val = 8
""")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    assert fedbone.main(["run", str(exp), "--out", str(blocker / "out"), "--quiet"]) == 12
    err = capsys.readouterr().err
    assert "error: " in err and str(blocker) in err and "(ENOTDIR)" in err and "Traceback" not in err
