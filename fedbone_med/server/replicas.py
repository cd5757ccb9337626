"""The round cadence (the FedBone paper's Figure 2): one replica of the backbone per site.

"For each client, the cloud server maintains a distinct general model, which is updated during
every client's mini-batch. When all clients finish a local training epoch, the cloud server
aggregates these general models to finalize one communication round." (``../shared/PAPER.md``)

:class:`ReplicaSet` keeps, per site, a copy of the backbone and its own optimizer (built from
``[server.optimizer]``; the paper uses SGD). A site's forward and backward run on its replica
under that replica's own lock -- never under the coordinator's lock -- so sites do not wait for
each other inside a round; the backward steps the replica's optimizer at once. At the round's
end the coordinator takes the replicas' updates u_k = theta_k - theta (``updates``), aggregates
them, moves the global backbone, and every replica restarts from it (``restart``). A replica's
optimizer state (momentum, Adam moments) carries over from round to round, as a site training
alone would keep it; a site that leaves or is dropped mid-round gets the state it had at the
round's start back (``discard``), so an abandoned attempt leaves no trace in the next one.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..config import OptimizerConfig
from ..optim import build_optimizer


@dataclass
class _Replica:
    module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: int = 0  # optimizer steps taken in the current round
    start_state: dict[str, Any] | None = None  # the optimizer's state at the round's start


class ReplicaSet:
    """Per-site replicas of ``backbone`` (see the module docstring). Thread-safe per site."""

    def __init__(self, backbone: nn.Module, optimizer: OptimizerConfig) -> None:
        self._backbone = backbone  # the global backbone: replicas are created from and restarted to it
        self._optimizer = optimizer
        self._replicas: dict[str, _Replica] = {}
        self._lock = threading.Lock()  # guards the dict only

    def _get(self, site: str) -> _Replica:
        with self._lock:
            rep = self._replicas.get(site)
            if rep is None:
                module = copy.deepcopy(self._backbone)
                params = [p for p in module.parameters() if p.requires_grad]
                o = self._optimizer
                rep = _Replica(module, params, build_optimizer(o.name, params, o.lr, o.weight_decay, o.momentum))
                rep.start_state = copy.deepcopy(rep.optimizer.state_dict())
                self._replicas[site] = rep
            return rep

    def forward(self, site: str, z_leaf: Tensor, rng: Callable[[], contextlib.AbstractContextManager[None]]
                ) -> list[Tensor]:
        """The site's replica on ``z_leaf`` in training mode (the graph is kept for :meth:`backward`)."""
        rep = self._get(site)
        with rep.lock, rng():
            rep.module.train()
            return list(rep.module(z_leaf))

    def backward(self, site: str, feats: Sequence[Tensor], grads: Sequence[Tensor], z_leaf: Tensor) -> Tensor:
        """Back-propagate the site's dF through its replica, step the replica's optimizer; return dz."""
        rep = self._get(site)
        with rep.lock:
            out = torch.autograd.grad(list(feats), [*rep.params, z_leaf], grad_outputs=list(grads))
            for p, g in zip(rep.params, out[:-1], strict=True):
                p.grad = g
            rep.optimizer.step()
            rep.optimizer.zero_grad(set_to_none=True)
            rep.steps += 1
            return out[-1].detach()

    def stepped(self) -> list[str]:
        """The sites whose replica took at least one step in the current round."""
        with self._lock:
            return sorted(n for n, r in self._replicas.items() if r.steps)

    def updates(self, sites: Sequence[str], global_params: Sequence[Tensor]) -> Tensor:
        """The (K, P) matrix of u_k = theta_k - theta, rows in the order of ``sites``."""
        flat = torch.cat([p.detach().reshape(-1) for p in global_params])
        out = torch.empty(len(sites), flat.numel(), dtype=flat.dtype, device=flat.device)
        for i, name in enumerate(sites):
            rep = self._get(name)
            with rep.lock:
                torch.cat([p.detach().reshape(-1) for p in rep.params], out=out[i])
            out[i].sub_(flat)
        return out

    def restart(self) -> None:
        """Every replica back to the global backbone; the optimizer states are the new rounds' start."""
        with torch.no_grad():
            source = [p for p in self._backbone.parameters() if p.requires_grad]
            with self._lock:
                replicas = list(self._replicas.values())
            for rep in replicas:
                with rep.lock:
                    for dst, src in zip(rep.params, source, strict=True):
                        dst.copy_(src)
                    rep.steps = 0
                    rep.start_state = copy.deepcopy(rep.optimizer.state_dict())

    def discard(self, site: str) -> None:
        """A site left or was dropped mid-round: its replica's round does not count; its optimizer state
        goes back to the round's start (the parameters restart with everyone's at the round's end)."""
        with self._lock:
            rep = self._replicas.get(site)
        if rep is None:
            return
        with rep.lock:
            if rep.steps and rep.start_state is not None:
                rep.optimizer.load_state_dict(copy.deepcopy(rep.start_state))
            rep.steps = 0

    # -- checkpoints: at a round boundary every replica equals the global backbone ----------------
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {name: rep.optimizer.state_dict() for name, rep in sorted(self._replicas.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt_state in state.items():
            rep = self._get(name)
            rep.optimizer.load_state_dict(opt_state)
            rep.start_state = copy.deepcopy(rep.optimizer.state_dict())
        self.restart()


@contextlib.contextmanager
def no_rng() -> Iterator[None]:
    yield
