"""The per-pixel HSSN objective in one Triton launch: tree-min (focal or not) and the
cross-entropy at every depth, value and gradient together.

``torch.ops.hieraloss.objective(logits, labels, key, ...)`` returns ``(total, parts, grad)``:

* ``parts`` (float64 for float64 logits, else float32) = ``[TM, CE_1, ..., CE_L]``: the tree-min
  loss under ``reduction`` (``"hssn"`` includes the published factor 5) and the mean cross-entropy
  over ``hierarchy.depth_channels[d-1]`` per depth (0 where not asked for);
* ``total = tm_weight * TM + sum_d ce_weights[d-1] * CE_d`` (the differentiable output); TM is
  computed only with ``tree_min`` and CE_d only where its weight is not 0;
* ``grad``: with ``want_grad``, the gradient of ``total`` written by the same pass (the backward
  only scales it by the upstream gradient), else an empty tensor. Reading the logits and labels
  once and writing the gradient once is the whole training step of the loss.

The reduction counts and the gradient's per-depth scales come from the same launch: its first
programs count the labels (each label's entries per depth, looked up in a small table) while the
others wait for them (:func:`_reduce.shared_depth_scales`; no host sync, one launch per step).
Labels are mapped inside the kernel through a small code table, so neither the label check nor the
mapping has to materialise anything logits-sized.
``reduction="none"`` (tree-min only) returns the loss map as ``total``; its backward launches the
kernel again with the upstream map.

The hierarchy reaches the op as its fingerprint (``key``): the op looks the object up in
:func:`hieraloss.hierarchy.Hierarchy.by_fingerprint`, so ``torch.compile`` sees one opaque
operator with plain arguments and traces nothing of the hierarchy.
"""

from __future__ import annotations

import functools
import importlib.util
import linecache
import math
import sys
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from ...core.checks import check_reduction, env_choice
from ...core.plan import code_node_limit_reason, plan_for
from ...core.rules import HSSN_SCALE
from ...hierarchy import Hierarchy
from .._tables import cached_on
from . import _codegen, _reduce
from ._codegen import Mode
from ._common import FP_FUSION, NUM_STAGES, images_as_pixels, launch_sizes, on_device, register_cap, table_driven
from ._grad_buffer import EagerFusedLoss, eager, saved_buffer_gradient
from ._reduce import shared_depth_scales
from ._terms import focal_code
from .objective_table import table_arguments, table_constants, table_objective_kernel

__all__ = ["objective", "kernel_for", "decode_kernel_for", "label_codes", "CHANNEL_LABELS"]

# ``ignore_index`` value telling the op that the labels are already channels (-1 = ignored).
CHANNEL_LABELS = -(1 << 62)

_LOCK = threading.Lock()
_MODULES: dict[str, object] = {}


def _module_for(hierarchy: Hierarchy):
    """The module generated for ``hierarchy`` (its kernels are compiled by Triton on first launch).

    The source is registered with :mod:`linecache` under a pseudo file name, so Triton (and the
    interpreter) can read it like any module's source; nothing is written to disk.
    """
    key = hierarchy.fingerprint
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            name = f"hieraloss_generated_{key[:16]}_v{_codegen.CODEGEN_VERSION}"
            filename = f"<hieraloss-generated {name}>"
            source = _codegen.objective_source(hierarchy) + _codegen.decode_source(hierarchy)
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            spec = importlib.util.spec_from_loader(name, loader=None, origin=filename)
            module = importlib.util.module_from_spec(spec)
            module.__file__ = filename
            sys.modules[name] = module
            exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our own generated code
            _MODULES[key] = module
    return module


def kernel_for(hierarchy: Hierarchy):
    """The ``objective_kernel`` generated for ``hierarchy``."""
    return _module_for(hierarchy).objective_kernel


def decode_kernel_for(hierarchy: Hierarchy):
    """The ``decode_kernel`` generated for ``hierarchy``."""
    return _module_for(hierarchy).decode_kernel


def label_codes(hierarchy: Hierarchy, ignore_index: int, device: torch.device):
    """``(codes int32 [S], shift, counts float64 [S, 2 L], channels int32 [S])`` on ``device``:
    ``plan_for(hierarchy).label_codes`` (:class:`hieraloss.core.plan.LabelCodes`) as tensors, ``counts`` =
    tree-min counts then CE counts.

    Slot ``clamp(label + shift, 0, S - 1)`` of a label value holds its code for the kernel and how
    many entries per depth it adds to the tree-min and cross-entropy counts. For
    ``ignore_index=CHANNEL_LABELS`` the labels are channels (-1 = ignored, anything else out of
    range counts as ignored too).
    """
    return cached_on(hierarchy, device, ("objective_codes", ignore_index), _build_label_codes, ignore_index)


