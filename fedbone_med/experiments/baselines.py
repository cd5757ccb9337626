"""The baselines FedBone is compared with, on the same models, data, splits and step budget.

* **local-only**: every site trains its embedding, its own copy of the backbone and its head
  alone. Each site gets a private one-site :class:`~fedbone_med.server.Coordinator`, so the
  site layers, the backbone, their initialisation (same seeds), the batches, the optimizers
  and the evaluation are exactly the code and numbers a FedBone run uses; with one site the
  split is the whole model (the split step is exact), and nothing is shared.
* **FedAvg** of the full model: the same per-site training, and at every round's end the
  backbones (all sites) and the embeddings (per modality: fundus stems take 3 channels, OCT
  stems 1) are averaged, weighted by each site's number of training samples; adaptation
  modules and heads stay local (as in FedBone). Each site keeps its own optimizer state.
* **centralised** multi-task training on pooled data: one process, one backbone, every
  site's embedding, adaptation and head, one optimizer; each step draws every site's batch
  (the same batches the sites draw), sums the task losses and steps once.

Every runner returns a results dict shaped like :meth:`Federation.run`'s (``sites``,
``rounds`` with per-site metrics, ``final``), so the reproduction treats all methods alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..aggregation import average_state_dicts
from ..config import AggregationConfig, ExperimentConfig, SiteConfig
from ..configtools import config_hash
from ..data.augment import augment_batch
from ..data.sources import SiteData
from ..server import Coordinator
from ..site import SiteRuntime, derive_seed
from ..transport import InProcessTransport
from .accounting import float_state_bytes

OnRound = Callable[[dict[str, Any]], None]


def _final(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for record in rounds:
        final.update(record["sites"])
    return final


def _private_server(cfg: ExperimentConfig):
    """The server config of a one-site federation: the same backbone and optimizer; with one
    site, mean aggregation is the site's own gradient."""
    return replace(cfg.server, aggregation=AggregationConfig(method="mean"))


class _SiteAlone:
    """One site with its own backbone: a one-site Coordinator over the in-process transport."""

    def __init__(self, cfg: ExperimentConfig, s: SiteConfig, data: SiteData, run_id: str) -> None:
        self.cfg = s
        self.coordinator = Coordinator(_private_server(cfg), run_id=f"{run_id}-{s.name}", seed=cfg.seed,
                                       embedding_fedavg=False)
        self.site = SiteRuntime(s, InProcessTransport(self.coordinator), data, seed=derive_seed(cfg.seed, s.name))
        self.site.join()


class LocalGroup:
    """K sites each training the whole model alone (``fedavg=False``: local-only), or with the
    backbone and embeddings averaged after every round (``fedavg=True``: FedAvg)."""

    def __init__(self, cfg: ExperimentConfig, data: dict[str, SiteData], *, fedavg: bool) -> None:
        self.cfg = cfg
        self.fedavg = fedavg
        self.method = "fedavg" if fedavg else "local"
        self.run_id = f"{cfg.name}-{self.method}-s{cfg.seed}-{config_hash(cfg)[:10]}"
        self.members = [_SiteAlone(cfg, s, data[s.name], self.run_id) for s in cfg.sites]
        self.results: dict[str, Any] = {
            "method": self.method,
            "experiment": cfg.name,
            "run_id": self.run_id,
            "seed": cfg.seed,
            "sites": {m.site.name: m.site.describe() for m in self.members},
            "backbone_parameters": self.members[0].coordinator.num_params,
            "rounds": [],
        }

    def groups(self) -> dict[str, list[str]]:
        """FedAvg groups of embeddings: sites whose embeddings have the same architecture."""
        out: dict[str, list[str]] = {}
        for m in self.members:
            out.setdefault(m.site.embedding_signature(), []).append(m.site.name)
        return {name: members for members in out.values() for name in members}

    def _average(self) -> dict[str, dict[str, Any]]:
        """FedAvg: average backbones over all sites and embeddings within each group; return the
        bytes each site sent and received."""
        weights = [float(len(m.site.data.train)) for m in self.members]
        backbone = average_state_dicts([m.coordinator.backbone.state_dict() for m in self.members], weights)
        for m in self.members:
            m.coordinator.backbone.load_state_dict(backbone)
        groups = self.groups()
        by_name = {m.site.name: m for m in self.members}
        done: set[str] = set()
        for name, members in groups.items():
            if name in done or len(members) < 2:
                continue
            states = [by_name[n].site.model.embedding.state_dict() for n in members]  # type: ignore[union-attr]
            avg = average_state_dicts(states, [float(len(by_name[n].site.data.train)) for n in members])
            for n in members:
                by_name[n].site.model.embedding.load_state_dict(avg)  # type: ignore[union-attr]
            done.update(members)
        out: dict[str, dict[str, Any]] = {}
        for m in self.members:
            bb = float_state_bytes(m.coordinator.backbone)
            emb = float_state_bytes(m.site.model.embedding)  # type: ignore[union-attr]
            shared = len(groups[m.site.name]) >= 2
            out[m.site.name] = {
                "bytes_sent": bb + emb,
                "bytes_received": bb + (emb if shared else 0),
                "bytes_detail": {"sent": {"backbone": bb, "embedding": emb},
                                 "received": {"backbone": bb, "embedding": emb if shared else 0}},
            }
        return out

    def run(self, on_round: OnRound | None = None) -> dict[str, Any]:
        cfg = self.cfg
        for rnd in range(cfg.rounds):
            t0 = time.perf_counter()
            for i in range(cfg.steps_per_round):
                step = rnd * cfg.steps_per_round + i
                for m in self.members:
                    m.site.train_step(rnd, step, i)
            losses = {}
            for m in self.members:
                losses[m.site.name] = m.site.end_round(rnd, {}, share_embedding=False)
                m.site.sync_round(rnd)
            comm = self._average() if self.fedavg else {}
            step = (rnd + 1) * cfg.steps_per_round - 1
            sites: dict[str, Any] = {}
            for m in self.members:
                name = m.site.name
                traffic = comm.get(name, {"bytes_sent": 0, "bytes_received": 0})
                sites[name] = {**losses[name], **m.site.evaluate(rnd, step), **traffic}
            record = {"round": rnd, "sites": sites, "seconds": time.perf_counter() - t0}
            self.results["rounds"].append(record)
            if on_round is not None:
                on_round(record)
        self.results["final"] = _final(self.results["rounds"])
        return self.results

    # for tests and the report
    def backbone_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {m.site.name: m.coordinator.backbone.state_dict() for m in self.members}


