"""Site, server and experiment configuration (typed, data only, unknown keys rejected).

A site administrator edits ``sites/NAME.toml``; a researcher composes sites into an
experiment in ``pipelines/NAME.toml``. Both are TOML parsed by
:func:`fedbone_med.configtools.from_mapping`; nothing in a configuration is executed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .configtools import deep_merge, from_mapping, read_toml
from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _positive(name: str, value: float | int | None) -> list[str]:
    return [] if value is None or value > 0 else [f"{name}: must be > 0, got {value}"]


@dataclass(frozen=True)
class DataConfig:
    """Where a site's images and labels come from.

    ``source = "phantom"`` generates the project's synthetic fundus/OCT images, so every
    command runs without data; ``task`` names what the labels are (see
    :mod:`fedbone_med.data.sources`). ``source = "manifest"`` reads real files described
    by ``manifest`` (a dataset manifest) through ``pipeline`` (a transform chain); both
    paths are relative to the site file, and the dataset's own root is relative to
    ``$FEDBONE_DATA_ROOT`` (default ``../shared/data`` beside the checkout). Every image
    is finally resized to ``image_size`` x ``image_size``.
    """

    source: Literal["phantom", "manifest"] = "phantom"
    task: str = "dr_grade"
    image_size: int = 64
    n_train: int = 256
    n_val: int = 64
    seed: int = 0
    manifest: str | None = None
    pipeline: str | None = None
    augment: str | None = None  # a transform chain applied to each training sample at batch time
    val_split: str = "val"
    # Leave out (and count, in the run's split record and every round's results) samples whose
    # files fail to read or whose listing is broken (a missing mask, a labels-CSV row naming a
    # missing file or an unknown class), with check-data's reason, instead of stopping at the
    # first. Structural problems (an empty folder or split, an unusable labels or split file)
    # still stop the run. Off: any bad file stops the run.
    skip_bad_files: bool = False

    def validate(self) -> list[str]:
        out = []
        if self.image_size < 16:
            out.append(f"image_size: must be >= 16, got {self.image_size}")
        out += _positive("n_train", self.n_train) + _positive("n_val", self.n_val)
        if self.source == "manifest" and self.manifest is None:
            out.append("manifest: a 'manifest' source needs manifest = 'PATH' (a dataset manifest)")
        return out


@dataclass(frozen=True)
class TaskConfig:
    """What the site's head predicts and how it is scored.

    classification: ``num_classes`` classes, ``ordinal`` for graded labels (DR grade).
    segmentation: ``mode`` binary (one foreground channel, ``num_classes = 1``),
    multilabel (``num_classes`` independent channels) or multiclass (``num_classes``
    mutually exclusive classes including background).
    """

    type: Literal["classification", "segmentation"]
    num_classes: int
    ordinal: bool = False
    mode: Literal["multiclass", "binary", "multilabel"] = "multiclass"

    def validate(self) -> list[str]:
        out = []
        if self.type == "classification":
            if self.num_classes < 2:
                out.append(f"num_classes: a classifier needs >= 2 classes, got {self.num_classes}")
            if self.ordinal and self.num_classes < 3:
                out.append("ordinal: an ordinal head needs >= 3 ordered classes")
        else:
            if self.ordinal:
                out.append("ordinal: only classification tasks can be ordinal")
            if self.mode == "binary" and self.num_classes != 1:
                out.append(f"num_classes: binary segmentation has 1 foreground channel, got {self.num_classes}")
            if self.mode == "multiclass" and self.num_classes < 2:
                out.append("num_classes: multiclass segmentation needs >= 2 classes (background included)")
            if self.mode == "multilabel" and self.num_classes < 1:
                out.append("num_classes: multilabel segmentation needs >= 1 channel")
        return out


@dataclass(frozen=True)
class ModelConfig:
    """The site's own layers: embedding below the cut, adaptation module and head above it."""

    embedding: str = "conv-stem"
    stride: int = 2
    embed_dim: int | None = None  # None: use the server backbone's input width, told at join
    adaptation: str = "task-attention"
    adapt_dim: int = 64
    adapt_heads: int = 4
    head: str = "classification"

    def validate(self) -> list[str]:
        out = []
        if self.stride not in (1, 2, 4, 8):
            out.append(f"stride: must be 1, 2, 4 or 8, got {self.stride}")
        out += _positive("embed_dim", self.embed_dim) + _positive("adapt_dim", self.adapt_dim)
        if self.adapt_heads < 1 or self.adapt_dim % self.adapt_heads:
            out.append(f"adapt_heads: must divide adapt_dim ({self.adapt_dim}), got {self.adapt_heads}")
        return out


