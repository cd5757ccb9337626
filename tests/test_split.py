"""The split is exact: site + server across the cut == the monolithic model."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import CLS5, SEG1, SEG9, site_cfg, tiny_server
from fedbone_med.data.sources import ArraySplit, SiteData
from fedbone_med.errors import ModelError, ProtocolError
from fedbone_med.models import FedBoneModel, TaskLoss
from fedbone_med.server import Coordinator
from fedbone_med.site import SiteRuntime
from fedbone_med.transport import InProcessTransport, JoinRequest, StepHeader


def _random_data(task, channels: int, n: int = 8, size: int = 32) -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, channels, size, size, generator=g)
    if task.type == "classification":
        y = torch.randint(0, task.num_classes, (n,), generator=g)
    elif task.mode == "multiclass":
        y = torch.randint(0, task.num_classes, (n, size, size), generator=g)
    else:
        y = (torch.rand(n, task.num_classes, size, size, generator=g) > 0.7).float()
    split = ArraySplit(x, y)
    return SiteData(split, split)


def _split_and_monolithic(cfg, channels, server=None):
    coord = Coordinator(server or tiny_server("mean"), run_id="t", seed=0)
    # A second joined site keeps the step open, so the first site's gradient slot stays readable.
    coord.join(JoinRequest("placeholder", "fundus", "classification", 1, "test"))
    data = _random_data(cfg.task, channels)
    site = SiteRuntime(cfg, InProcessTransport(coord), data, seed=3)
    site.join()
    mono = FedBoneModel(copy.deepcopy(site.model), copy.deepcopy(coord.backbone))
    return coord, site, mono, data


def _deeper_cut():
    """A site with conv-stem-swin (the first Swin stage at the site) and the tiny backbone from its second
    stage on (input width 32, three stages)."""
    from dataclasses import replace

    from conftest import TINY_BACKBONE

    assert TINY_BACKBONE.embed_dim == 16 and TINY_BACKBONE.depths == (1, 1, 1, 1)
    server = replace(tiny_server("mean"), backbone=replace(TINY_BACKBONE, embed_dim=32, depths=(1, 1, 1),
                                                           num_heads=(2, 2, 4)))
    cfg = site_cfg("vessels", "vessels", "fundus", SEG1)
    return replace(cfg, model=replace(cfg.model, embedding="conv-stem-swin", stride=4)), server


_DEEPER = _deeper_cut()


@pytest.mark.parametrize(
    "cfg,channels,server",
    [
        (site_cfg("grading", "dr_grade", "fundus", CLS5), 3, None),
        (site_cfg("vessels", "vessels", "fundus", SEG1), 3, None),
        (site_cfg("layers", "oct_layers", "oct", SEG9), 1, None),
        (_DEEPER[0], 3, _DEEPER[1]),
    ],
    ids=["ordinal-classification", "binary-segmentation", "multiclass-segmentation", "deeper-cut-segmentation"],
)
def test_split_equals_monolithic_loss_and_every_gradient(cfg, channels, server):
    coord, site, mono, data = _split_and_monolithic(cfg, channels, server)
    x, y = data.train.images, data.train.targets

    split_loss = site.forward_backward(x, y, round=0, step=0)
    mono_loss = TaskLoss(cfg.task)(mono(x), y)
    mono_loss.backward()

    assert split_loss == pytest.approx(float(mono_loss.detach()), rel=1e-6)
    # Site parameters: embedding (gradient via dz from the server plus the local skip), adaptation, head.
    site_params = dict(site.model.named_parameters())
    checked = 0
    for name, p in mono.site.named_parameters():
        torch.testing.assert_close(site_params[name].grad, p.grad, rtol=1e-5, atol=1e-8, msg=f"site param {name}")
        checked += 1
    # Backbone parameters: the coordinator's gradient slot for this site, unflattened.
    slot = coord.slots[cfg.name]
    offset = 0
    for (name, p_mono), p_srv in zip(mono.backbone.named_parameters(), coord.params, strict=True):
        n = p_srv.numel()
        torch.testing.assert_close(slot[offset : offset + n].view_as(p_srv), p_mono.grad, rtol=1e-5, atol=1e-8,
                                   msg=f"backbone param {name}")
        offset += n
        checked += 1
    assert offset == coord.num_params and checked == len(site_params) + len(coord.params)


def test_a_deeper_cut_keeps_the_first_swin_stage_at_the_site():
    """conv-stem-swin + a backbone that starts one stage later (exactness: the parametrized test above)."""
    from conftest import TINY_BACKBONE
    from fedbone_med.models import build_backbone
    from fedbone_med.models.embeddings import ConvStemSwin
    from fedbone_med.privacy.dpsgd_site import PrivateSiteModel
    from fedbone_med.privacy.errors import PrivacyError

    cfg, server = _deeper_cut()
    coord, site, _, _ = _split_and_monolithic(cfg, 3, server)
    assert sum(p.numel() for p in site.model.embedding.stage.parameters()) > 0  # a Swin stage, at the site
    assert any(name.startswith("embedding.stage.") for name, _ in site.model.named_parameters())
    assert len(coord.backbone.stages) == len(build_backbone(TINY_BACKBONE).stages) - 1
    with pytest.raises(ModelError, match="conv-stem-swin"):
        ConvStemSwin(3, 64, stride=1)
    # DP-SGD cannot take per-sample gradients through window attention: refused, naming the module
    with pytest.raises(PrivacyError, match=r"site module embedding \(ConvStemSwin\) is not DP-SGD compatible"):
        PrivateSiteModel(copy.deepcopy(site.model))


def test_embedding_width_that_does_not_fit_the_backbone_is_refused_at_join():
    coord = Coordinator(tiny_server(), run_id="t", seed=0)
    cfg = site_cfg("bad", "dr_grade", "fundus", CLS5, embed_dim=99)
    site = SiteRuntime(cfg, InProcessTransport(coord), _random_data(CLS5, 3), seed=0)
    with pytest.raises(ModelError, match="99 .*16 channels at the cut"):
        site.join()


class TestServerRejectsBadMessages:
    def setup_method(self):
        self.coord = Coordinator(tiny_server(), run_id="run", seed=0)
        self.coord.join(JoinRequest("a", "fundus", "classification", 1, "test"))
        self.coord.join(JoinRequest("b", "fundus", "classification", 1, "test"))
        self.seq = 0

    def header(self, step=0, site="a", mode="train", seq=None):
        self.seq += 1
        return StepHeader("run", site, 0, step, self.seq if seq is None else seq, mode)

    def test_wrong_channel_count_is_a_shape_mismatch_at_the_cut(self):
        with pytest.raises(ProtocolError, match="shape mismatch at the cut: 3 channels.*expects 16"):
            self.coord.forward(self.header(), torch.zeros(2, 3, 8, 8))

    def test_nan_activation_is_rejected_without_echoing_values(self):
        z = torch.zeros(2, 16, 8, 8)
        z[1, 2, 3, 4] = float("nan")
        with pytest.raises(ProtocolError, match="NaN or Inf") as info:
            self.coord.forward(self.header(), z)
        assert "nan" not in str(info.value).replace("NaN", "")

    def test_replayed_sequence_number_is_rejected(self):
        self.coord.forward(self.header(mode="eval", seq=5), torch.zeros(1, 16, 8, 8))
        with pytest.raises(ProtocolError, match="replayed or reordered"):
            self.coord.forward(self.header(mode="eval", seq=5), torch.zeros(1, 16, 8, 8))

    def test_unknown_site_and_wrong_run_are_rejected(self):
        with pytest.raises(ProtocolError, match="has not joined"):
            self.coord.forward(self.header(site="intruder"), torch.zeros(1, 16, 8, 8))
        with pytest.raises(ProtocolError, match="run"):
            self.coord.forward(StepHeader("other-run", "a", 0, 0, 99), torch.zeros(1, 16, 8, 8))

    def test_backward_without_forward_and_wrong_gradient_shapes(self):
        with pytest.raises(ProtocolError, match="without its forward"):
            self.coord.backward(self.header(), [torch.zeros(1)])
        feats = self.coord.forward(self.header(), torch.zeros(2, 16, 8, 8))
        bad = [torch.zeros_like(f) for f in feats]
        bad[0] = torch.zeros(2, 1, 1, 1)
        with pytest.raises(ProtocolError, match="map 0 has shape"):
            self.coord.backward(self.header(), bad)

    def test_a_step_already_aggregated_cannot_be_sent_again(self):
        for site in ("a", "b"):
            feats = self.coord.forward(self.header(site=site), torch.rand(2, 16, 8, 8))
            self.coord.backward(self.header(site=site), [torch.ones_like(f) for f in feats])
        assert self.coord.step == 1 and len(self.coord.step_log) == 1
        with pytest.raises(ProtocolError, match="step 0 is over"):
            self.coord.forward(self.header(step=0), torch.rand(2, 16, 8, 8))


def test_a_site_that_leaves_mid_step_does_not_block_the_others():
    coord = Coordinator(tiny_server("projection"), run_id="run", seed=0)
    for name in ("a", "b", "c"):
        coord.join(JoinRequest(name, "fundus", "classification", 1, "test"))
    seq = iter(range(1, 100))
    for name in ("a", "c"):
        feats = coord.forward(StepHeader("run", name, 0, 0, next(seq)), torch.rand(2, 16, 8, 8))
        coord.backward(StepHeader("run", name, 0, 0, next(seq)), [torch.ones_like(f) for f in feats])
    assert coord.step == 0, "b has not sent its gradient yet"
    before = [p.detach().clone() for p in coord.params]
    coord.leave("b")
    assert coord.step == 1 and coord.step_log[-1]["site_names"] == ["a", "c"]
    assert any(not torch.equal(b, p) for b, p in zip(before, coord.params, strict=True)), "backbone must step"
