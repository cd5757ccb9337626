"""The step cadence's gradient slots (the paper's Algorithm 1): one row per site of a (K, P) matrix.

Each member's backbone gradient for the current step goes into its own row, in site-name order
(never arrival order), so the aggregation sees the same matrix whichever transport delivered the
messages. The matrix is laid out once per membership and reused step after step; when the members
change mid-step, the rows already filled move to the new layout. Not thread-safe by itself: the
coordinator calls it with its lock held.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class SlotMatrix:
    def __init__(self, num_params: int, device: torch.device) -> None:
        self.num_params, self.device = num_params, device
        self.filled: dict[str, Tensor] = {}  # site -> its row, filled this step
        self._names: list[str] = []
        self._matrix = torch.empty(0)

    def __contains__(self, site: object) -> bool:
        return site in self.filled

    def __bool__(self) -> bool:
        return bool(self.filled)

    def __getitem__(self, site: str) -> Tensor:
        """``site``'s row of this step (flattened backbone gradient, parameter order)."""
        return self.filled[site]

    def put(self, site: str, members: Iterable[str], grads: Sequence[Tensor]) -> None:
        """Write ``site``'s gradient (one tensor per parameter) into its row; ``members``: the current members."""
        names = sorted(members)
        if names != self._names:  # membership changed: re-lay the rows already filled
            matrix = torch.empty(len(names), self.num_params, device=self.device)
            for i, n in enumerate(names):
                if n in self.filled:
                    matrix[i].copy_(self.filled[n])
            self._matrix, self._names = matrix, names
            self.filled = {n: matrix[i] for i, n in enumerate(names) if n in self.filled}
        row = self._matrix[names.index(site)]
        torch.cat([g.reshape(-1) for g in grads], out=row)  # one op: this is on the step's latency path
        self.filled[site] = row

    def stacked(self, names: Sequence[str]) -> Tensor:
        """The (K, P) rows of ``names`` (sorted), without a copy when they are the current layout."""
        if list(names) == self._names:
            return self._matrix
        return torch.stack([self.filled[s] for s in names])  # a site left mid-step

    def discard(self, site: str) -> None:
        self.filled.pop(site, None)

    def clear(self) -> None:
        """The step is over (aggregated or skipped): every row is free again."""
        self.filled.clear()
