"""What each method costs a site: parameters, multiply-accumulates, step memory, bytes on the wire.

* Parameters and MACs: the site's own layers (embedding, adaptation, head) against the whole
  model (the same layers plus the backbone), which is what a site holds and computes under
  local-only training or FedAvg. MACs are counted for one sample's forward pass with
  :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions, matrix products and
  attention; element-wise operations are not counted), MACs = FLOPs / 2.
* Peak memory of one site training step: the tensors held when a steady-state step starts
  (parameters, optimizer state) plus the peak of the running total of tensor memory the CPU
  allocator hands out during the step (activations, gradients, temporaries and, for FedBone,
  the received F and dz), from torch.profiler's memory events ("Total Allocated"). Python and
  library overhead (the same for every method) are not included.
* Bytes: tensor payloads crossing the site boundary (float32, as serialised), counted per
  round by :class:`CountingTransport` for FedBone (z, F, dF, dz, evaluation z/F, embeddings
  for the per-modality FedAvg) and from state-dict sizes for FedAvg (model up and down).
  Framing, headers and AEAD tags are not included. :func:`fedbone_bytes_per_round` is the
  same count computed from shapes (used for the gRPC transport and checked against the
  measured count in the tests).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import ExperimentConfig, SiteConfig
from ..models import Backbone, CutSpec, SiteModel, TaskLoss, build_backbone, build_site_model
from ..models.split import IN_CHANNELS
from ..optim import build_optimizer
from ..transport.base import Transport
from ..transport.messages import JoinReply, JoinRequest, RoundReport, RoundSync, StepHeader


def nbytes(tensors: Tensor | Iterable[Tensor] | Mapping[str, Tensor] | None) -> int:
    """Payload bytes of a tensor, a list of tensors or a state dict."""
    if tensors is None:
        return 0
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, Mapping):
        tensors = tensors.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def float_state_bytes(module: nn.Module) -> int:
    """Bytes of a module's floating-point state (what FedAvg sends)."""
    return sum(nbytes(t) for t in module.state_dict().values() if t.is_floating_point())


class ByteLedger:
    """Bytes sent and received per site, by kind, since the last :meth:`take`."""

    def __init__(self) -> None:
        self.sent: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.received: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, site: str, sent: dict[str, int] | None = None, received: dict[str, int] | None = None) -> None:
        for k, v in (sent or {}).items():
            self.sent[site][k] += v
        for k, v in (received or {}).items():
            self.received[site][k] += v

    def take(self, site: str) -> dict[str, Any]:
        """This site's totals (and the breakdown by kind) since the last take; then reset them."""
        sent, received = dict(self.sent.pop(site, {})), dict(self.received.pop(site, {}))
        return {
            "bytes_sent": sum(sent.values()),
            "bytes_received": sum(received.values()),
            "bytes_detail": {"sent": sent, "received": received},
        }


class CountingTransport(Transport):
    """Wraps a site's transport and counts the tensor bytes of every message."""

    def __init__(self, inner: Transport, site: str, ledger: ByteLedger) -> None:
        self.inner = inner
        self.site = site
        self.ledger = ledger

    def join(self, request: JoinRequest) -> JoinReply:
        return self.inner.join(request)

    def forward(self, header: StepHeader, z: Tensor) -> list[Tensor]:
        feats = self.inner.forward(header, z)
        self.ledger.add(self.site, {f"z_{header.mode}": nbytes(z)}, {f"F_{header.mode}": nbytes(feats)})
        return feats

    def backward(self, header: StepHeader, grads: list[Tensor]) -> Tensor:
        dz = self.inner.backward(header, grads)
        self.ledger.add(self.site, {"dF": nbytes(grads)}, {"dz": nbytes(dz)})
        return dz

    def round_end(self, report: RoundReport) -> None:
        self.ledger.add(self.site, {"embedding": nbytes(report.embedding)})
        self.inner.round_end(report)

    def round_sync(self, site: str, round: int) -> RoundSync:
        result = self.inner.round_sync(site, round)
        self.ledger.add(self.site, received={"embedding": nbytes(result.embedding)})
        return result

    def leave(self, site: str, privacy: Mapping[str, float] | None = None) -> None:
        self.inner.leave(site, privacy)


