"""DP-SGD on a site's own layers (embedding, adaptation, head) with Opacus, across the split.

The site trains its layers on every record, so with privacy on they are trained with DP-SGD:
per-sample gradients, each sample's gradient clipped JOINTLY over all site parameters to
``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm`` on the sum, divided by the
expected batch size (Opacus ``DPOptimizer``, ``loss_reduction="mean"``).

How per-sample gradients are obtained (``PrivateSiteModel``):

* Opacus ``GradSampleModule`` (hooks mode, ``strict=True``) is attached to the SAME module objects
  the ``SiteModel`` holds: the embedding, the head, and every child of the adaptation module.
  Nothing is replaced, so ``SiteModel.state_dict()`` (checkpoints, FedAvg of the embedding,
  ``embedding_signature``) is unchanged. Hooks fire whoever calls the modules.
* Every layer with weights here has an Opacus grad sampler: Conv2d (also depthwise), Linear
  (also on (B, N, D) tokens: MONAI ``SABlock``'s qkv / out_proj, ``ChannelSELayer``'s MLP),
  GroupNorm, LayerNorm (MONAI ``PatchEmbed``'s too).
* Opacus cannot take a module that has its own parameters AND children with a non-tensor
  forward: ``TaskAttentionAdapter`` (``forward(feats: list, z)``) owns ``scale_embed``. That
  parameter is handled here exactly: during the training forward it is replaced (with
  ``torch.func.functional_call``) by a per-sample copy ``scale_embed[:, None, None, :]`` expanded
  to (n, B, 1, D); ``scale_embed[j]`` is then (B, 1, D) and broadcasts onto the (B, h*w, D)
  tokens as before, and the gradient of the expanded copy IS the per-sample gradient.
  Other composite modules with own parameters are refused (``_COMPOSITE_PARAMS``).

The split's backward (``split_step_dp``): the head/adaptation get their per-sample gradients from
``loss.backward()``; the embedding from ONE ``z.backward(dz_skip + dz_server)``, where dz_skip is
the local skip connection's gradient (from ``loss.backward()``) and dz_server comes from the
server. Summing the two cotangents before the single backward through the embedding gives the
embedding's exact two-path per-sample gradient (Opacus pops one stored activation per backward,
so two separate backward calls through the embedding would NOT work).

Convention (``loss_reduction="mean"``): the loss is the mean over the batch of per-sample losses
l_i (true for every ``TaskLoss``: CE / BCE means, MONAI Dice with ``batch=False``), and Opacus
scales backprops by B, so ``p.grad_sample[i]`` is the gradient of l_i alone, i.e. B times sample
i's contribution to the gradient of the batch mean. The optimizer sums the clipped per-sample
gradients, adds noise and divides by ``expected_batch_size``.

Not done here / limits:
* a module type without an Opacus grad sampler falls back to Opacus's functorch path, which only
  works for a single-tensor forward; BatchNorm (and any trainable module with buffers) is refused;
* the per-sample independence of the server's backbone is assumed (no BatchNorm: refused by the
  server), otherwise z_j would influence dz_i;
* amplification by subsampling assumes Poisson sampling; fixed-size shuffled batches use the
  usual (Opacus) approximation, as for the activation / label mechanisms.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from ..models.adaptation import TaskAttentionAdapter
from ..models.split import SiteModel
from .dpsgd import validate_module
from .errors import PrivacyError
from .mechanisms import Release, check_positive

MECHANISM = "dpsgd"

# Composite modules (own parameters + children, non-tensor forward) whose own parameters are given
# per-sample gradients here by batch expansion: type -> names of the parameters.
_COMPOSITE_PARAMS: dict[type[nn.Module], tuple[str, ...]] = {TaskAttentionAdapter: ("scale_embed",)}

_MARK = "_fedbone_dpsgd_private"


def _canonical_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _row_major(t: Tensor) -> Tensor:
    """``t`` with exactly row-major strides (``contiguous()`` keeps e.g. channels-last strides of a
    (B, C, 1, 1) map, which ``is_contiguous`` accepts but Opacus's ``unfold2d`` misreads)."""
    if t.stride() == _canonical_strides(t.shape):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _contiguous_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_row_major(a) if isinstance(a, Tensor) else a for a in args)


