"""DP-SGD on the site's own layers: Opacus per-sample gradients across the split, clipping, noise, accounting.

Convention (loss_reduction="mean"): the batch loss is the mean of per-sample losses l_i, and Opacus's
``grad_sample[i]`` is the gradient of l_i ALONE (B times sample i's share of the batch-mean gradient).
The oracle therefore runs sample i as a batch of one through the same split and compares its plain
gradient with ``grad_sample[i]`` directly; the mean of ``grad_sample`` over i must equal ``.grad``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from conftest import CLS5, SEG9, site_cfg, tiny_server
from fedbone_med.models import SiteModel, TaskLoss, build_site_model
from fedbone_med.privacy import PrivacyError, SiteAccountant
from fedbone_med.privacy.dpsgd_site import (
    DPSiteOptimizer,
    PrivateSiteModel,
    make_private_site_model,
    split_step_dp,
)
from fedbone_med.server import Coordinator
from fedbone_med.transport import InProcessTransport, JoinRequest, StepHeader
from fedbone_med.transport.validate import check_features, check_input_grad

B = 4


class _SplitLink:
    """A site's side of the transport for one fresh Coordinator (same seed: same backbone every time)."""

    def __init__(self, site: str) -> None:
        self.coord = Coordinator(tiny_server("mean"), run_id="t", seed=0)
        self.transport = InProcessTransport(self.coord)
        self.site = site
        self.reply = self.transport.join(JoinRequest(site, "fundus", "classification", 8, "test"))
        self.seq = 0
        self.batch = 0

    def header(self) -> StepHeader:
        self.seq += 1
        return StepHeader("t", self.site, 0, 0, self.seq, "train")

    def send_z(self, z: torch.Tensor) -> list[torch.Tensor]:
        self.batch = z.shape[0]
        return check_features(self.transport.forward(self.header(), z), self.reply.cut, self.batch)

    def send_feature_grads(self, d_feats: list[torch.Tensor]) -> torch.Tensor:
        return self.transport.backward(self.header(), d_feats)


def _batch(task, channels: int, size: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, channels, size, size, generator=g)
    if task.type == "classification":
        y = torch.randint(0, task.num_classes, (B,), generator=g)
    else:
        y = torch.randint(0, task.num_classes, (B, size, size), generator=g)
    return x, y