class Centralised:
    """Multi-task training on pooled data: one backbone, every site's layers, one optimizer."""

    def __init__(self, cfg: ExperimentConfig, data: dict[str, SiteData]) -> None:
        self.cfg = cfg
        self.run_id = f"{cfg.name}-central-s{cfg.seed}-{config_hash(cfg)[:10]}"
        # The coordinator holds the backbone (initialised exactly as in the other methods) and
        # serves evaluation forwards; training below does not use its step protocol.
        self.coordinator = Coordinator(_private_server(cfg), run_id=self.run_id, seed=cfg.seed, embedding_fedavg=False)
        self.sites = [
            SiteRuntime(s, InProcessTransport(self.coordinator), data[s.name], seed=derive_seed(cfg.seed, s.name))
            for s in cfg.sites
        ]
        for site in self.sites:
            site.join()
        o = cfg.server.optimizer
        groups: list[dict[str, Any]] = [
            {"params": list(self.coordinator.backbone.parameters()), "lr": o.lr, "weight_decay": o.weight_decay}
        ]
        for s, site in zip(cfg.sites, self.sites, strict=True):
            groups.append({"params": list(site.model.parameters()),  # type: ignore[union-attr]
                           "lr": s.train.lr, "weight_decay": s.train.weight_decay})
        if o.name == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr)
        self.samples_seen = {site.name: 0 for site in self.sites}
        self.results: dict[str, Any] = {
            "method": "central",
            "experiment": cfg.name,
            "run_id": self.run_id,
            "seed": cfg.seed,
            "sites": {site.name: site.describe() for site in self.sites},
            "backbone_parameters": self.coordinator.num_params,
            "rounds": [],
        }

    def _batch(self, site: SiteRuntime, rnd: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this site would draw at (round, step) in every other method."""
        x, y = site.data.train.batch(site.batch_index(rnd, i))
        if site.data.augment is not None:
            seed = derive_seed(site.seed, "augment", site.name, rnd, i) % 2**31
            x, y = augment_batch(site.data.augment, site.cfg.task, x, y, seed)
        return x, y

    def train_step(self, rnd: int, i: int) -> dict[str, float]:
        backbone = self.coordinator.backbone
        backbone.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = {}
        for site in self.sites:  # sum of the task losses; back-propagated site by site (same gradient)
            model = site.model
            assert model is not None
            model.train()
            x, y = self._batch(site, rnd, i)
            z = model.embed(x)
            loss = site.loss_fn(model.top(backbone(z), z, (x.shape[-2], x.shape[-1])), y)
            loss.backward()
            losses[site.name] = float(loss.detach())
            self.samples_seen[site.name] += int(x.shape[0])
        self.optimizer.step()
        return losses

    def run(self, on_round: OnRound | None = None) -> dict[str, Any]:
        cfg = self.cfg
        for rnd in range(cfg.rounds):
            t0 = time.perf_counter()
            round_losses: dict[str, list[float]] = {site.name: [] for site in self.sites}
            for i in range(cfg.steps_per_round):
                for name, loss in self.train_step(rnd, i).items():
                    round_losses[name].append(loss)
            step = (rnd + 1) * cfg.steps_per_round - 1
            sites = {}
            for site in self.sites:
                ls = round_losses[site.name]
                sites[site.name] = {"train_loss": sum(ls) / len(ls), **site.evaluate(rnd, step)}
            record = {"round": rnd, "sites": sites, "seconds": time.perf_counter() - t0}
            self.results["rounds"].append(record)
            if on_round is not None:
                on_round(record)
        self.results["samples_seen"] = dict(self.samples_seen)
        self.results["final"] = _final(self.results["rounds"])
        return self.results