def _own_trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class PrivateSiteModel:
    """A per-sample-gradient view of a ``SiteModel`` (same module objects, same parameters).

    Use ``embed`` / ``top`` of this object for training steps; evaluation (``torch.no_grad``) may
    keep calling the ``SiteModel``.
    """

    def __init__(self, model: SiteModel, *, batch_first: bool = True, loss_reduction: str = "mean") -> None:
        if getattr(model, _MARK, False):
            raise PrivacyError("site model is already wrapped for DP-SGD (hooks would be attached twice)")
        problems = validate_module(model)
        if problems:
            raise PrivacyError("site model cannot be trained with DP-SGD: " + "; ".join(problems))
        self.model = model
        self.loss_reduction = loss_reduction
        self.wrapped: dict[str, GradSampleModule] = {}
        self.expanded: list[tuple[str, nn.Module, str]] = []  # (qualified name, owner, parameter name)
        self._pre_hooks: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name, child in (("embedding", model.embedding), ("adaptation", model.adaptation),
                                ("head", model.head)):
                self._wrap(name, child, batch_first, loss_reduction)
        except Exception:
            self.remove_hooks()
            raise
        covered = {id(p) for g in self.wrapped.values() for p in g.parameters() if p.requires_grad}
        covered |= {id(getattr(owner, pname)) for _, owner, pname in self.expanded}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:  # pragma: no cover - guarded by the walk above
            self.remove_hooks()
            raise PrivacyError(f"no per-sample gradient for site parameters {missing}")
        setattr(model, _MARK, True)

    def _wrap(self, name: str, module: nn.Module, batch_first: bool, loss_reduction: str) -> None:
        if not _has_trainable(module):
            return
        own = _own_trainable(module)
        composite = own and any(_has_trainable(c) for c in module.children())
        if not composite:
            try:
                self.wrapped[name] = GradSampleModule(
                    module, batch_first=batch_first, loss_reduction=loss_reduction, strict=True
                )
            except NotImplementedError as exc:
                raise PrivacyError(f"site module {name} ({type(module).__name__}) is not DP-SGD compatible: "
                                   f"{exc}") from exc
            # Opacus's conv grad sampler (unfold2d) reads its stored input as if contiguous; the
            # backbone's feature maps arrive channels-last strided. Make every hooked layer's input
            # contiguous (same values) so that the stored activations are laid out as assumed.
            for m in self.wrapped[name].iterate_submodules(module):
                self._pre_hooks.append(m.register_forward_pre_hook(_contiguous_inputs))
            return
        allowed = _COMPOSITE_PARAMS.get(type(module), ())
        unknown = [n for n in own if n not in allowed]
        if unknown:
            raise PrivacyError(
                f"site module {name} ({type(module).__name__}) owns parameters {unknown} and has trainable "
                "children; Opacus cannot compute their per-sample gradients (move them into a leaf module)"
            )
        self.expanded += [(f"{name}.{p}", module, p) for p in own]
        for cname, child in module.named_children():
            self._wrap(f"{name}.{cname}", child, batch_first, loss_reduction)

    # -- the site's two calls ------------------------------------------------------------------
    def embed(self, x: Tensor) -> Tensor:
        return self.model.embed(x)

    def top(self, feats: list[Tensor], z: Tensor, out_size: tuple[int, int]) -> Tensor:
        adaptation = self.model.adaptation
        capture = self.model.training and torch.is_grad_enabled() and self.expanded
        if not capture:
            return self.model.top(feats, z, out_size)
        batch = z.shape[0]
        subs: dict[str, Tensor] = {}
        for qname, owner, pname in self.expanded:
            if owner is not adaptation:  # pragma: no cover - only TaskAttentionAdapter is registered
                raise PrivacyError(f"expanded parameter {qname} outside the adaptation module")
            p = getattr(owner, pname)
            e = p[:, None, None, :].expand(p.shape[0], batch, 1, p.shape[1])
            e.register_hook(self._grad_sample_hook(p, batch))
            subs[pname] = e
        pyramid = torch.func.functional_call(adaptation, subs, (feats, z))
        return self.model.head(pyramid, out_size)

    def _grad_sample_hook(self, p: nn.Parameter, batch: int) -> Callable[[Tensor], None]:
        scale = batch if self.loss_reduction == "mean" else 1

        def hook(g: Tensor) -> None:
            gs = g[:, :, 0, :].transpose(0, 1).detach() * scale  # (B, n, D)
            prev = getattr(p, "grad_sample", None)
            setattr(p, "grad_sample", gs if prev is None else prev + gs)  # noqa: B010 (Opacus attribute)

        return hook

    # -- bookkeeping ---------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def end_backward(self) -> None:
        """After a step's backward passes: promote pending per-sample gradients, drop leftovers.

        Layers whose output the loss did not use (e.g. the coarse ``smooth`` convolutions under a
        segmentation head) keep their stored activations with no backward to pop them; they are
        dropped here so that they do not pile up step after step.
        """
        for gsm in self.wrapped.values():
            for m in gsm._module.modules():
                if hasattr(m, "activations"):
                    m.activations = []
                if hasattr(m, "max_batch_len"):
                    del m.max_batch_len
        for p in self.parameters():
            if hasattr(p, "_current_grad_sample"):
                promote_current_grad_sample(p)
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0

    def remove_hooks(self) -> None:
        for h in self._pre_hooks:
            h.remove()
        self._pre_hooks.clear()
        for gsm in self.wrapped.values():
            gsm._close()
        self.wrapped.clear()
        if getattr(self.model, _MARK, False):
            delattr(self.model, _MARK)