class _Float64Link:
    """The same two calls over a float64 copy of a real Coordinator's backbone (the Coordinator itself
    computes in float32); used to show the match is exact up to float64 round-off."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone

    def send_z(self, z: torch.Tensor) -> list[torch.Tensor]:
        self.z = z.detach().clone().requires_grad_(True)
        self.feats = self.backbone(self.z)
        # channels-last strided like the real backbone's maps (the case Opacus's conv sampler misreads)
        return [f.detach().clone(memory_format=torch.channels_last) for f in self.feats]

    def send_feature_grads(self, d_feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.autograd.grad(self.feats, self.z, d_feats)[0]


def _plain_split_grads(model: SiteModel, x, y, loss_fn, name: str, link_factory=None) -> dict[str, torch.Tensor]:
    """Plain (non-DP) split step on a fresh server, as SiteRuntime.forward_backward does it."""
    link = _SplitLink(name) if link_factory is None else link_factory()
    model.zero_grad(set_to_none=True)
    model.train()
    z = model.embed(x)
    feats = [f.requires_grad_(True) for f in link.send_z(z.detach())]
    z_local = z.detach().requires_grad_(True)
    loss = loss_fn(model.top(feats, z_local, (x.shape[-2], x.shape[-1])), y)
    loss.backward()
    dz = link.send_feature_grads([f.grad if f.grad is not None else torch.zeros_like(f) for f in feats])
    if link_factory is None:
        dz = check_input_grad(dz, z)
    assert z_local.grad is not None
    z.backward(z_local.grad + dz)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "cfg,channels",
    [(site_cfg("grading", "dr_grade", "fundus", CLS5, size=64), 3),
     (site_cfg("layers", "oct_layers", "oct", SEG9, size=64), 1)],
    ids=["ordinal-classification", "multiclass-segmentation"],
)
def test_opacus_per_sample_gradients_equal_the_batch_of_one_oracle(cfg, channels):
    # 64 px, not 32: at 32 px the coarsest backbone map is 1x1 and the adapter's GroupNorm normalises
    # groups of 2 values there, which amplifies float32 round-off to ~1e-3 relative in EVERY split
    # computation (the plain batch gradient vs the mean of the single-sample ones differs as much);
    # at 64 px float32 agreement is ~1e-5. (In float64 the match is ~1e-12 at 32 px too.)
    cut = _SplitLink("probe").reply.cut
    torch.manual_seed(0)
    model = build_site_model(cfg, cut)
    loss_fn = TaskLoss(cfg.task)
    x, y = _batch(cfg.task, channels, size=cfg.data.image_size)

    # Oracle first, on the plain model (no hooks yet): sample i alone through the split.
    oracle = [_plain_split_grads(model, x[i : i + 1], y[i : i + 1], loss_fn, cfg.name) for i in range(B)]
    batch_grads = _plain_split_grads(model, x, y, loss_fn, cfg.name)

    private = make_private_site_model(model)
    try:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        link = _SplitLink(cfg.name)
        split_step_dp(private, link.send_z, link.send_feature_grads, x, y, loss_fn)

        checked = 0
        for name, p in model.named_parameters():
            if name not in batch_grads:  # not reached by this task's loss (e.g. coarse smoothing under seg head)
                assert p.grad is None and getattr(p, "grad_sample", None) is None, name
                assert all(name not in o for o in oracle)
                continue
            gs = p.grad_sample
            assert isinstance(gs, torch.Tensor) and gs.shape == (B, *p.shape), name
            for i in range(B):
                torch.testing.assert_close(gs[i], oracle[i][name], rtol=1e-4, atol=1e-6, msg=f"{name}, sample {i}")
            # Mean convention: the batch-mean gradient is the mean of the per-sample gradients.
            torch.testing.assert_close(gs.mean(0), batch_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(p.grad, batch_grads[name], rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
        names = set(batch_grads)
        assert any(n.startswith("embedding.") for n in names) and "adaptation.scale_embed" in names
        assert any(n.startswith("adaptation.attn.qkv") for n in names)
        assert any(".se." in n for n in names) and any(n.startswith("head.") for n in names)
        assert checked == len(batch_grads)
    finally:
        private.remove_hooks()


def test_per_sample_gradients_are_exact_in_float64_with_1x1_feature_maps():
    coord = _SplitLink("probe").coord
    backbone = copy.deepcopy(coord.backbone).double().train()
    cfg = site_cfg("grading", "dr_grade", "fundus", CLS5)  # 32 px: the coarsest map is 1x1
    torch.manual_seed(0)
    model = build_site_model(cfg, coord.cut).double()
    loss_fn = TaskLoss(cfg.task)
    x, y = _batch(cfg.task, 3)
    x = x.double()
    oracle = [_plain_split_grads(model, x[i : i + 1], y[i : i + 1], loss_fn, "", lambda: _Float64Link(backbone))
              for i in range(B)]
    private = make_private_site_model(model)
    try:
        model.zero_grad(set_to_none=True)
        link = _Float64Link(backbone)
        split_step_dp(private, link.send_z, link.send_feature_grads, x, y, loss_fn)
        for name, p in model.named_parameters():
            for i in range(B):
                torch.testing.assert_close(p.grad_sample[i], oracle[i][name], rtol=1e-9, atol=1e-12,
                                           msg=f"{name}, sample {i}")
        assert bool(model.adaptation.scales[3].local[0].weight.grad_sample.abs().sum() > 0)
    finally:
        private.remove_hooks()


def _toy_private():
    torch.manual_seed(0)
    cut = _SplitLink("probe").reply.cut
    cfg = site_cfg("grading", "dr_grade", "fundus", CLS5)
    model = build_site_model(cfg, cut)
    return model, make_private_site_model(model), TaskLoss(cfg.task)


def test_dp_optimizer_clips_jointly_and_adds_calibrated_noise():
    model, private, loss_fn = _toy_private()
    try:
        params = private.parameters()
        x, y = _batch(CLS5, 3)
        C = 1e-3  # far below every per-sample norm, so each sample is clipped
        sgd = torch.optim.SGD(params, lr=1.0)
        opt = DPSiteOptimizer(sgd, noise_multiplier=1e-9, max_grad_norm=C, expected_batch_size=B,
                              generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        link = _SplitLink("grading")
        split_step_dp(private, link.send_z, link.send_feature_grads, x, y, loss_fn)
        flat = torch.cat([p.grad_sample.reshape(B, -1) for p in params], 1)  # joint over ALL site params
        norms = flat.norm(dim=1)
        assert bool((norms > 10 * C).all())
        expected = (flat * (C / norms)[:, None]).sum(0) / B  # sum of clipped per-sample grads, mean reduction
        opt.pre_step()
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
        assert got.norm() <= C * (1 + 1e-5)
        # Each clipped contribution has norm C exactly (joint, not per parameter).
        per_param = [(p.grad_sample.reshape(B, -1).norm(dim=1) * (C / norms)) for p in params]
        assert bool((torch.stack(per_param, 1).norm(dim=1) - C).abs().max() < 1e-6 * C + 1e-9)

        # Noise: std = sigma * C / expected_batch_size per coordinate (mean reduction).
        sigma, C2, ebs = 2.0, 0.5, 8
        opt2 = DPSiteOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=C2,
                               expected_batch_size=ebs, generator=torch.Generator().manual_seed(1))
        opt2.zero_grad(set_to_none=True)
        for p in params:  # zero per-sample gradients: what remains is pure noise
            p.grad_sample = torch.zeros(B, *p.shape)
        opt2.pre_step()
        noise = torch.cat([p.grad.reshape(-1) for p in params])
        n = noise.numel()
        assert n > 5000
        std = sigma * C2 / ebs
        assert abs(float(noise.std()) - std) < 5 * std / math.sqrt(2 * n)
        assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
        opt2.zero_grad(set_to_none=True)
        assert all(p.grad_sample is None and p.grad is None for p in params)
    finally:
        private.remove_hooks()


def test_full_step_updates_parameters_and_clears_per_sample_state():
    model, private, loss_fn = _toy_private()
    try:
        opt = DPSiteOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=1.0,
                              max_grad_norm=1.0, expected_batch_size=B, generator=torch.Generator().manual_seed(0))
        x, y = _batch(CLS5, 3)
        link = _SplitLink("grading")
        before = [p.detach().clone() for p in private.parameters()]
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            if step:
                link = _SplitLink("grading")
            split_step_dp(private, link.send_z, link.send_feature_grads, x, y, loss_fn)
            assert all(isinstance(p.grad_sample, torch.Tensor) and p.grad_sample.shape[0] == B
                       for p in private.parameters())
            opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, private.parameters(), strict=True))
        assert all(not getattr(m, "activations", None) for m in model.modules())
        # state_dict untouched by the hooks (checkpoints / FedAvg of the embedding keep their keys)
        assert set(model.state_dict()) == set(build_site_model(site_cfg("grading", "dr_grade", "fundus", CLS5),
                                                               _SplitLink("p").reply.cut).state_dict())
    finally:
        private.remove_hooks()


def test_optimizer_refuses_bad_parameters():
    model, private, _ = _toy_private()
    try:
        sgd = torch.optim.SGD(private.parameters(), lr=0.1)
        with pytest.raises(PrivacyError, match="noise_multiplier"):
            DPSiteOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
        with pytest.raises(PrivacyError, match="secure mode"):
            DPSiteOptimizer(sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B,
                            generator=torch.Generator(), secure_mode=True)
        with pytest.raises(PrivacyError, match="already wrapped"):
            PrivateSiteModel(model)
    finally:
        private.remove_hooks()


def test_batchnorm_site_model_is_refused_with_opacus_reason():
    model, private, _ = _toy_private()
    private.remove_hooks()
    model.embedding = nn.Sequential(model.embedding, nn.BatchNorm2d(16))
    with pytest.raises(PrivacyError, match="BatchNorm"):
        make_private_site_model(model)


def test_release_composes_like_opacus_rdp_accountant():
    model, private, _ = _toy_private()
    try:
        opt = DPSiteOptimizer(torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=1.1,
                              max_grad_norm=1.0, expected_batch_size=B, generator=torch.Generator().manual_seed(0))
        q, steps, n_records = 0.01, 250, 400
        r = opt.release(q)
        assert (r.noise_multiplier, r.sample_rate, r.mechanism) == (1.1, q, "dpsgd")
        acc = SiteAccountant(n_records)
        for _ in range(steps):
            acc.record_releases([r])
        ref = RDPAccountant()
        ref.history = [(1.1, q, steps)]
        assert acc.releases == {"dpsgd": steps}
        assert acc.epsilon() == pytest.approx(ref.get_epsilon(delta=acc.delta), rel=1e-9)
    finally:
        private.remove_hooks()