@dataclass(frozen=True)
class TrainConfig:
    """Site-side optimisation."""

    batch_size: int = 16
    eval_batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "cpu"

    def validate(self) -> list[str]:
        return (
            _positive("batch_size", self.batch_size)
            + _positive("eval_batch_size", self.eval_batch_size)
            + _positive("lr", self.lr)
            + _device_problems(self.device)
        )


def _device_problems(device: str) -> list[str]:
    if re.fullmatch(r"cpu|cuda(:\d+)?|mps|auto", device):
        return []
    return [f"device: must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {device!r}"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy for what leaves the site (see ``fedbone_med/privacy``).

    Give either ``target_epsilon`` (sigma is calibrated for the planned number of steps) or an
    explicit ``noise_multiplier``. ``epsilon_budget`` (default: the target) is enforced: a
    message whose accounting would exceed it is never sent; the site stops instead. ``delta``
    defaults to 1 / (10 N) for the site's N training records. ``secure_mode`` draws noise
    from a cryptographically seeded source and cannot be reproduced by a seed.
    """

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    epsilon_budget: float | None = None
    validation_epsilon_budget: float | None = None  # validation records' own budget; default: epsilon_budget
    delta: float | None = None
    activation_dp: bool = True
    activation_clip: float = 1.0
    label_dp: bool = True
    label_clip: float = 1.0
    dpsgd: bool = False  # DP-SGD (Opacus) on the site's own layers: embedding, adaptation, head
    dpsgd_clip: float = 1.0
    secure_mode: bool = False
    accountant: Literal["rdp", "prv"] = "rdp"

    def validate(self) -> list[str]:
        out = _positive("target_epsilon", self.target_epsilon) + _positive("noise_multiplier", self.noise_multiplier)
        out += _positive("epsilon_budget", self.epsilon_budget) + _positive("activation_clip", self.activation_clip)
        out += _positive("label_clip", self.label_clip) + _positive("dpsgd_clip", self.dpsgd_clip)
        if self.enabled:
            if (self.target_epsilon is None) == (self.noise_multiplier is None):
                out.append("target_epsilon/noise_multiplier: give exactly one of them when privacy is enabled")
            if self.target_epsilon is None and self.epsilon_budget is None:
                out.append("epsilon_budget: an explicit noise_multiplier needs an epsilon_budget to enforce")
            if not (self.activation_dp or self.label_dp or self.dpsgd):
                out.append("activation_dp/label_dp/dpsgd: privacy is enabled but no mechanism is on")
        return out


@dataclass(frozen=True)
class SiteConfig:
    """One hospital site: its data, its task, its own layers and how it trains them."""

    name: str
    modality: Literal["fundus", "oct"]
    data: DataConfig
    task: TaskConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> list[str]:
        if not _NAME.match(self.name):
            return [f"name: {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'"]
        return []


@dataclass(frozen=True)
class BackboneConfig:
    """The server's general model. Fields left unset take the named preset's values."""

    name: str = "swin-tiny"
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    window_size: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float = 0.0
    use_checkpoint: bool = False

    def validate(self) -> list[str]:
        out = _positive("embed_dim", self.embed_dim) + _positive("window_size", self.window_size)
        if self.depths is not None and self.num_heads is not None and len(self.depths) != len(self.num_heads):
            out.append("depths/num_heads: must have the same length")
        if not 0.0 <= self.drop_path_rate < 1.0:
            out.append(f"drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")
        return out


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    momentum: float = 0.9

    def validate(self) -> list[str]:
        return _positive("lr", self.lr)


@dataclass(frozen=True)
class AggregationConfig:
    """How the server combines the sites' backbone gradients (or updates) and when the backbone steps.

    ``method``: ``gpaggregation`` (the paper's Algorithm 2: attention to the previous aggregate,
    fixed-order projection, mean), ``pcgrad`` (conflicting-gradient projection in a seeded random
    order; ``projection`` is its older name), ``mean`` or ``sum``.
    ``cadence``: ``step`` (the paper's Algorithm 1: one backbone, every site's gradient of a step
    aggregated, then one optimizer step) or ``round`` (the paper's Figure 2: one replica of the
    backbone per site, stepped by ``[server.optimizer]`` on each of that site's mini-batches; at the
    round's end the replicas' updates u_k = theta_k - theta are aggregated and the global backbone
    moves by ``server_lr`` times the aggregate: theta <- theta + server_lr * u, i.e. plain SGD on the
    pseudo-gradient -u; every replica then restarts from the new theta).
    ``attention_temperature``: the d in GPAggregation's softmax(g_k . g' / d); default the number of
    backbone parameters (the paper's reading).
    ``project_every``: with a projecting method, project on every n-th aggregation and take the
    plain reduction on the others (1: every time, as in the paper).
    """

    method: str = "projection"
    reduction: Literal["mean", "sum"] = "mean"
    project_every: int = 1
    cadence: Literal["step", "round"] = "step"
    server_lr: float = 1.0
    attention_temperature: float | None = None

    def validate(self) -> list[str]:
        from .aggregation import available_aggregators  # here: the registry imports torch

        out = _positive("project_every", self.project_every) + _positive("server_lr", self.server_lr)
        known = available_aggregators()
        if self.method not in known:
            out.append(f"method: unknown aggregation method {self.method!r}; known: {', '.join(known)}")
        if self.method == "gpaggregation" and self.reduction != "mean":
            out.append("reduction: gpaggregation takes the mean of the projected gradients (Algorithm 2); "
                       "reduction = \"sum\" applies to pcgrad only")
        if self.project_every != 1 and self.method not in ("projection", "pcgrad", "gpaggregation"):
            out.append(f"project_every: only applies to a projecting method (method is {self.method!r}); "
                       "remove it or set it to 1")
        if self.attention_temperature is not None and not self.attention_temperature > 0:
            out.append(f"attention_temperature: must be positive, got {self.attention_temperature}")
        if self.server_lr != 1.0 and self.cadence != "round":
            out.append("server_lr: only applies to cadence = \"round\" (the step cadence steps the backbone with "
                       "[server.optimizer]); remove it")
        return out


DEFAULT_MAX_BATCH = 4096
DEFAULT_MAX_Z_SIDE = 256  # z of a 1024 px image at stride 4, or of 512 px at stride 2
MAX_Z_SIDE_LIMIT = 1 << 15


def z_side(image_size: int, stride: int) -> int:
    """Height and width of z at the cut for a square image of ``image_size`` px and an embedding of ``stride``."""
    return -(-image_size // stride)


@dataclass(frozen=True)
class ServerConfig:
    """The server's backbone, optimiser and aggregation, and the largest activation it accepts.

    ``max_batch`` and ``max_z_side`` bound every activation z a site sends: at most ``max_batch``
    samples of ``max_z_side`` x ``max_z_side`` (z's side is a site's ``data.image_size`` divided by
    its ``model.stride``, rounded up). They also bound the size of a forward or backward frame, so
    keep them near what the sites use: the server's memory for one step grows with them.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    max_batch: int = DEFAULT_MAX_BATCH
    max_z_side: int = DEFAULT_MAX_Z_SIDE
    device: str = "cpu"

    def validate(self) -> list[str]:
        out = _positive("max_batch", self.max_batch) + _positive("max_z_side", self.max_z_side)
        if self.max_z_side > MAX_Z_SIDE_LIMIT:
            out.append(f"max_z_side: must be at most {MAX_Z_SIDE_LIMIT}, got {self.max_z_side}")
        return out + _device_problems(self.device)


@dataclass(frozen=True)
class NetworkConfig:
    """How the server and the sites meet over gRPC (``fedbone-server serve``, ``fedbone-site train``,
    ``fedbone run --transport grpc``). Ignored by the in-process transport.

    ``min_sites``: a step whose deadline passes aggregates over the sites that delivered when at least
    this many did, and is skipped otherwise; sites that missed it are dropped and rejoin at the next
    round. ``step_deadline_s`` counts from the first gradient of the step to arrive; ``round_deadline_s``
    from the first end-of-round report; ``join_timeout_s`` is how long the server waits for every
    expected site before it starts with ``min_sites``.
    """

    address: str = "127.0.0.1:50051"
    min_sites: int = 1
    step_deadline_s: float = 300.0
    round_deadline_s: float = 900.0
    join_timeout_s: float = 600.0
    max_message_mb: int = 256  # one gRPC message; larger sealed frames are streamed in chunks of this size
    max_frame_mb: int = 1024  # one sealed frame (z, F, dF or dz of one step): refused above this
    # What activations and gradients travel as. float16 / bfloat16 halve the bytes (values are rounded;
    # float16 refuses to send a value it cannot hold rather than send infinity).
    wire_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def validate(self) -> list[str]:
        out = _positive("min_sites", self.min_sites) + _positive("max_message_mb", self.max_message_mb)
        out += _positive("max_frame_mb", self.max_frame_mb)
        for key in ("step_deadline_s", "round_deadline_s", "join_timeout_s"):
            out += _positive(key, getattr(self, key))
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            out.append(f"address: expected HOST:PORT, got {self.address!r}")
        if self.max_message_mb > 2047:
            out.append("max_message_mb: gRPC messages must stay below 2 GiB")
        return out


@dataclass(frozen=True)
class ExperimentConfig:
    """A federation: a server and the sites taking part, trained for ``rounds`` x ``steps_per_round``."""

    name: str
    server: ServerConfig
    sites: tuple[SiteConfig, ...]
    seed: int = 0
    rounds: int = 3
    steps_per_round: int = 20
    embedding_fedavg: bool = True
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def validate(self) -> list[str]:
        out = _positive("rounds", self.rounds) + _positive("steps_per_round", self.steps_per_round)
        if self.network.min_sites > len(self.sites):
            out.append(f"network.min_sites: {self.network.min_sites} is more than the {len(self.sites)} sites")
        names = [s.name for s in self.sites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            out.append(f"sites: site names must be unique, repeated: {', '.join(dupes)}")
        if not self.sites:
            out.append("sites: an experiment needs at least one site")
        for i, site in enumerate(self.sites):
            side = z_side(site.data.image_size, site.model.stride)
            if side > self.server.max_z_side:
                out.append(f"sites[{i}] ({site.name}): z at the cut is {side} x {side} (data.image_size "
                           f"{site.data.image_size} / model.stride {site.model.stride}), above server.max_z_side = "
                           f"{self.server.max_z_side}; raise server.max_z_side or the site's model.stride")
        return out


@dataclass(frozen=True)
class ServeConfig:
    """What ``fedbone-server serve`` needs: the schedule, the backbone and the network, but no site's data.

    ``sites`` names the sites the server waits for before the first step (empty: every registered,
    unrevoked site in the provisioning directory). An experiment file works too: see
    :func:`load_serve_config`.
    """

    name: str
    server: ServerConfig = field(default_factory=ServerConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sites: tuple[str, ...] = ()
    seed: int = 0
    rounds: int = 3
    steps_per_round: int = 20
    embedding_fedavg: bool = True

    def validate(self) -> list[str]:
        out = _positive("rounds", self.rounds) + _positive("steps_per_round", self.steps_per_round)
        bad = [n for n in self.sites if not _NAME.match(n)]
        if bad:
            out.append(f"sites: not valid site names: {', '.join(map(repr, bad))}")
        if self.sites and self.network.min_sites > len(self.sites):
            out.append(f"network.min_sites: {self.network.min_sites} is more than the {len(self.sites)} sites")
        return out

    @classmethod
    def of(cls, exp: ExperimentConfig) -> ServeConfig:
        return cls(name=exp.name, server=exp.server, network=exp.network, sites=tuple(s.name for s in exp.sites),
                   seed=exp.seed, rounds=exp.rounds, steps_per_round=exp.steps_per_round,
                   embedding_fedavg=exp.embedding_fedavg)


def load_serve_config(path: str | Path) -> ServeConfig:
    """A server file (``sites = ["a", "b"]``) or an experiment file (``[[sites]]`` tables; only names are kept)."""
    p = Path(path)
    data = read_toml(p)
    entries = data.get("sites")
    if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
        return ServeConfig.of(experiment_from_mapping(data, base_dir=p.parent))
    return from_mapping(ServeConfig, data, where=p.name)


def _read_site_file(path: str | Path) -> dict[str, Any]:
    """A site file's table, with its data paths made absolute (relative to the file)."""
    data = read_toml(path)
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("manifest", "pipeline", "augment"):
            if isinstance(section.get(key), str) and not Path(section[key]).is_absolute():
                section[key] = str((Path(path).resolve().parent / section[key]).resolve())
    return data


def load_site(path: str | Path, overrides: dict[str, Any] | None = None) -> SiteConfig:
    """Load ``sites/NAME.toml`` (optionally with overrides merged in)."""
    data = _read_site_file(path)
    if overrides:
        data = deep_merge(data, overrides)
    return from_mapping(SiteConfig, data, where=Path(path).name)


def experiment_from_mapping(data: dict[str, Any], base_dir: str | Path = ".") -> ExperimentConfig:
    """Build an experiment from parsed TOML.

    Each ``[[sites]]`` entry is either a full inline site table or ``config = "PATH"``
    (relative to ``base_dir``) plus keys that override that file. A top-level
    ``[site_overrides]`` table is merged into every site last (handy for quick runs).
    """
    data = dict(data)
    entries = data.pop("sites", None)
    site_overrides = data.pop("site_overrides", {})
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("experiment: needs a [[sites]] list of tables")
    if not isinstance(site_overrides, dict):
        raise ConfigError("experiment: site_overrides must be a table")
    sites = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        ref = entry.pop("config", None)
        if ref is not None:
            if not isinstance(ref, str):
                raise ConfigError(f"sites[{i}].config: expected a path string")
            entry = deep_merge(_read_site_file(Path(base_dir) / ref), entry)
        sites.append(deep_merge(entry, site_overrides))
    data["sites"] = sites
    data.setdefault("server", {})
    return from_mapping(ExperimentConfig, data, where="experiment")


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load an experiment TOML (see :func:`experiment_from_mapping`)."""
    p = Path(path)
    return experiment_from_mapping(read_toml(p), base_dir=p.parent)