# -- models of one site, for counting --------------------------------------------------------


def _site_models(cfg: SiteConfig, backbone: Backbone) -> SiteModel:
    return build_site_model(cfg, CutSpec.of(backbone))


def _dummy_batch(cfg: SiteConfig, batch: int) -> tuple[Tensor, Tensor]:
    size, t = cfg.data.image_size, cfg.task
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, IN_CHANNELS[cfg.modality], size, size, generator=gen)
    if t.type == "classification":
        y = torch.randint(0, t.num_classes, (batch,), generator=gen)
    elif t.mode == "multiclass":
        y = torch.randint(0, t.num_classes, (batch, size, size), generator=gen)
    else:
        y = (torch.rand(batch, t.num_classes, size, size, generator=gen) > 0.8).float()
    return x, y


def cut_shapes(cfg: SiteConfig, backbone: Backbone) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Per-sample shapes of z and of each feature map F_l for this site's images."""
    model = _site_models(cfg, backbone)
    x, _ = _dummy_batch(cfg, 1)
    with torch.no_grad():
        z = model.embed(x)
        feats = backbone(z)
    return tuple(z.shape[1:]), [tuple(f.shape[1:]) for f in feats]


def macs_per_sample(cfg: SiteConfig, backbone: Backbone) -> dict[str, int]:
    """Forward multiply-accumulates for one sample: at the site, in the backbone, in total."""
    model = _site_models(cfg, backbone).eval()
    backbone.eval()
    x, _ = _dummy_batch(cfg, 1)
    with torch.no_grad():
        with FlopCounterMode(display=False) as site_a:
            z = model.embed(x)
        feats = backbone(z)
        with FlopCounterMode(display=False) as site_b:
            model.top(feats, z, (x.shape[-2], x.shape[-1]))
        with FlopCounterMode(display=False) as server:
            backbone(z)
    site = (site_a.get_total_flops() + site_b.get_total_flops()) // 2
    bb = server.get_total_flops() // 2
    return {"site_macs": int(site), "backbone_macs": int(bb), "full_macs": int(site + bb)}


def _peak_tensor_bytes(step: Callable[[], None], held: Iterable[Tensor]) -> int:
    """Peak tensor memory of ``step()``: the tensors ``held`` before it (parameters, optimizer
    state) plus the peak of the CPU allocator's running total of tensor allocations made during
    the step, from torch.profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    totals = [e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"]
    return nbytes(held) + int(max([0, *totals]))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]


def peak_step_memory(cfg: SiteConfig, backbone_cfg: Any, seed: int = 0) -> dict[str, int]:
    """Peak tensor memory of one training step at the site: FedBone's site step, and the whole
    model's step (what a local-only or FedAvg site runs). Measured after one warm-up step."""
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_cfg)
    model = _site_models(cfg, backbone)
    loss_fn = TaskLoss(cfg.task)
    x, y = _dummy_batch(cfg, cfg.train.batch_size)
    t = cfg.train
    size = (x.shape[-2], x.shape[-1])

    # FedBone: the site's half of the step. F and dz arrive as fresh tensors (as a wire delivers them).
    site_opt = build_optimizer(t.optimizer, model.parameters(), t.lr, t.weight_decay)
    with torch.no_grad():
        f_template = [f.detach() for f in backbone(model.embed(x))]
        dz_template = torch.zeros_like(model.embed(x))

    def site_step() -> None:
        site_opt.zero_grad(set_to_none=True)
        z = model.embed(x)
        feats = [f.clone().requires_grad_(True) for f in f_template]
        z_local = z.detach().requires_grad_(True)
        loss = loss_fn(model.top(feats, z_local, size), y)
        loss.backward()
        _ = [f.grad for f in feats]  # dF, sent to the server
        dz = dz_template.clone()
        z.backward(dz if z_local.grad is None else z_local.grad + dz)
        site_opt.step()

    # Local-only / FedAvg: the whole model at the site.
    full = nn.ModuleDict({"site": model, "backbone": backbone})
    full_opt = build_optimizer(t.optimizer, full.parameters(), t.lr, t.weight_decay)

    def full_step() -> None:
        full_opt.zero_grad(set_to_none=True)
        z = model.embed(x)
        loss = loss_fn(model.top(backbone(z), z, size), y)
        loss.backward()
        full_opt.step()

    site_step()
    site_opt.zero_grad(set_to_none=True)
    site_peak = _peak_tensor_bytes(site_step, [*model.parameters(), *_optimizer_tensors(site_opt)])
    full_step()
    full_opt.zero_grad(set_to_none=True)
    full_peak = _peak_tensor_bytes(full_step, [*full.parameters(), *_optimizer_tensors(full_opt)])
    return {"site_step_peak_bytes": site_peak, "full_step_peak_bytes": full_peak}


