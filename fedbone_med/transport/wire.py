"""Message <-> (canonical JSON, tensor list) codecs for the gRPC transport. No pickle anywhere.

Every gRPC payload is one sealed envelope (:mod:`fedbone_med.crypto.envelope`). The envelope carries
only float tensors, so the non-tensor part of a message (its *meta*: JoinRequest, JoinReply with the
CutSpec, RoundReport metrics, RoundSync, the StepHeader fields) is canonical JSON (sorted keys, no
whitespace, ASCII, no NaN literals) whose bytes travel as the frame's first tensor: a 1-D float16
tensor of byte values 0..255 (exact in float16; always finite, so the envelope's finiteness check
passes). The meta is thus encrypted and authenticated with the rest of the frame. Its ``"type"`` key
names the RPC, so a sealed frame cannot be replayed into a different RPC. Tensors (z, F, dF, dz, an
embedding state dict in the order of the names listed in the meta) follow the meta tensor.

Decoders are strict: exact key sets (unknown or missing keys are refused), exact types, bounded sizes.
Non-finite floats (e.g. the train loss of a round without steps) are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..config import DEFAULT_MAX_Z_SIDE, MAX_Z_SIDE_LIMIT
from ..crypto import _primitives as prim
from ..crypto.envelope import Expect, Session
from ..crypto.errors import InvalidMessage
from ..crypto.frame import MAX_HEADER_BYTES, PREFIX, FrameHeader, Kind
from ..errors import ProtocolError
from ..models.split import CutSpec
from .messages import JoinReply, JoinRequest, RoundReport, RoundSync, Schedule, StepHeader

MAX_META_BYTES = 1 << 20
MAX_NAME = 256
MAX_DEPTH = 32  # nesting of JSON arrays/objects in a meta (the messages need 4)
MAX_CUT_CHANNELS = 1 << 16  # channels of z or of a feature map a join reply may announce
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# RPC names, as the meta's "type"
TYPES = ("join", "join-reply", "forward", "features", "backward", "input-grad", "round-end", "ok",
         "round-sync", "round-sync-reply", "leave")


def ledger_tags(msg_type: str, round: int, mode: str = "train") -> tuple[int, int] | None:
    """The audit-ledger rounds (request, reply) of one exchange, the same at both ends.

    A round's ledger closes on the server when its last end-of-round report arrives, so everything
    exchanged after that point for round r (the reply to that report, the round sync, validation
    forwards) is booked under round r + 1 at both ends. Join and leave are not booked (they are
    audit events of their own).
    """
    if msg_type in ("forward", "backward"):
        tag = round if mode == "train" else round + 1
        return tag, tag
    if msg_type == "round-end":
        return round, round + 1
    if msg_type == "round-sync":
        return round + 1, round + 1
    return None


def leave_privacy(privacy: Mapping[str, Any] | None) -> tuple[float | None, float | None] | None:
    """(epsilon, delta) a leaving site reports from its privacy report, or None without one."""
    eps = privacy.get("epsilon") if privacy else None
    if privacy is None or eps is None:
        return None
    delta = privacy.get("delta")
    return float(eps), None if delta is None else float(delta)


def leave_privacy_from_wire(site: str, body: Any) -> tuple[float | None, float | None] | None:
    """A Leave request's optional body ``{"epsilon": float, "delta": float | null}``, checked."""
    if body is None:
        return None
    if not isinstance(body, dict) or set(body) != {"epsilon", "delta"}:
        raise ProtocolError(f"site {site!r}: a leave request carries only {{epsilon, delta}}")
    eps, delta = body["epsilon"], body["delta"]
    out: list[float | None] = []
    for name, v in (("epsilon", eps), ("delta", delta)):
        if v is None and name == "delta":
            out.append(None)
            continue
        x = _finite_number(v)
        if x is None or x < 0:
            raise ProtocolError(f"site {site!r}: leave request: {name} must be a finite non-negative number")
        out.append(x)
    return out[0], out[1]


