"""The coordinator's membership and failure rules: step deadlines, min_sites, admission at round boundaries."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import tiny_server
from fedbone_med.server.coordinator import Coordinator, SiteDropped
from fedbone_med.server.events import Dropped, StepSkipped
from fedbone_med.transport import JoinRequest, RoundReport, StepHeader

SPR = 2  # steps per round


def _coord(**kw) -> Coordinator:
    kw.setdefault("expected_sites", ("a", "b", "c"))
    return Coordinator(tiny_server("mean"), run_id="r", seed=0, steps_per_round=SPR, rounds=3, wait_timeout=20, **kw)


def _join(c: Coordinator, name: str):
    return c.join(JoinRequest(name, "fundus", "classification", 8, "test"))


class _Site:
    def __init__(self, c: Coordinator, name: str) -> None:
        self.c, self.name, self.seq = c, name, 0
        self.z = torch.randn(2, c.cut.z_channels, 8, 8, generator=torch.Generator().manual_seed(len(name)))

    def header(self, rnd: int, step: int) -> StepHeader:
        self.seq += 1
        return StepHeader("r", self.name, rnd, step, self.seq)

    def step(self, rnd: int, step: int) -> None:
        feats = self.c.forward(self.header(rnd, step), self.z)
        self.c.backward(self.header(rnd, step), [torch.ones_like(f) * 1e-3 for f in feats])


def _in_thread(fn) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def _backbone(c: Coordinator) -> list[torch.Tensor]:
    return [p.detach().clone() for p in c.params]


def test_training_waits_until_every_expected_site_has_joined():
    c = _coord()
    a = _Site(c, "a")
    _join(c, "a")
    t, errors = _in_thread(lambda: a.step(0, 0))
    time.sleep(0.3)
    assert t.is_alive() and not c.started  # held at the gate
    _join(c, "b")
    _join(c, "c")
    assert c.started
    time.sleep(0.3)
    assert not errors


def test_a_late_site_is_dropped_at_the_deadline_and_the_step_aggregates_over_the_others():
    c = _coord(min_sites=2, step_deadline=0.5)
    sites = {n: _Site(c, n) for n in "abc"}
    for n in "abc":
        _join(c, n)
    before = _backbone(c)
    threads = [_in_thread(lambda s=sites[n]: s.step(0, 0)) for n in "ab"]
    for t, errors in threads:
        t.join(timeout=10)
        assert not errors
    # a and b delivered; c never does. Their next forward waits at the barrier and applies the deadline.
    t, errors = _in_thread(lambda: sites["a"].step(0, 1))
    t.join(timeout=10)
    assert c.step >= 1 and c.step_log[0]["num_sites"] == 2 and c.step_log[0]["site_names"] == ["a", "b"]
    assert any(not torch.equal(x, y) for x, y in zip(before, _backbone(c), strict=True))  # the optimizer stepped
    assert [e for e in c.events if isinstance(e, Dropped)][0].site == "c"
    with pytest.raises(SiteDropped, match="join again"):
        sites["c"].step(0, 0)


def test_too_few_sites_by_the_deadline_skips_the_step():
    c = _coord(min_sites=3, step_deadline=0.5)
    sites = {n: _Site(c, n) for n in "abc"}
    for n in "abc":
        _join(c, n)
    before = _backbone(c)
    sites["a"].step(0, 0)
    sites["b"].step(0, 0)
    t, errors = _in_thread(lambda: sites["a"].step(0, 1))  # waits; the deadline passes with 2 of min 3
    t.join(timeout=10)
    skipped = [e.to_dict() for e in c.events if isinstance(e, StepSkipped)]
    assert skipped and skipped[0]["step"] == 0 and skipped[0]["sites"] == ["a", "b"]
    assert not c.step_log  # nothing aggregated
    assert all(torch.equal(x, y) for x, y in zip(before, _backbone(c), strict=True))


def test_a_site_joining_mid_round_is_admitted_at_the_next_round():
    c = _coord(expected_sites=("a", "b"))
    a, b = _Site(c, "a"), _Site(c, "b")
    assert _join(c, "a").round == 0 and _join(c, "b").round == 0
    a.step(0, 0)
    b.step(0, 0)  # round 0 has started
    reply = _join(c, "c")
    assert (reply.round, reply.step) == (1, SPR) and "c" in c.pending and "c" not in c.sites
    a.step(0, 1)
    b.step(0, 1)
    for s in (a, b):
        c.round_end(RoundReport(s.name, 0, 8, 0.5, {}))
    assert c.round == 1 and "c" in c.sites  # admitted with the round boundary
    assert c.round_sync("a", 0).round == 0
    with pytest.raises(SiteDropped, match="did not report round 0"):
        c.round_sync("c", 0)


def test_a_member_that_leaves_releases_the_round_barrier():
    c = _coord(expected_sites=("a", "b"))
    a, b = _Site(c, "a"), _Site(c, "b")
    _join(c, "a")
    _join(c, "b")
    for step in range(SPR):
        a.step(0, step)
        b.step(0, step)
    c.round_end(RoundReport("a", 0, 8, 0.5, {}))
    t, errors = _in_thread(lambda: c.round_sync("a", 0))  # waits for b's report
    time.sleep(0.2)
    assert t.is_alive()
    c.leave("b")  # b stops (e.g. its privacy budget is spent): a must not wait for it
    t.join(timeout=5)
    assert not t.is_alive() and not errors and c.round == 1


def test_the_server_records_revocations_once_per_run_and_audit_key_rotations(tmp_path):
    from fedbone_med.audit import load_public_keys, verify_log
    from fedbone_med.config import ServeConfig
    from fedbone_med.crypto.provision import provision, revoke
    from fedbone_med.server.audit_trail import ServerAuditTrail, ensure_server_key
    from fedbone_med.server.networked import NetworkedServer

    provision(tmp_path / "p", ["a", "b", "c"])
    revoke(tmp_path / "p", "c", reason="key-compromise")
    server = NetworkedServer(ServeConfig(name="x", server=tiny_server(), sites=("a", "b")), tmp_path / "p",
                             tmp_path / "out")
    assert server.expected == ("a", "b") and "c" not in server.kit.site_keys
    key = ensure_server_key(tmp_path / "out" / "keys")
    server.audit = ServerAuditTrail(tmp_path / "out" / "audit" / "server.jsonl", key,
                                    run_id=server.coordinator.run_id, config_hash=server.hash)
    server.audit.start(server.coordinator.backbone, "mean", ["a", "b"], 0, 0, joins=False)
    server._audit_revocations()
    server._audit_revocations()  # a second launch of the same run does not repeat it
    # the operator rotates the audit key (serve --rotate-audit-key): old key signs the switch, new key signs on
    from fedbone_med.audit.keys import keygen

    new_private, _, new_id = keygen(tmp_path / "newkey")
    old_public = (tmp_path / "out" / "keys" / "server-audit-key.pub.pem").read_bytes()
    server._rotate_audit_key(new_private)
    server.audit.site_left("a", 0, "test")
    server.audit.sign()
    server.audit.close()
    keys = tmp_path / "out" / "keys"
    retired = list((keys / "retired").glob("*.pub.pem"))
    assert len(retired) == 1 and retired[0].read_bytes() == old_public
    log = tmp_path / "out" / "audit" / "server.jsonl"
    report = verify_log(log, load_public_keys([retired[0], keys / "server-audit-key.pub.pem"]))
    revs = [r["body"] for r in report.records if r["kind"] == "revocation"]
    assert [(b["site_id"], "key-compromise" in b["reason"]) for b in revs] == [("c", True)]
    rotations = [r["body"] for r in report.records if r["kind"] == "key_rotation"]
    assert len(rotations) == 1 and rotations[0]["new_key_id"] == new_id
    with pytest.raises(Exception, match="unknown key_id"):  # the new key alone cannot verify the old part
        verify_log(log, load_public_keys([keys / "server-audit-key.pub.pem"]))


def test_stochastic_depth_masks_do_not_depend_on_arrival_order_or_the_global_rng():
    """With drop_path_rate > 0 a site's training features depend only on (seed, step, site, z)."""
    from dataclasses import replace

    server = tiny_server("mean")
    server = replace(server, backbone=replace(server.backbone, drop_path_rate=0.5))

    def features(order: str, noise: int) -> dict[str, list[torch.Tensor]]:
        c = Coordinator(server, run_id="r", seed=0, steps_per_round=SPR, rounds=3, wait_timeout=20,
                        expected_sites=("a", "b"))
        sites = {n: _Site(c, n) for n in "ab"}
        for n in "ab":
            _join(c, n)
        torch.manual_seed(noise)  # whatever else the process drew before
        out = {}
        for n in order:
            out[n] = [f.clone() for f in c.forward(sites[n].header(0, 0), sites[n].z)]
        return out

    ab, ba = features("ab", noise=1), features("ba", noise=2)
    for n in "ab":
        for x, y in zip(ab[n], ba[n], strict=True):
            assert torch.equal(x, y), n
    # and the masks are random: a site's features differ from an eval (no drop) forward
    c = Coordinator(server, run_id="r", seed=0, steps_per_round=SPR, rounds=3, expected_sites=("a", "b"))
    site = _Site(c, "a")
    _join(c, "a")
    _join(c, "b")
    evaluated = c.forward(StepHeader("r", "a", 0, 0, 1, mode="eval"), site.z)
    assert not all(torch.equal(x, y) for x, y in zip(evaluated, ab["a"], strict=True))


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_deadlines_are_measured_on_the_injected_clock():
    """A step deadline of an hour passes when the injected clock says so, not after an hour of real time;
    until then the late site is waited for, however long it takes in real time."""
    clock = _FakeClock()
    c = _coord(min_sites=2, step_deadline=3600.0, clock=clock)
    sites = {n: _Site(c, n) for n in "abc"}
    for n in "abc":
        _join(c, n)
    sites["a"].step(0, 0)
    sites["b"].step(0, 0)
    t, errors = _in_thread(lambda: sites["a"].step(0, 1))  # waits for step 0, which waits for c
    time.sleep(0.6)  # more than two ticks of real time: nothing has expired on the injected clock
    assert t.is_alive() and "c" in c.sites and not c.step_log
    clock.now += 3601.0
    t.join(timeout=10)
    assert not t.is_alive() and not errors
    assert [e.site for e in c.events if isinstance(e, Dropped)] == ["c"]
    assert c.step_log[0]["site_names"] == ["a", "b"]
