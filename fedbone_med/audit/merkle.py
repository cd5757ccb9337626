"""RFC 6962 / RFC 9162 Merkle tree over an audit log's lines, with inclusion and consistency proofs.

Protects an auditor who holds only *part* of the evidence: with a signed checkpoint (which
carries ``merkle_root``, the Merkle tree hash of the ``count`` lines before it) and a short
proof, one can check that a single record is in the log (inclusion proof: ~log2(n) hashes,
without the other records) and that a later signed log extends an earlier one without
rewriting it (consistency proof), e.g. that a copy of checkpoint ``m`` kept by a site is a
prefix of the log presented years later -- which also detects truncation back to an earlier
checkpoint when the later checkpoint is held by someone else.

Hashes (RFC 6962 section 2.1): leaf = SHA-256(0x00 || line bytes without the newline),
node = SHA-256(0x01 || left || right); the tree of ``n`` leaves splits at the largest power
of two smaller than ``n``; the empty tree's hash is SHA-256 of nothing. Proof verification
follows RFC 9162 sections 2.1.3.2 and 2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(line: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + line).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleAccumulator:
    """Incremental tree hash: O(log n) memory, ``root()`` of all leaves appended so far."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (size, root) of perfect subtrees, sizes decreasing
        self.size = 0

    def append(self, leaf: bytes) -> None:
        # Built aside and swapped in with one statement: an exception (e.g. KeyboardInterrupt)
        # in the middle leaves the accumulator as it was, never half-updated.
        stack = list(self._stack)
        size, node = 1, leaf
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            node, size = node_hash(left, node), size + left_size
        stack.append((size, node))
        self._stack, self.size = stack, self.size + 1

    def add_line(self, line: bytes) -> None:
        self.append(leaf_hash(line))

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def tree_root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of leaf hashes (RFC 6962 section 2.1)."""
    acc = MerkleAccumulator()
    for leaf in leaves:
        acc.append(leaf)
    return acc.root()


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None) -> list[bytes]:
    """PATH(index, D[size]): the audit path of leaf ``index`` in the tree of the first ``size`` leaves."""
    n = len(leaves) if size is None else size
    if not 0 <= index < n <= len(leaves):
        raise ValueError(f"inclusion proof: need 0 <= index < size <= {len(leaves)}")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        if hi - lo == 1:
            return []
        k = _split(hi - lo)
        if m < k:
            return path(m, lo, lo + k) + [tree_root(leaves[lo + k:hi])]
        return path(m - k, lo + k, hi) + [tree_root(leaves[lo:lo + k])]

    return path(index, 0, n)


def consistency_proof(leaves: Sequence[bytes], old_size: int, new_size: int | None = None) -> list[bytes]:
    """PROOF(old_size, D[new_size]) (RFC 6962 section 2.1.2)."""
    n = len(leaves) if new_size is None else new_size
    if not 0 < old_size <= n <= len(leaves):
        raise ValueError(f"consistency proof: need 0 < old_size <= new_size <= {len(leaves)}")

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if complete else [tree_root(leaves[lo:hi])]
        k = _split(hi - lo)
        if m <= k:
            return subproof(m, lo, lo + k, complete) + [tree_root(leaves[lo + k:hi])]
        return subproof(m - k, lo + k, hi, False) + [tree_root(leaves[lo:lo + k])]

    return subproof(old_size, 0, n, True)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2."""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