def _finite_number(v: Any) -> float | None:
    """``v`` as a finite float, or None if it is not a number (bool included) or not finite as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)  # an integer beyond float range raises OverflowError
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def ledger_type(msg_type: str) -> str:
    return msg_type.replace("-", "_")


# -- canonical JSON ----------------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message cannot be encoded as canonical JSON: {exc}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"message: duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ProtocolError(f"message: JSON constant {name} is not allowed")


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > deepest:
                deepest = d
                if d > MAX_DEPTH:
                    break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_META_BYTES:
        raise ProtocolError("message: metadata too large")
    try:
        obj = json.loads(raw.decode("ascii"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError):  # ValueError includes integers above Python's digit limit
        raise ProtocolError("message: metadata is not valid canonical JSON") from None
    except RecursionError:
        raise ProtocolError(f"message: metadata nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message: metadata must be a JSON object")
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:  # cheap test first
        raise ProtocolError(f"message: metadata nested deeper than {MAX_DEPTH} levels")
    return obj


def meta_tensor(meta: dict[str, Any]) -> Tensor:
    raw = canonical_json(meta)
    if len(raw) > MAX_META_BYTES:
        raise ProtocolError("message: metadata too large")
    return torch.tensor(list(raw), dtype=torch.float16)


def meta_from_tensor(t: Tensor) -> dict[str, Any]:
    if t.dtype != torch.float16 or t.dim() != 1 or t.numel() > MAX_META_BYTES:
        raise ProtocolError("message: metadata tensor has the wrong dtype or shape")
    v = t.to(torch.int32)
    if not bool((v.to(torch.float16) == t).all()) or bool((v < 0).any()) or bool((v > 255).any()):
        raise ProtocolError("message: metadata tensor is not a byte string")
    return parse_json(bytes(v.to(torch.uint8).tolist()))


# -- strict field readers ------------------------------------------------------------------------
def check_keys(d: dict[str, Any], required: set[str], what: str, optional: frozenset[str] = frozenset()) -> None:
    keys = set(d)
    missing, unknown = required - keys, keys - required - optional
    if missing or unknown:
        raise ProtocolError(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")


def get_str(d: dict[str, Any], k: str, what: str) -> str:
    v = d[k]
    if not isinstance(v, str) or len(v) > MAX_NAME:
        raise ProtocolError(f"{what}: {k!r} must be a string of at most {MAX_NAME} characters")
    return v


def get_int(d: dict[str, Any], k: str, what: str, lo: int = 0) -> int:
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v > 2**63 - 1:
        raise ProtocolError(f"{what}: {k!r} must be an integer >= {lo}")
    return v


def _float_out(x: float) -> float | str:
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _float_in(v: Any, what: str) -> float:
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    x = _finite_number(v)
    if x is None:  # JSON floats are finite; an integer beyond float range is not a float
        raise ProtocolError(f"{what}: expected a number within float range (or \"NaN\", \"Infinity\", \"-Infinity\")")
    return x


def _float_map(d: Any, what: str) -> dict[str, float]:
    if not isinstance(d, dict) or len(d) > 1024:
        raise ProtocolError(f"{what}: expected an object of at most 1024 numbers")
    out = {}
    for k, v in d.items():
        if len(k) > MAX_NAME:
            raise ProtocolError(f"{what}: key too long")
        out[k] = _float_in(v, f"{what}[{k!r}]")
    return out


def _names(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > 4096 or not all(isinstance(s, str) and 0 < len(s) <= MAX_NAME for s in v):
        raise ProtocolError(f"{what}: expected a list of names")
    if len(set(v)) != len(v):
        raise ProtocolError(f"{what}: duplicate names")
    return v


# -- messages ----------------------------------------------------------------------------------
def step_to_json(h: StepHeader) -> dict[str, Any]:
    return {"run_id": h.run_id, "site": h.site, "round": h.round, "step": h.step, "sequence": h.sequence,
            "mode": h.mode}


def step_from_json(d: Any) -> StepHeader:
    what = "step header"
    if not isinstance(d, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(d, {"run_id", "site", "round", "step", "sequence", "mode"}, what)
    mode = d["mode"]
    if mode not in ("train", "eval"):
        raise ProtocolError(f"{what}: mode must be 'train' or 'eval'")
    return StepHeader(get_str(d, "run_id", what), get_str(d, "site", what), get_int(d, "round", what),
                      get_int(d, "step", what), get_int(d, "sequence", what), mode)


def join_request_to_json(r: JoinRequest) -> dict[str, Any]:
    return {"site": r.site, "modality": r.modality, "task_type": r.task_type, "num_train": r.num_train,
            "software_version": r.software_version}


def join_request_from_json(d: Any) -> JoinRequest:
    what = "join request"
    if not isinstance(d, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(d, {"site", "modality", "task_type", "num_train", "software_version"}, what)
    return JoinRequest(get_str(d, "site", what), get_str(d, "modality", what), get_str(d, "task_type", what),
                       get_int(d, "num_train", what), get_str(d, "software_version", what))


def join_reply_to_json(r: JoinReply) -> dict[str, Any]:
    cut = r.cut
    sched = None if r.schedule is None else {
        "rounds": r.schedule.rounds, "steps_per_round": r.schedule.steps_per_round, "seed": r.schedule.seed,
        "embedding_fedavg": r.schedule.embedding_fedavg, "wire_dtype": r.schedule.wire_dtype,
    }
    return {"run_id": r.run_id, "round": r.round, "step": r.step, "config_hash": r.config_hash, "schedule": sched,
            "cut": {"z_channels": cut.z_channels, "feature_channels": list(cut.feature_channels),
                    "feature_strides": list(cut.feature_strides), "max_batch": cut.max_batch,
                    "max_side": cut.max_side}}


def _schedule_from_json(s: Any) -> Schedule | None:
    if s is None:
        return None
    what = "schedule"
    if not isinstance(s, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(s, {"rounds", "steps_per_round", "seed", "embedding_fedavg", "wire_dtype"}, what)
    if not isinstance(s["embedding_fedavg"], bool):
        raise ProtocolError(f"{what}: embedding_fedavg must be true or false")
    if not isinstance(s["wire_dtype"], str) or s["wire_dtype"] not in WIRE_DTYPES:
        raise ProtocolError(f"{what}: wire_dtype must be one of {', '.join(WIRE_DTYPES)}")
    return Schedule(get_int(s, "rounds", what, 1), get_int(s, "steps_per_round", what, 1), get_int(s, "seed", what),
                    s["embedding_fedavg"], s["wire_dtype"])


def _int_list(v: Any, what: str, hi: int) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 64 or not all(
        isinstance(x, int) and not isinstance(x, bool) and 0 < x <= hi for x in v
    ):
        raise ProtocolError(f"{what}: expected a list of at most 64 integers in 1..{hi}")
    return tuple(v)


def _bounded_int(d: dict[str, Any], k: str, what: str, lo: int, hi: int) -> int:
    v = get_int(d, k, what, lo)
    if v > hi:
        raise ProtocolError(f"{what}: {k!r} must be at most {hi}")
    return v


def join_reply_from_json(d: Any) -> JoinReply:
    what = "join reply"
    if not isinstance(d, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(d, {"run_id", "round", "step", "config_hash", "cut", "schedule"}, what)
    c = d["cut"]
    if not isinstance(c, dict):
        raise ProtocolError(f"{what}: cut must be an object")
    # max_side is optional: a server of an earlier version did not send it (its sites keep the default)
    check_keys(c, {"z_channels", "feature_channels", "feature_strides", "max_batch"}, "cut spec",
               optional=frozenset({"max_side"}))
    w = "cut spec"
    cut = CutSpec(_bounded_int(c, "z_channels", w, 1, MAX_CUT_CHANNELS),
                  _int_list(c["feature_channels"], f"{w}: feature_channels", MAX_CUT_CHANNELS),
                  _int_list(c["feature_strides"], f"{w}: feature_strides", MAX_Z_SIDE_LIMIT),
                  _bounded_int(c, "max_batch", w, 1, 2**31 - 1),
                  _bounded_int(c, "max_side", w, 1, MAX_Z_SIDE_LIMIT) if "max_side" in c else DEFAULT_MAX_Z_SIDE)
    if len(cut.feature_channels) != len(cut.feature_strides):
        raise ProtocolError("cut spec: feature_channels and feature_strides differ in length")
    return JoinReply(get_str(d, "run_id", what), cut, get_int(d, "round", what), get_int(d, "step", what),
                     get_str(d, "config_hash", what), _schedule_from_json(d["schedule"]))


def _state_to_wire(state: dict[str, Tensor] | None) -> tuple[list[str] | None, list[Tensor]]:
    if state is None:
        return None, []
    names = sorted(state)
    return names, [state[n] for n in names]


def _state_from_wire(names: Any, tensors: list[Tensor], what: str) -> dict[str, Tensor] | None:
    if names is None:
        if tensors:
            raise ProtocolError(f"{what}: tensors without names")
        return None
    names = _names(names, what)
    if len(names) != len(tensors):
        raise ProtocolError(f"{what}: {len(names)} names for {len(tensors)} tensors")
    return dict(zip(names, tensors, strict=True))


def round_report_to_wire(r: RoundReport) -> tuple[dict[str, Any], list[Tensor]]:
    names, tensors = _state_to_wire(r.embedding)
    meta = {"site": r.site, "round": r.round, "samples": r.samples, "train_loss": _float_out(r.train_loss),
            "metrics": {k: _float_out(v) for k, v in r.metrics.items()},
            "extra": {k: _float_out(v) for k, v in r.extra.items()},
            "embedding": names, "embedding_signature": r.embedding_signature}
    return meta, tensors


def round_report_from_wire(d: Any, tensors: list[Tensor]) -> RoundReport:
    what = "round report"
    if not isinstance(d, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(d, {"site", "round", "samples", "train_loss", "metrics", "extra", "embedding",
                   "embedding_signature"}, what)
    sig = d["embedding_signature"]
    if sig is not None:
        sig = get_str(d, "embedding_signature", what)
    return RoundReport(get_str(d, "site", what), get_int(d, "round", what), get_int(d, "samples", what),
                       _float_in(d["train_loss"], f"{what}: train_loss"), _float_map(d["metrics"], f"{what}: metrics"),
                       _state_from_wire(d["embedding"], tensors, f"{what}: embedding"), sig,
                       _float_map(d["extra"], f"{what}: extra"))


def round_sync_to_wire(s: RoundSync) -> tuple[dict[str, Any], list[Tensor]]:
    names, tensors = _state_to_wire(s.embedding)
    return {"round": s.round, "group": list(s.group), "embedding": names}, tensors


def round_sync_from_wire(d: Any, tensors: list[Tensor]) -> RoundSync:
    what = "round sync"
    if not isinstance(d, dict):
        raise ProtocolError(f"{what}: expected an object")
    check_keys(d, {"round", "group", "embedding"}, what)
    return RoundSync(get_int(d, "round", what), _state_from_wire(d["embedding"], tensors, f"{what}: embedding"),
                     tuple(_names(d["group"], f"{what}: group")))


# -- sealed frames -----------------------------------------------------------------------------
# The envelope's frame kinds are fixed (forward, features, backward, input-grad); control messages
# ride on the kind of their direction and are told apart by the authenticated meta "type".
KIND_OF: dict[str, Kind] = {
    "join": "forward", "forward": "forward", "round-end": "forward", "round-sync": "forward", "leave": "forward",
    "backward": "backward",
    "join-reply": "features", "features": "features", "ok": "features", "round-sync-reply": "features",
    "input-grad": "input-grad",
}


WIRE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def seal_message(session: Session, type_: str, body: Any, tensors: list[Tensor], *, round: int = 0,
                 step: int = 0, wire_dtype: torch.dtype | None = None) -> bytes:
    """Seal ``{"type", "body"}`` as the meta tensor followed by ``tensors``.

    ``wire_dtype`` (float16 / bfloat16) halves the bytes of float32 tensors; the receiver gets them back
    as float32. The meta tensor (byte values 0..255) is exact in both.
    """
    header = FrameHeader(run_id=session.run_id, round=round, step=step, site=session.site, kind=KIND_OF[type_])
    return session.seal(header, [meta_tensor({"type": type_, "body": body}), *tensors], wire_dtype=wire_dtype)


# -- frame limits per request type (the server's side) ------------------------------------------
# A sealed frame is the prefix, the header, the payload (the meta tensor, 2 bytes a JSON byte as
# float16, then the tensors) and the tag. A request's payload is bounded by what a valid request of
# its type can carry: z of at most (max_batch, z_channels, max_side, max_side) float32 values for a
# forward, the feature gradients of that z for a backward, the metrics and an embedding for a round
# end, metadata only for the rest. Checked on the blob's length before it is decrypted (and, for a
# streamed frame, before it is buffered), so no larger frame costs the server more than its bytes.
FRAME_OVERHEAD = PREFIX.size + MAX_HEADER_BYTES + prim.GCM_TAG_BYTES
STEP_META_BYTES = 8 << 10  # JSON of a forward / backward meta (a step header: under 1 KiB with ASCII names)
MAX_EMBEDDING_BYTES = 64 << 20  # the embedding weights a round-end report carries for FedAvg


def request_frame_limits(cut: CutSpec, max_frame_bytes: int) -> dict[str, int]:
    """The largest sealed frame (bytes) the server accepts per request type; ``max_frame_bytes`` caps the payload."""
    payload = {
        "forward": 2 * STEP_META_BYTES + cut.max_z_bytes(),
        "backward": 2 * STEP_META_BYTES + cut.max_feature_bytes(),
        "round-end": 2 * MAX_META_BYTES + MAX_EMBEDDING_BYTES,
        "join": 2 * MAX_META_BYTES, "round-sync": 2 * MAX_META_BYTES, "leave": 2 * MAX_META_BYTES,
    }
    return {t: FRAME_OVERHEAD + min(n, max_frame_bytes) for t, n in payload.items()}


def frame_limit_hint(type_: str) -> str:
    """What sets the frame limit of ``type_`` (for error messages)."""
    if type_ in ("forward", "backward"):
        return "derived from server.max_batch, server.max_z_side and the backbone's cut; capped by network.max_frame_mb"
    if type_ == "round-end":
        return f"metadata and an embedding of at most {MAX_EMBEDDING_BYTES >> 20} MiB"
    return f"metadata only: at most {MAX_META_BYTES >> 20} MiB of JSON"


def open_message(session: Session, blob: bytes, type_: str, *, round: int | None = None,
                 step: int | None = None, max_bytes: int | None = None) -> tuple[FrameHeader, Any, list[Tensor]]:
    """Open a sealed message of ``type_``; raises :class:`InvalidMessage` or :class:`ProtocolError`.

    ``max_bytes`` (see :func:`request_frame_limits`) refuses a longer blob before it is decrypted.
    """
    if max_bytes is not None and len(blob) > max_bytes:
        raise InvalidMessage("too-large", f"a {type_} frame of {len(blob)} bytes is above its limit of {max_bytes} "
                                          f"bytes ({frame_limit_hint(type_)})")
    header, tensors = session.open(blob, Expect(kind=KIND_OF[type_], round=round, step=step))
    if not tensors:
        raise InvalidMessage("unexpected", "no metadata")
    meta = meta_from_tensor(tensors[0])
    check_keys(meta, {"type", "body"}, "message")
    if meta["type"] != type_:
        raise InvalidMessage("unexpected", "wrong message type")
    return header, meta["body"], tensors[1:]
