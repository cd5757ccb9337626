"""Checkpoints are atomic, load without unpickling code, and fail with a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from fedbone_med.checkpoint import load_checkpoint, save_checkpoint
from fedbone_med.errors import CheckpointError


def test_round_trip_and_hash(tmp_path):
    p = tmp_path / "server.pt"
    digest = save_checkpoint({"kind": "server", "w": torch.arange(4.0)}, p)
    assert len(digest) == 64
    state = load_checkpoint(p, "server")
    assert torch.equal(state["w"], torch.arange(4.0))


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no server checkpoint at .*without --resume"):
        load_checkpoint(tmp_path / "nope.pt", "server")


def test_corrupt_checkpoint_is_refused(tmp_path):
    p = tmp_path / "server.pt"
    save_checkpoint({"kind": "server", "w": torch.ones(10)}, p)
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_checkpoint(p, "server")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pt"
    torch.save({"kind": "server", "x": Evil()}, p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p, "server")
    assert not (tmp_path / "pwned").exists()


def test_wrong_kind_is_refused(tmp_path):
    p = tmp_path / "site.pt"
    save_checkpoint({"kind": "site"}, p)
    with pytest.raises(CheckpointError, match="not a server checkpoint"):
        load_checkpoint(p, "server")


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    p = tmp_path / "server.pt"
    save_checkpoint({"kind": "server", "round": 1}, p)
    before = p.read_bytes()

    def exploding_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"kind": "server", "round": 2}, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["server.pt"], "no temporary file may be left behind"


class _InterruptAfter:
    """A file whose third write raises KeyboardInterrupt (Ctrl-C while a checkpoint is written)."""

    def __init__(self, fh) -> None:
        self.fh, self.writes = fh, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt_and_keeps_the_old_one(tmp_path, monkeypatch):
    p = tmp_path / "site.pt"
    save_checkpoint({"kind": "site", "w": torch.zeros(3)}, p)
    before = p.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, fh: real_save(obj, _InterruptAfter(fh)))
    # torch's zip writer turns the interrupt into a RuntimeError ("unexpected pos") as it unwinds;
    # the CLI must still see an interruption (exit 130), not a crash with a traceback
    with pytest.raises(KeyboardInterrupt) as info:
        save_checkpoint({"kind": "site", "w": torch.ones(100_000)}, p)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert p.read_bytes() == before  # the previous checkpoint is untouched
    assert sorted(os.listdir(tmp_path)) == ["site.pt"]  # no temporary file left behind
    monkeypatch.setattr(torch, "save", lambda obj, fh: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # other errors are not turned into interrupts
        save_checkpoint({"kind": "site"}, p)


def test_a_full_disk_inside_torch_save_is_reported_as_the_os_error(tmp_path, monkeypatch):
    """torch.save's zip writer answers ENOSPC mid-record with a RuntimeError ("unexpected pos") on close:
    the write reports the OSError (errno and file), and nothing is left beside the target."""
    import errno

    def full_disk(state, fh):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 2709312 vs 2709200") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        save_checkpoint({"kind": "server"}, tmp_path / "server.pt")
    assert info.value.errno == errno.ENOSPC and "server.pt" in str(info.value.filename)
    assert not list(tmp_path.iterdir())
