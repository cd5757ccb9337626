"""The site runtime: trains a site's own layers through any Transport.

One training step (DESIGN.md, "One training step"):

    x, y  -> z = Embed(x)                      (stays here)
    z     -> transport.forward -> F            (F: the backbone's feature maps)
    F, z  -> Head(TaskAdapt(F, z)) -> loss     (z is also the finest skip connection, locally)
    loss.backward() gives dF and the skip part of dL/dz
    dF    -> transport.backward -> dz_server
    z.backward(dz_skip + dz_server); the site optimizer steps.

Images and labels never leave this object; only z and dF are handed to the transport.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..config import SiteConfig
from ..data.augment import augment_batch
from ..data.sources import SiteData
from ..device import resolve_device
from ..errors import CheckpointError, ProtocolError
from ..models import CutSpec, SiteModel, TaskLoss, build_site_model, class_probabilities, decode
from ..optim import build_optimizer
from ..privacy.dpsgd_site import DPSiteOptimizer, PrivateSiteModel, make_private_site_model, split_step_dp
from ..privacy.site import SitePrivacy
from ..transport.base import Transport
from ..transport.messages import JoinReply, JoinRequest, RoundReport, StepHeader
from ..transport.validate import check_features, check_input_grad
from .metrics import classification_metrics, primary_metric, segmentation_counts, segmentation_metrics


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SiteRuntime:
    def __init__(self, cfg: SiteConfig, transport: Transport, data: SiteData, *, seed: int | None) -> None:
        """``seed=None``: take the federation's seed from the server's join reply (networked sites)."""
        self.cfg = cfg
        self.name = cfg.name
        self.transport = transport
        self.data = data
        self.seed = seed
        self.device = resolve_device(cfg.train.device)
        self.loss_fn = TaskLoss(cfg.task)
        self.model: SiteModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.cut: CutSpec | None = None
        self.run_id = ""
        self.sequence = 0
        self._round_losses: list[float] = []
        self.privacy: SitePrivacy | None = None
        self.private_model: PrivateSiteModel | None = None  # Opacus hooks on the site layers (DP-SGD)
        self.joined: JoinReply | None = None  # the server's last join reply

    def configure_privacy(self, planned_steps: int) -> None:
        """Set up the site's DP mechanisms and accountants for a run of ``planned_steps`` steps."""
        p = self.cfg.privacy
        if p.enabled:
            self.privacy = SitePrivacy(
                p, num_train=len(self.data.train), num_val=len(self.data.val),
                batch_size=self.cfg.train.batch_size, planned_steps=planned_steps,
                seed=derive_seed(self.seed, "privacy", self.name),
            )
            if p.dpsgd:
                model, _, optimizer = self._joined()
                self.private_model = make_private_site_model(model)
                self.optimizer = DPSiteOptimizer(
                    optimizer, noise_multiplier=self.privacy.sigma, max_grad_norm=p.dpsgd_clip,
                    expected_batch_size=self.cfg.train.batch_size, generator=self.privacy.dpsgd_generator,
                    secure_mode=p.secure_mode,
                )

    # -- membership ---------------------------------------------------------------
    def join(self) -> JoinReply:
        reply = self.transport.join(
            JoinRequest(self.name, self.cfg.modality, self.cfg.task.type, len(self.data.train), __version__)
        )
        if self.cut is not None and reply.cut != self.cut:
            raise ProtocolError(f"site '{self.name}': the server's cut changed since this site joined; "
                                "the backbone is not the one this site's layers were built for")
        self.run_id, self.cut, self.joined = reply.run_id, reply.cut, reply
        if self.seed is None:
            if reply.schedule is None:
                raise ProtocolError(f"site '{self.name}': the server sent no schedule and this site has no seed")
            self.seed = derive_seed(reply.schedule.seed, self.name)
        if self.model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "site-init", self.name))
                self.model = build_site_model(self.cfg, reply.cut).to(self.device)
            t = self.cfg.train
            self.optimizer = build_optimizer(t.optimizer, self.model.parameters(), t.lr, t.weight_decay)
        return reply

    def _joined(self) -> tuple[SiteModel, CutSpec, torch.optim.Optimizer]:
        if self.model is None or self.cut is None or self.optimizer is None:
            raise RuntimeError(f"site '{self.name}': call join() before training or evaluating")
        return self.model, self.cut, self.optimizer

    def describe(self) -> dict[str, Any]:
        """What a results file says about this site: task, data sizes, split, parameters (no patient data)."""
        c = self.cfg
        return {
            "modality": c.modality,
            "task": c.data.task if c.data.source == "phantom" else Path(c.data.manifest or "").stem,
            "task_type": c.task.type,
            "primary_metric": primary_metric(c.task),
            "n_train": len(self.data.train),
            "n_val": len(self.data.val),
            "site_parameters": self.num_parameters() if self.model is not None else None,
            "split": self.data.split or {"method": "phantom seeds", "seed": c.data.seed},
        }

    def num_parameters(self) -> int:
        model, _, _ = self._joined()
        return sum(p.numel() for p in model.parameters())

    def _header(self, round: int, step: int, mode: str) -> StepHeader:
        self.sequence += 1
        return StepHeader(self.run_id, self.name, round, step, self.sequence, mode)  # type: ignore[arg-type]

    # -- training -----------------------------------------------------------------
    def batch_index(self, round: int, step_in_round: int) -> Tensor:
        """Indices of this step's batch: a fresh seeded permutation per round, cycled."""
        n, b = len(self.data.train), self.cfg.train.batch_size
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "batches", self.name, round))
        perm = torch.randperm(n, generator=gen)
        start = (step_in_round * b) % n
        idx = torch.arange(start, start + min(b, n)) % n
        return perm[idx]

    def forward_backward(self, x: Tensor, y: Tensor, round: int, step: int) -> float:
        """One split forward/backward; leaves gradients in the site's parameters."""
        model, cut, _ = self._joined()
        model.train()
        if self.privacy is not None:
            self.privacy.charge_step()  # raises BudgetExceeded before anything is sent
        x, y = x.to(self.device), y.to(self.device)
        if self.private_model is not None and self.privacy is not None:
            return self._forward_backward_dpsgd(self.private_model, self.privacy, x, y, round, step, cut)
        z = model.embed(x)  # (B, D, h, w)
        header = self._header(round, step, "train")
        z_sent = z.detach() if self.privacy is None else self.privacy.noise_activation(z.detach())
        feats = check_features(self.transport.forward(header, z_sent), cut, x.shape[0])
        feats = [f.to(self.device).requires_grad_(True) for f in feats]
        z_local = z.detach().requires_grad_(True)
        loss = self.loss_fn(model.top(feats, z_local, (x.shape[-2], x.shape[-1])), y)
        loss.backward()
        # A map the head did not use has no gradient: its dF is zero.
        d_feats = [f.grad if f.grad is not None else torch.zeros_like(f) for f in feats]
        if self.privacy is not None:
            d_feats = self.privacy.noise_feature_grads(d_feats)
        dz = self.transport.backward(self._header(round, step, "train"), d_feats)
        dz = check_input_grad(dz, z).to(self.device)
        z.backward(dz if z_local.grad is None else z_local.grad + dz)
        return float(loss.detach())

    def _forward_backward_dpsgd(self, private: PrivateSiteModel, privacy: SitePrivacy, x: Tensor, y: Tensor,
                                round: int, step: int, cut: CutSpec) -> float:
        """The same split step through Opacus hooks, leaving per-sample gradients for DP-SGD."""
        z_ref: list[Tensor] = []

        def send_z(z: Tensor) -> list[Tensor]:
            z_ref.append(z)
            feats = self.transport.forward(self._header(round, step, "train"), privacy.noise_activation(z.detach()))
            return [f.to(self.device) for f in check_features(feats, cut, x.shape[0])]

        def send_feature_grads(d_feats: list[Tensor]) -> Tensor:
            dz = self.transport.backward(self._header(round, step, "train"), privacy.noise_feature_grads(d_feats))
            return check_input_grad(dz, z_ref[0]).to(self.device)

        return split_step_dp(private, send_z, send_feature_grads, x, y, self.loss_fn)

    def train_step(self, round: int, step: int, step_in_round: int) -> float:
        _, _, optimizer = self._joined()
        x, y = self.data.train.batch(self.batch_index(round, step_in_round))
        if self.data.augment is not None:
            seed = derive_seed(self.seed, "augment", self.name, round, step_in_round) % 2**31
            x, y = augment_batch(self.data.augment, self.cfg.task, x, y, seed)
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x, y, round, step)
        optimizer.step()
        self._round_losses.append(loss)
        return loss

    # -- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, round: int, step: int) -> dict[str, float]:
        """Metrics on the validation split (the backbone runs in eval mode on the server)."""
        model, cut, _ = self._joined()
        model.eval()
        task, val = self.cfg.task, self.data.val
        if self.privacy is not None and not self.privacy.charge_evaluation():
            nan = float("nan")
            return {"primary": nan, "chance": nan, "evaluation_skipped": 1.0}
        probs, preds, counts, pixels = [], [], None, 0
        for start in range(0, len(val), self.cfg.train.eval_batch_size):
            idx = torch.arange(start, min(start + self.cfg.train.eval_batch_size, len(val)))
            x, y = val.batch(idx)
            x = x.to(self.device)
            z = model.embed(x)
            z_sent = z if self.privacy is None else self.privacy.noise_activation(z)
            feats = check_features(self.transport.forward(self._header(round, step, "eval"), z_sent), cut, len(idx))
            logits = model.top([f.to(self.device) for f in feats], z, (x.shape[-2], x.shape[-1])).cpu()
            if task.type == "classification":
                probs.append(class_probabilities(task, logits))
                preds.append(decode(task, logits))
            else:
                c = segmentation_counts(task, decode(task, logits), y)
                counts = c if counts is None else counts + c
                pixels += y.shape[0] * y.shape[-1] * y.shape[-2]
        if task.type == "classification":
            m = classification_metrics(task, torch.cat(probs), torch.cat(preds), val.targets)
        else:
            m = segmentation_metrics(counts, pixels)  # type: ignore[arg-type]
        m["primary"] = m[primary_metric(task)]
        return m

    # -- rounds -------------------------------------------------------------------
    def embedding_signature(self) -> str:
        model, _, _ = self._joined()
        shapes = sorted((k, tuple(v.shape)) for k, v in model.embedding.state_dict().items())
        return hashlib.sha256(repr((self.cfg.model.embedding, shapes)).encode()).hexdigest()[:16]

    def skipped_files(self) -> dict[str, float]:
        """Files left out at load time (``data.skip_bad_files``), per split: reported with every round."""
        skipped = (self.data.split or {}).get("skipped")
        if not skipped:
            return {}
        return {f"skipped_files_{split}": float(c["total"]) for split, c in skipped.items()}

    def end_round(self, round: int, metrics: dict[str, float], share_embedding: bool) -> dict[str, float]:
        """Report the round (metrics and, for FedAvg, the embedding) to the server."""
        model, _, _ = self._joined()
        # A private site shares its embedding only when DP-SGD trains it: otherwise its weights
        # are an unaccounted release of every record.
        share_embedding = share_embedding and (self.privacy is None or self.private_model is not None)
        losses, self._round_losses = self._round_losses, []
        train_loss = sum(losses) / len(losses) if losses else float("nan")
        emb = {k: v.detach().cpu() for k, v in model.embedding.state_dict().items()} if share_embedding else None
        privacy = self.privacy.report() if self.privacy is not None else {}
        self.transport.round_end(
            RoundReport(self.name, round, len(self.data.train), train_loss, dict(metrics), emb,
                        self.embedding_signature() if share_embedding else None, dict(privacy))
        )
        return {"train_loss": train_loss, **metrics, **privacy, **self.skipped_files()}

    def leave(self) -> None:
        """Leave the federation (e.g. when the privacy budget is spent), telling the server the
        privacy spent so far (for its audit record of this round: no end-of-round report follows)."""
        self.transport.leave(self.name, self.privacy.report() if self.privacy is not None else None)

    def sync_round(self, round: int) -> tuple[str, ...]:
        """Apply the server's averaged embedding, if this site is in a FedAvg group."""
        model, _, _ = self._joined()
        result = self.transport.round_sync(self.name, round)
        if result.embedding is not None:
            model.embedding.load_state_dict(result.embedding)
        return result.group

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        model, _, optimizer = self._joined()
        return {
            "kind": "site",
            "site": self.name,
            "software_version": __version__,
            "run_id": self.run_id,
            "sequence": self.sequence,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model, _, optimizer = self._joined()
        if state.get("site") != self.name:
            raise CheckpointError(f"checkpoint belongs to site {state.get('site')!r}, not {self.name!r}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if self.privacy is not None:
            if state.get("privacy") is None:
                raise CheckpointError(f"site '{self.name}': checkpoint has no privacy accountant; privacy is on now")
            self.privacy.load_state_dict(state["privacy"])
        self.sequence = int(state["sequence"])