def make_private_site_model(model: SiteModel) -> PrivateSiteModel:
    """Attach Opacus per-sample gradient hooks to ``model``'s layers; refuse with Opacus's reasons."""
    return PrivateSiteModel(model)


class DPSiteOptimizer(DPOptimizer):
    """Opacus ``DPOptimizer`` over ALL the site's parameters: one joint per-sample clip, then noise.

    ``zero_grad(set_to_none=True)`` clears ``grad_sample`` (Opacus) between steps. A parameter the
    loss did not reach (no gradient at all) gets a zero per-sample gradient: it still receives
    noise, as an honest release. A parameter with a gradient but no per-sample gradient is an
    error (a training forward bypassed ``PrivateSiteModel``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        sigma = check_positive("noise_multiplier", noise_multiplier)
        clip = check_positive("max_grad_norm", max_grad_norm)
        if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1:
            raise PrivacyError(f"expected_batch_size must be an integer >= 1, got {expected_batch_size!r}")
        if secure_mode and generator is not None:
            raise PrivacyError("dpsgd: a generator was passed in secure mode; secure noise is never seeded")
        if generator is None and not secure_mode:
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(63))
        super().__init__(
            optimizer, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected_batch_size,
            loss_reduction="mean", generator=generator, secure_mode=secure_mode,
        )

    def release(self, sample_rate: float) -> Release:
        """The accountant entry for one step at sampling rate q = batch / N."""
        return Release(float(self.noise_multiplier), sample_rate, MECHANISM)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        batch = next((len(_flat(p.grad_sample)) for p in self.params if getattr(p, "grad_sample", None) is not None),
                     None)
        if batch is None:
            raise PrivacyError("dpsgd: no per-sample gradients; was the step run through PrivateSiteModel?")
        for p in self.params:
            if getattr(p, "grad_sample", None) is None:
                if p.grad is not None:
                    raise PrivacyError("dpsgd: a site parameter has a gradient but no per-sample gradient "
                                       "(a training forward bypassed PrivateSiteModel)")
                p.grad_sample = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
        return super().pre_step(closure)  # type: ignore[no-any-return]


def _flat(gs: Any) -> Tensor:
    return torch.cat(gs, 0) if isinstance(gs, list) else gs


def split_step_dp(
    private: PrivateSiteModel,
    send_z: Callable[[Tensor], Sequence[Tensor]],
    send_feature_grads: Callable[[list[Tensor]], Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> float:
    """One split forward/backward leaving per-sample gradients in every site parameter.

    ``send_z(z)`` gets the detached activations (apply activation DP and the transport inside) and
    returns the backbone features; ``send_feature_grads(dF)`` gets dF (apply label DP and the
    transport inside) and returns dz from the server. Call ``optimizer.zero_grad(set_to_none=True)``
    before and ``optimizer.step()`` after (a ``DPSiteOptimizer``).
    """
    model = private.model
    model.train()
    try:
        with warnings.catch_warnings():
            # The embedding's first layer sees the image, which needs no gradient: PyTorch warns that
            # the full backward hook then fires on the output gradient, which is what Opacus uses.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            z = private.embed(x)
            feats = [f.detach().requires_grad_(True) for f in send_z(z.detach())]
            z_local = z.detach().requires_grad_(True)
            loss = loss_fn(private.top(feats, z_local, (x.shape[-2], x.shape[-1])), y)
            loss.backward()
            d_feats = [f.grad if f.grad is not None else torch.zeros_like(f) for f in feats]
            dz = send_feature_grads(d_feats)
            # ONE backward through the embedding with both paths' cotangents summed.
            z.backward(dz if z_local.grad is None else z_local.grad + dz)
    finally:
        private.end_backward()
    return float(loss.detach())