def _build_label_codes(tab, ignore_index: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    codes = plan_for(tab.hierarchy).label_codes(None if ignore_index == CHANNEL_LABELS else ignore_index)
    packed = codes.codes if codes.codes is not None else np.zeros(0, dtype=np.int32)  # None: too many nodes
    return (torch.tensor(packed, device=tab.device), codes.shift,
            torch.tensor(np.concatenate([codes.tree_min_counts, codes.ce_counts], axis=1), dtype=torch.float64,
                         device=tab.device),
            torch.tensor(codes.channels, device=tab.device))


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _as_bnp(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps or overlaps, in some dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda s: s[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _like_logits(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``[B, N, P]`` buffer for the gradient or the loss map of ``logits``: in the logits'
    memory order where they are dense, else contiguous (autograd's layout for a leaf's ``.grad``, so
    channels_last logits get a channels_last gradient that becomes ``.grad``, or goes to the
    convolution, without a copy). The op and its fake both allocate here, so their strides agree."""
    x = _as_bnp(logits)
    return torch.empty_like(x, dtype=dtype) if _dense(x) else x.new_empty(x.shape, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _coefficients(device: torch.device, L: int, tm_weight: float, ce_weights: tuple[float, ...]) -> torch.Tensor:
    """float64 ``[2 L]`` on ``device``: the weight of each per-depth ratio ``sum / denominator`` in the
    total (``tm_weight``, times the hssn factor where it applies, then the CE weights). Cached, and
    bounded: building it per call would be a host-to-device copy (a sync, and not capturable in a
    CUDA graph)."""
    ce = tuple(ce_weights) + (0.0,) * (L - len(ce_weights))
    return torch.tensor((tm_weight,) * L + ce, dtype=torch.float64, device=device)


# Where the per-depth label count runs (HIERALOSS_LABEL_COUNT): "separate" (the default), a launch of its
# own before the objective kernel, whose programs then find the ready flag up; or "in-kernel", counted
# by the objective kernel's first programs while the others spin-wait for them (one launch, but a
# wait that needs every program resident; a variant in make gpu-ab until a GPU run shows it pays).
# The same results to the bit either way.
LABEL_COUNT_ENV = "HIERALOSS_LABEL_COUNT"
LABEL_COUNTS = ("separate", "in-kernel")
_COUNT_PROGRAMS = 1024


def separate_label_count() -> bool:
    """Whether the label count runs as a launch of its own (``HIERALOSS_LABEL_COUNT``, read per call)."""
    return env_choice(LABEL_COUNT_ENV, LABEL_COUNTS) == "separate"


@triton.jit(do_not_specialize=["slb", "slp", "shift", "ncode", "P", "chunks", "reduction"])
def _label_count_kernel(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
                        coef_ptr, denom_ptr, scale_ptr, L2: tl.constexpr, D2: tl.constexpr, CB: tl.constexpr,
                        STEP: tl.constexpr, RB: tl.constexpr, F64: tl.constexpr):
    """The objective kernel's label count alone (:func:`_reduce.shared_depth_scales`, no wait)."""
    shared_depth_scales(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction, 0,
                        coef_ptr, denom_ptr, scale_ptr, False, L2, D2, CB, STEP, RB, F64)


def label_count_constants(num_nodes: int, depth: int) -> dict:
    """The constexprs of ``_label_count_kernel`` for a tree of ``num_nodes`` nodes and ``depth`` levels
    (but ``F64``): the loop steps of the objective kernel's own count, so the A/B times the same loops."""
    _, step, rb = _codegen.count_loop(num_nodes, depth)
    return dict(L2=2 * depth, D2=_reduce.padded_width(2 * depth), CB=_reduce.count_chunk(), STEP=step, RB=rb)


def _objective_arguments(**arguments):
    """The objective kernel's run-time arguments by name, checked against its one parameter table
    (``_codegen.OBJECTIVE_PARAMS``): a parameter added there and not here fails at once, by name."""
    names = _codegen.objective_param_names()
    if list(arguments) != names:
        missing, unknown = sorted(set(names) - set(arguments)), sorted(set(arguments) - set(names))
        raise TypeError(f"objective kernel arguments: missing {missing}, unknown {unknown} (or out of order)")
    return arguments


def _launch(mode: Mode, x, labels, codes, hierarchy, node_weight, gamma, tm, ce, *, sums=None, out_dtype=None,
            upstream=None):
    """The objective kernel in ``mode``; ``sums`` (modes 0 and 1): ``(reduction, coefficients, factor,
    total, parts)``: the kernel counts the labels for the per-depth denominators and gradient scales,
    and its last programs reduce its sums into ``total`` and ``parts``."""
    B, N, P = x.shape
    L = hierarchy.max_depth
    acc = _acc_dtype(x)
    dev = x.device
    writes_map = mode != Mode.VALUE  # a gradient or a loss map [B, N, P]
    out = _like_logits(x, out_dtype) if writes_map else None
    lab = labels.reshape(B, P)
    go = upstream if upstream is not None else x
    kout = out
    if images_as_pixels(B, P):
        # The label count then takes whole chunks too, not one label per image.
        x, go, lab = x.transpose(0, 2), go.transpose(0, 2), lab.t()
        kout = out.transpose(0, 2) if writes_map else None
        B, P = 1, B
    block_p, warps = launch_sizes(N, P)
    tiles = triton.cdiv(P, block_p)
    # Every program writes its row of the sums it computes (tree-min with tm, cross-entropy with ce),
    # and the reduction reads only those.
    part = torch.empty((B * tiles, 2 * L), dtype=acc, device=dev)
    if not writes_map:
        out = kout = part
    if B * P == 0:
        if sums is not None:
            sums[3].zero_()
            sums[4].zero_()
        return (out.zero_() if writes_map else out)
    code, shift, table, channels = codes
    table_kernel = table_driven()
    if not table_kernel and code.numel() == 0:
        raise ValueError(code_node_limit_reason(N))
    ncode = channels.numel()  # label slots
    dummy = part
    d2 = _reduce.padded_width(2 * L)
    if sums is not None:
        reduction, coef, factor, total, parts = sums
        group, counter, gsum = _reduce.workspace(B * tiles, 2 * L, dev, sync=True)
        sync, counter = counter[:_reduce.SYNC_SLOTS], counter[_reduce.SYNC_SLOTS:]
        chunks = _reduce.count_chunks(B, P)
        rows = torch.empty((chunks, d2), dtype=torch.float64, device=dev)
        denom = torch.empty(2 * L, dtype=torch.float64, device=dev)
        scales = torch.empty(2 * L, dtype=acc, device=dev)
        reduction = _reduce.REDUCTION_IDS[reduction]
    else:
        sync = counter = gsum = rows = denom = scales = coef = total = parts = dummy
        group, factor, chunks, reduction = 1, 1.0, 0, 0
    with on_device(dev):
        if sums is not None and separate_label_count():
            _label_count_kernel[(min(chunks, _COUNT_PROGRAMS),)](
                lab, lab.stride(0), lab.stride(1), shift, ncode, table, P, chunks, sync, rows, reduction, coef,
                denom, scales, **label_count_constants(N, L), F64=acc == torch.float64, num_warps=4, **FP_FUSION)
        arguments = _objective_arguments(
            x_ptr=x, sxb=x.stride(0), sxn=x.stride(1), sxp=x.stride(2),
            lab_ptr=lab, slb=lab.stride(0), slp=lab.stride(1),
            code_ptr=code if code.numel() else channels, shift=shift, ncode=ncode, table_ptr=table,
            w_ptr=node_weight if node_weight is not None else dummy,
            go_ptr=go, sgb=go.stride(0), sgn=go.stride(1), sgp=go.stride(2),
            chunks=chunks, sync_ptr=sync, rows_ptr=rows, reduction=reduction, spin_limit=_reduce.spin_limit(),
            scale_ptr=scales,
            out_ptr=kout, **dict(zip(("sob", "son", "sop"), kout.stride() if writes_map else (0, 0, 1), strict=True)),
            part_ptr=part, group=group, counter_ptr=counter, gsum_ptr=gsum,
            denom_ptr=denom, coef_ptr=coef, factor=float(factor), total_ptr=total, parts_ptr=parts,
            P=P, gamma=float(gamma))
        constants = dict(BLOCK_P=block_p, CB=_reduce.count_chunk(), F64=x.dtype == torch.float64,
                         FOCAL=focal_code(gamma), HAS_W=node_weight is not None, TM=tm, CE=ce, MODE=int(mode),
                         num_warps=warps, num_stages=NUM_STAGES, **FP_FUSION)
        if table_kernel:
            table_objective_kernel[(tiles, B)](
                **arguments, **table_arguments(hierarchy, channels, B, P, acc, tm, dev), **constants,
                **table_constants(L))
        else:
            kernel_for(hierarchy)[(tiles, B)](**arguments, **constants, **register_cap(N))
    return out


def _objective(logits: torch.Tensor, labels: torch.Tensor, key: str, ignore_index: int,
               node_weight: torch.Tensor | None, gamma: float, reduction: str, tree_min: bool, tm_weight: float,
               ce_weights: list[float], want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_reduction(reduction)
    hierarchy = Hierarchy.by_fingerprint(key)
    x = _as_bnp(logits)
    L = hierarchy.max_depth
    acc = _acc_dtype(logits)
    codes = label_codes(hierarchy, ignore_index, logits.device)
    tm = tree_min or reduction == "none"
    ce = any(w != 0.0 for w in ce_weights)
    weight = None if node_weight is None else node_weight.to(device=logits.device, dtype=acc).contiguous()
    if reduction == "none":
        out = _launch(Mode.LOSS_MAP, x, labels, codes, hierarchy, weight, gamma, True, False, out_dtype=acc)
        return out.view(logits.shape), logits.new_zeros((1 + L,), dtype=acc), logits.new_empty((0,))
    factor = HSSN_SCALE if reduction == "hssn" else 1.0
    coef = _coefficients(logits.device, L, float(tm_weight) * factor, tuple(float(w) for w in ce_weights))
    total, parts = logits.new_empty((), dtype=acc), logits.new_empty((1 + L,), dtype=acc)
    sums = (reduction, coef, factor, total, parts)
    if want_grad:
        grad = _launch(Mode.VALUE_GRAD, x, labels, codes, hierarchy, weight, gamma, tm, ce, sums=sums,
                       out_dtype=logits.dtype).view(logits.shape)
    else:
        _launch(Mode.VALUE, x, labels, codes, hierarchy, weight, gamma, tm, ce, sums=sums)
        grad = logits.new_empty((0,))
    return total, parts, grad


objective_op = torch.library.custom_op("hieraloss::objective", mutates_args=())(_objective)


@objective_op.register_fake
def _(logits, labels, key, ignore_index, node_weight, gamma, reduction, tree_min, tm_weight, ce_weights, want_grad):
    acc = _acc_dtype(logits)
    L = Hierarchy.by_fingerprint(key).max_depth
    none = reduction == "none"
    total = _like_logits(logits, acc).view(logits.shape) if none else logits.new_empty((), dtype=acc)
    grad = (_like_logits(logits, logits.dtype).view(logits.shape) if want_grad and not none
            else logits.new_empty((0,)))
    return total, logits.new_empty((1 + L,), dtype=acc), grad


@torch.library.custom_op("hieraloss::objective_map_backward", mutates_args=())
def objective_map_backward_op(grad_map: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, key: str,
                              ignore_index: int, node_weight: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """Gradient of ``sum(tree-min map * grad_map)`` with respect to the logits (``reduction="none"``)."""
    hierarchy = Hierarchy.by_fingerprint(key)
    x = _as_bnp(logits)
    acc = _acc_dtype(logits)
    codes = label_codes(hierarchy, ignore_index, logits.device)
    weight = None if node_weight is None else node_weight.to(device=logits.device, dtype=acc).contiguous()
    grad = _launch(Mode.MAP_GRAD, x, labels, codes, hierarchy, weight, gamma, True, False, out_dtype=logits.dtype,
                   upstream=_as_bnp(grad_map.to(acc)))
    return grad.view(logits.shape)


@objective_map_backward_op.register_fake
def _(grad_map, logits, labels, key, ignore_index, node_weight, gamma):
    return _like_logits(logits, logits.dtype).view(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, key, ignore_index, node_weight, gamma, reduction, *_ = inputs
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(logits, labels, node_weight)
        ctx.args = (key, ignore_index, gamma)
    else:
        ctx.save_for_backward(output[2])


def _backward(ctx, grad_total, grad_parts, grad_grad):
    none = (None,) * 10
    if grad_total is None:
        return (None, *none)
    if ctx.reduction == "none":
        logits, labels, node_weight = ctx.saved_tensors
        return (objective_map_backward_op(grad_total, logits, labels, *ctx.args[:2], node_weight, ctx.args[2]),
                *none)
    return (saved_buffer_gradient(ctx, grad_total, "the fused objective", "logits did not require grad"),
            *none)


objective_op.register_autograd(_backward, setup_context=_setup_context)


def objective(logits: torch.Tensor, labels: torch.Tensor, hierarchy: Hierarchy, *, ignore_index: int,
              node_weight: torch.Tensor | None = None, gamma: float = 0.0, reduction: str = "hssn",
              tree_min: bool = True, tm_weight: float = 1.0, ce_weights=()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total, parts)`` of the fused objective; ``parts`` are detached (see the module docstring)."""
    want_grad = torch.is_grad_enabled() and logits.requires_grad and reduction != "none"
    args = (logits, labels, hierarchy.fingerprint, int(ignore_index), node_weight, float(gamma), reduction,
            bool(tree_min), float(tm_weight), [float(w) for w in ce_weights], want_grad)
    if reduction != "none" and eager(logits):
        total, parts = EagerFusedLoss.apply(_objective, *args)
    else:
        total, parts, _ = torch.ops.hieraloss.objective(*args)
    return total, parts.detach()