def site_costs(cfg: ExperimentConfig, measure_memory: bool = True) -> dict[str, dict[str, Any]]:
    """Per site: parameters, MACs and step memory at the site (FedBone) vs the whole model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = build_backbone(cfg.server.backbone)
        bb_params = sum(p.numel() for p in backbone.parameters())
        out: dict[str, dict[str, Any]] = {}
        for s in cfg.sites:
            site_params = sum(p.numel() for p in _site_models(s, backbone).parameters())
            entry: dict[str, Any] = {
                "site_parameters": site_params,
                "full_parameters": site_params + bb_params,
                "backbone_parameters": bb_params,
                **macs_per_sample(s, backbone),
            }
            entry["site_param_fraction"] = site_params / (site_params + bb_params)
            entry["site_mac_fraction"] = entry["site_macs"] / max(1, entry["full_macs"])
            if measure_memory:
                entry.update(peak_step_memory(s, cfg.server.backbone, cfg.seed))
            out[s.name] = entry
    return out


# -- bytes per round, from shapes ----------------------------------------------------------


def fedbone_bytes_per_round(
    cfg: ExperimentConfig, site: SiteConfig, backbone: Backbone, n_train: int, n_val: int,
    embedding_group_size: int = 1,
) -> dict[str, int]:
    """Tensor bytes one FedBone site sends and receives in one round (float32 payloads).

    Per training step the site sends z and dF and receives F and dz; each evaluation sends z
    and receives F for every validation image; with embedding FedAvg the site sends its
    embedding at the round's end and receives the average when its modality group has >= 2
    sites.
    """
    z_shape, f_shapes = cut_shapes(site, backbone)
    z1 = 4 * math.prod(z_shape)
    f1 = 4 * sum(math.prod(s) for s in f_shapes)
    batch = min(site.train.batch_size, n_train)
    steps = cfg.steps_per_round
    emb = 0
    if cfg.embedding_fedavg:
        emb = float_state_bytes(_site_models(site, backbone).embedding)
    sent = steps * batch * (z1 + f1) + n_val * z1 + emb
    received = steps * batch * (f1 + z1) + n_val * f1 + (emb if embedding_group_size >= 2 else 0)
    return {"bytes_sent": sent, "bytes_received": received}


def fedavg_bytes_per_round(site: SiteConfig, backbone: Backbone, embedding_group_size: int) -> dict[str, int]:
    """FedAvg of the full model: the backbone and embedding go up and the averages come down."""
    bb = float_state_bytes(backbone)
    emb = float_state_bytes(_site_models(site, backbone).embedding)
    return {"bytes_sent": bb + emb, "bytes_received": bb + (emb if embedding_group_size >= 2 else 0)}
