"""The optional compiled CPU kernel of the tree-min loss (and of the whole per-pixel HSSN objective:
tree-min plus the cross-entropy at every depth), framework-free (raw pointers via ctypes).

``setup.py`` builds ``_tree_min`` from ``tree_min.cpp`` when a C++ compiler is present; without it
:func:`available` is False and the backends use their vectorized ops. The math is in
``tree_min_kernel.h``: one pass over the logits per call, computing the loss and, when asked, the
gradient (no intermediate the size of the logits); :func:`tree_min` with ``ce_sums`` /
``ce_grad_scale`` adds the cross-entropy of every depth to the same pass. On x86-64 Linux with GCC
the kernel is compiled for three instruction sets (baseline, AVX2 + FMA, AVX-512) and picks the
widest this CPU runs.

Environment: ``HIERALOSS_NATIVE=0`` disables the kernel; ``HIERALOSS_NATIVE_ISA=generic|avx2|avx512``
caps its instruction set; ``HIERALOSS_HUGEPAGES=1`` makes it ask Linux for transparent huge pages on
the fresh output buffers it fills (:func:`advise_hugepages`; off by default, see there).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading

import numpy as np

from ..core.plan import Plan, plan_for
from ..core.rules import HSSN_SCALE
from ..hierarchy import Hierarchy

__all__ = ["available", "load_error", "use_for", "isa", "set_isa", "ISAS", "advise_hugepages", "BufferPool", "BUFFERS",
           "release_cpu_buffers", "address", "label_histogram", "reduction_scale", "hssn_scales", "tile_width",
           "tree_min", "tree_min_value", "hssn_objective", "FLOAT32", "FLOAT64", "LogicArrays", "logic_arrays",
           "logicseg"]

FLOAT32 = 0
FLOAT64 = 1
ISAS = ("generic", "avx2", "avx512")
TILE_ENTRIES = 1 << 16  # (node, pixel) entries per tile: the tile's scratch stays in L2
HUGEPAGE_MIN_BYTES = 1 << 22

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_ERRORS = {1: "bad sizes", 2: "unsupported dtype", 3: "unsupported combination of outputs",
           4: "out of memory or threads"}
_p = ctypes.c_void_p
_i64 = ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    if "lib" in _STATE:  # loaded: no lock (torch.compile traces this check, and locks break graphs)
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        lib, error = None, None
        if os.environ.get("HIERALOSS_NATIVE", "1") == "0":
            error = "disabled by HIERALOSS_NATIVE=0"
        else:
            spec = importlib.util.find_spec(f"{__name__}._tree_min")
            if spec is None or spec.origin is None:
                error = "hieraloss._native._tree_min is not built (no C++ compiler when hieraloss was installed?)"
            else:
                try:
                    lib = ctypes.CDLL(spec.origin)
                    lib.hieraloss_tree_min.restype = ctypes.c_int
                    lib.hieraloss_tree_min.argtypes = [
                        ctypes.c_int, _p, _i64, _i64, _i64, _p, _p, _i64, _p, _p, ctypes.c_double,
                        _p, _p, _p, _p, _p, _p, _i64, _i64]
                    lib.hieraloss_tree_min_ce.restype = ctypes.c_int
                    lib.hieraloss_tree_min_ce.argtypes = [
                        ctypes.c_int, _p, _i64, _i64, _i64, _p, _p, _i64, _p, _p, ctypes.c_double,
                        _p, _p, _p, _p, _p, _p, _i64, _p, _p, _p, _p, _p, _i64, _i64]
                    lib.hieraloss_logicseg.restype = ctypes.c_int
                    lib.hieraloss_logicseg.argtypes = [
                        ctypes.c_int, _p, _i64, _i64, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _p, _i64, _p, _p,
                        _i64, ctypes.c_int, ctypes.c_double, _p, _p, ctypes.c_double, ctypes.c_double,
                        ctypes.c_double, ctypes.c_double, ctypes.c_double, _p, _p, _p, _p, _i64, _i64]
                    lib.hieraloss_isa.restype = ctypes.c_char_p
                    lib.hieraloss_set_isa.restype = ctypes.c_int
                    lib.hieraloss_set_isa.argtypes = [ctypes.c_int]
                    lib.hieraloss_advise_hugepages.restype = ctypes.c_int
                    lib.hieraloss_advise_hugepages.argtypes = [_p, _i64]
                except (OSError, AttributeError) as exc:
                    lib, error = None, f"could not load {spec.origin}: {exc}"
                else:
                    cap = os.environ.get("HIERALOSS_NATIVE_ISA")
                    if cap:
                        if cap not in ISAS:
                            raise ValueError(f"HIERALOSS_NATIVE_ISA must be one of {ISAS}, got {cap!r}")
                        lib.hieraloss_set_isa(ISAS.index(cap))
        _STATE["lib"], _STATE["error"] = lib, error
        return lib


def available() -> bool:
    """Whether the compiled kernel is built, loadable and not disabled."""
    return _load() is not None


def load_error() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _STATE["error"]  # type: ignore[return-value]


def use_for(backend: str, *, on_cpu: bool, device: str) -> bool:
    """Whether a tree-min loss asked for with ``backend`` runs on this kernel, for logits on
    ``device`` (``on_cpu`` says whether that is the CPU): ``"native"`` requires it and raises a
    ``RuntimeError`` naming why it cannot run; ``"auto"`` takes it when it can; any other never."""
    if backend == "native":
        if not on_cpu:
            reason = f"logits on {device}, the kernel runs on the CPU"
        elif not available():
            reason = load_error()
        else:
            return True
        raise RuntimeError(f"backend='native' was asked for, but the compiled CPU kernel cannot run: {reason}")
    return backend == "auto" and on_cpu and available()


def isa() -> str | None:
    """The instruction set the kernel runs with here (one of :data:`ISAS`), None if it is unavailable."""
    lib = _load()
    return None if lib is None else lib.hieraloss_isa().decode()


def set_isa(name: str) -> str:
    """Cap the kernel's instruction set at ``name`` (one of :data:`ISAS`); returns the one now in use
    (lower than ``name`` where this CPU or build lacks it). For tests and benchmarks."""
    if name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {name!r}")
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {load_error()}")
    return ISAS[lib.hieraloss_set_isa(ISAS.index(name))]


def advise_hugepages(address: int, nbytes: int) -> bool:
    """With ``HIERALOSS_HUGEPAGES=1``: ask for transparent huge pages on a fresh, untouched buffer
    (Linux; whole 2 MiB pages inside it only), so that its first touch costs far fewer page faults.
    Off by default: where the kernel compacts memory to find huge pages on a fault (THP defrag
    "madvise", a common default), some calls stall, and the mean step got slower (docs/performance.md).
    No-op for small buffers and off Linux; returns whether advice was given."""
    lib = _load()
    if lib is None or nbytes < HUGEPAGE_MIN_BYTES or os.environ.get("HIERALOSS_HUGEPAGES", "0") != "1":
        return False
    return bool(lib.hieraloss_advise_hugepages(address, nbytes))


class BufferPool:
    """Reusable C-contiguous numpy arrays for the large outputs the kernel fills (gradients).

    A fresh 100 MB buffer costs about as much in page faults as the kernel's whole pass (the
    operating system maps and zeroes every 4 KiB page on first touch, and allocators hand such
    blocks back to it on free), so the backends take their gradient buffers from here. The caller
    wraps the array without copying (``torch.from_numpy``), and the wrapping tensor keeps a
    reference to it for as long as any tensor or view uses its memory. An array whose reference
    count is back to the pool's own is therefore unused and is handed out again, pages already
    mapped. At most ``capacity`` arrays are kept (the least recently used free one is dropped
    first); :meth:`take` returns None (allocate normally) for small buffers, when every kept array
    is in use, or with ``HIERALOSS_REUSE_BUFFERS=0``.
    """

    capacity = 2
    min_bytes = 1 << 22

    def __init__(self):
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._unused_refs = self._refcounts([np.empty(1)])[0]  # the pool's own references, measured

    @staticmethod
    def _refcounts(arrays: list[np.ndarray]) -> list[int]:
        return [sys.getrefcount(a) for a in arrays]

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        dtype = np.dtype(dtype)
        if int(np.prod(shape)) * dtype.itemsize < self.min_bytes or os.environ.get("HIERALOSS_REUSE_BUFFERS") == "0":
            return None
        with self._lock:
            refs = self._refcounts(self._arrays)
            for i, n in enumerate(refs):
                arr = self._arrays[i]
                if n <= self._unused_refs and arr.shape == tuple(shape) and arr.dtype == dtype:
                    self._arrays.append(self._arrays.pop(i))  # most recently used last
                    return arr
            if len(self._arrays) >= self.capacity:
                free = [i for i, n in enumerate(refs) if n <= self._unused_refs]
                if not free:
                    return None
                del self._arrays[free[0]]
            arr = np.empty(shape, dtype=dtype)
            self._arrays.append(arr)
            return arr

    def __len__(self) -> int:
        return len(self._arrays)

    def release(self) -> None:
        """Drop every kept array (each is freed once no tensor uses it)."""
        with self._lock:
            self._arrays.clear()


BUFFERS = BufferPool()


def release_cpu_buffers() -> None:
    """Drop the gradient buffers the compiled CPU kernel keeps for reuse (``BUFFERS.release()``)."""
    BUFFERS.release()


def address(buf) -> int:
    """The address the kernel reads: 0 for None, else a numpy array's data or a tensor's ``data_ptr()``
    (the caller keeps ``buf`` alive, C-contiguous, until the kernel returns)."""
    if buf is None:
        return 0
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()


def label_histogram(label_channels: np.ndarray, num_nodes: int) -> np.ndarray:
    """float64 ``[N]``: the valid pixels of each label channel in ``label_channels`` (any shape,
    -1 = ignored): what :func:`reduction_scale` and :func:`hssn_scales` read."""
    counts = np.bincount(np.asarray(label_channels).reshape(-1) + 1, minlength=num_nodes + 1)
    return counts[1:].astype(np.float64)


def reduction_scale(plan: Plan, hist: np.ndarray, reduction: str, node_weight: np.ndarray | None = None
                    ) -> np.ndarray:
    """float64 ``[N]``: the factor of each channel's sum of entries in the scalar tree-min ``reduction``
    (``"sum"``, ``"mean"`` over every unmasked entry, ``"hssn"``: 5 / the unmasked entries of the
    channel's depth), times ``node_weight``; the counts come from ``hist`` (:func:`label_histogram`)."""
    if reduction == "sum":
        scale = np.ones(plan.num_nodes)
    else:
        counts = hist @ plan.tree_min_counted  # [L] unmasked (pixel, node) entries per depth
        if reduction == "mean":
            scale = np.full(plan.num_nodes, 1.0 / max(float(counts.sum()), 1.0))
        else:
            scale = (HSSN_SCALE / np.maximum(counts, 1.0))[plan.depth - 1]
    if node_weight is not None:
        scale = scale * node_weight
    return np.ascontiguousarray(scale, dtype=np.float64)


def hssn_scales(plan: Plan, hist: np.ndarray, node_weight: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The HSSN objective's normalisation from ``hist`` (float64 ``[N]``: valid pixels per label
    channel): ``(tm_scale [N], ce_scale [L])``, float64, such that the tree-min part (``reduction="hssn"``
    without its factor 5, node weights included) is ``sum_v tm_scale[v] * channel_sums[v]`` and the
    cross-entropy at depth d is ``ce_scale[d-1] * ce_sums[d-1]`` (1 / counted pixels; with none counted
    the sum is 0 and so is the part)."""
    tm_counts = hist @ plan.tree_min_counted  # [L] unmasked (pixel, node) entries per depth
    tm_scale = (1.0 / np.maximum(tm_counts, 1.0))[plan.depth - 1]
    if node_weight is not None:
        tm_scale = tm_scale * node_weight
    ce_scale = 1.0 / np.maximum(hist @ plan.ce_counted, 1.0)
    return np.ascontiguousarray(tm_scale, dtype=np.float64), np.ascontiguousarray(ce_scale, dtype=np.float64)


def tile_width(num_nodes: int) -> int:
    """Pixels per tile: a multiple of 16 with at most about :data:`TILE_ENTRIES` entries, within [64, 256]
    (256 was best or near it for 26 and 149 nodes: docs/performance.md)."""
    return int(min(256, max(64, (TILE_ENTRIES // max(1, num_nodes)) // 16 * 16)))


def tree_min(dtype: int, x: int, shape: tuple[int, int, int], label_channels: int, plan: Plan, gamma: float, *,
             channel_sums: int = 0, loss_map: int = 0, map_scale: int = 0, grad: int = 0, grad_scale: int = 0,
             grad_up: int = 0, ce_sums: int = 0, ce_grad_scale: int = 0, num_threads: int = 1) -> None:
    """Run the kernel on raw addresses (0 = absent). The caller guarantees C-contiguous buffers:
    ``x``, ``loss_map``, ``grad``, ``grad_up`` ``[B, N, P]`` of ``dtype``; ``label_channels`` int64
    ``[B, P]`` (-1 = ignored, else a channel < N); ``channel_sums``, ``map_scale``, ``grad_scale``
    float64 ``[N]``. Output sets: sums, sums + grad, map, grad, grad + grad_up.

    The HSSN objective adds the cross-entropy of every depth (``plan``'s class tables: ``class_offsets``,
    ``class_channels``, ``ce_target``) to the same pass: ``ce_sums`` float64 ``[L]`` receives the
    per-depth sums of ``-log softmax(target)`` over the counted pixels, and ``ce_grad_scale`` float64
    ``[L]`` adds ``sum_d ce_grad_scale[d] * d ce_sums[d] / d x`` to ``grad``. Output sets with them:
    sums + ce_sums, sums + grad + ce_sums + ce_grad_scale, grad + ce_grad_scale."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {load_error()}")
    B, N, P = shape
    if N != plan.num_nodes:
        raise ValueError(f"logits have {N} channels, the hierarchy {plan.num_nodes}")
    edges = plan.int32("edges")  # [E, 2] (child, parent), deepest children first
    pre, size = plan.int32("pre"), plan.int32("size")
    common = (dtype, x, B, N, P, label_channels, edges.ctypes.data, edges.shape[0], pre.ctypes.data, size.ctypes.data,
              float(gamma), channel_sums, loss_map, map_scale, grad, grad_scale, grad_up)
    threads = max(1, int(num_threads))
    if ce_sums or ce_grad_scale:
        status = lib.hieraloss_tree_min_ce(
            *common, plan.max_depth, plan.int32("class_offsets").ctypes.data,
            plan.int32("class_channels").ctypes.data, plan.int32("ce_target").ctypes.data, ce_sums, ce_grad_scale,
            tile_width(N), threads)
    else:
        status = lib.hieraloss_tree_min(*common, tile_width(N), threads)
    if status != 0:
        raise RuntimeError(f"hieraloss native tree_min failed: {_ERRORS.get(status, status)}")


def tree_min_value(dtype: int, x: int, shape: tuple[int, int, int], label_channels: int, plan: Plan, gamma: float,
                   scale: np.ndarray, *, grad: int = 0, factor: float = 1.0, values: bool = True,
                   num_threads: int = 1) -> float | None:
    """The scalar tree-min loss ``sum_v scale[v] * (sum of channel v's entries)`` in one pass of
    :func:`tree_min` (same buffers; ``scale`` from :func:`reduction_scale`). With ``grad`` (an
    address) the pass writes ``factor`` times the loss's gradient there; ``values=False`` writes only
    that (a recomputation in backward) and returns None."""
    grad_scale = np.ascontiguousarray(scale * factor)
    sums = np.empty(shape[1], dtype=np.float64) if values else None
    tree_min(dtype, x, shape, label_channels, plan, gamma, channel_sums=address(sums), grad=grad,
             grad_scale=grad_scale.ctypes.data if grad else 0, num_threads=num_threads)
    return float(np.dot(sums, scale)) if values else None


def hssn_objective(dtype: int, x: int, shape: tuple[int, int, int], label_channels: int, plan: Plan, gamma: float,
                   scales: tuple[np.ndarray, np.ndarray], tree_min_weight: float, ce_weights: np.ndarray, *,
                   grad: int = 0, factor: float = 1.0, values: bool = True, num_threads: int = 1
                   ) -> tuple[float, float, np.ndarray] | None:
    """The HSSN objective ``tree_min_weight * TM + sum_d ce_weights[d] * CE_d`` in one pass of
    :func:`tree_min` (same buffers), with ``scales = (tm_scale, ce_scale)`` from :func:`hssn_scales`:
    ``TM = sum_v tm_scale[v] * channel_sums[v]``, ``CE_d = ce_scale[d] * ce_sums[d]``. Returns
    ``(total, TM, CE [L])``. With ``grad`` (an address) the pass writes ``factor`` times the total's
    gradient there; ``values=False`` writes only that (a recomputation in backward) and returns None."""
    tm_scale, ce_scale = scales
    grad_scale = np.ascontiguousarray(tm_scale * tree_min_weight * factor)
    ce_grad_scale = np.ascontiguousarray(ce_scale * ce_weights * factor)
    sums = np.empty(shape[1], dtype=np.float64) if values else None
    ce_sums = np.empty(ce_scale.size, dtype=np.float64) if values else None
    tree_min(dtype, x, shape, label_channels, plan, gamma, channel_sums=address(sums), ce_sums=address(ce_sums),
             grad=grad, grad_scale=grad_scale.ctypes.data if grad else 0,
             ce_grad_scale=ce_grad_scale.ctypes.data if grad else 0, num_threads=num_threads)
    if not values:
        return None
    tm = float(np.dot(sums, tm_scale))
    ce = ce_sums * ce_scale
    return tree_min_weight * tm + float(np.dot(ce_weights, ce)), tm, ce


class LogicArrays:
    """LogicSeg's rule tables for the kernel (:func:`hieraloss.core.logic.logic_tables` as read-only
    int32 arrays): the (child, parent) clauses, the internal nodes and their children by rank, and the
    exclusion groups as offsets and members; ``tables`` keeps the core's own for the values."""

    def __init__(self, hierarchy: Hierarchy, mode: str):
        from ..core.logic import logic_tables

        t = logic_tables(plan_for(hierarchy), mode)

        def i32(a) -> np.ndarray:
            out = np.ascontiguousarray(a, dtype=np.int32)
            out.setflags(write=False)
            return out

        self.tables = t
        self.edge_child, self.edge_parent, self.internal = i32(t.edge_child), i32(t.edge_parent), i32(t.internal)
        self.child_ranks = i32(np.stack(t.child_ranks) if t.child_ranks else np.zeros((0, 0)))
        self.num_ranks = len(t.child_ranks)
        sizes = [int(g.shape[0]) for g in t.groups]
        self.group_offsets = i32(np.cumsum([0, *sizes]))
        self.group_members = i32(np.concatenate(t.groups) if t.groups else np.zeros(0))
        self.num_pairs = sum(n * (n - 1) // 2 for n in sizes)
        self.num_clauses = self.edge_child.size + self.internal.size + self.num_pairs + len(sizes)


def logic_arrays(hierarchy: Hierarchy, mode: str) -> LogicArrays:
    """The cached :class:`LogicArrays` of ``hierarchy`` for exclusion ``mode``."""
    key = f"logic:{mode}:{hierarchy.fingerprint}"
    arrays = _STATE.get(key)  # a hit takes no lock
    if arrays is None:
        with _LOCK:
            arrays = _STATE.setdefault(key, LogicArrays(hierarchy, mode))
    return arrays  # type: ignore[return-value]


def _logic_call(lib, dtype, x, shape, lc, rules, easy_filter, p, plan, asl, asl_scale, rule_sums, slopes, asl_sum,
                grad, threads):
    B, N, P = shape
    r = rules
    rule_args = ((r.edge_child.size, r.edge_child.ctypes.data, r.edge_parent.ctypes.data, r.internal.size,
                  r.internal.ctypes.data, r.num_ranks, r.child_ranks.ctypes.data, len(r.tables.groups),
                  r.group_offsets.ctypes.data, r.group_members.ctypes.data, r.num_pairs, int(bool(easy_filter)),
                  float(p))
                 if r is not None else (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0))
    gn, gp, clip, eps = asl if asl is not None else (0.0, 0.0, 0.0, 1.0)
    status = lib.hieraloss_logicseg(
        dtype, x, B, N, P, lc, *rule_args,
        plan.int32("pre").ctypes.data if asl is not None else 0,
        plan.int32("size").ctypes.data if asl is not None else 0,
        gn, gp, clip, eps, asl_scale, rule_sums, slopes, asl_sum, grad, tile_width(N), threads)
    if status != 0:
        raise RuntimeError(f"hieraloss native logicseg failed: {_ERRORS.get(status, status)}")


def logicseg(dtype: int, x: int, shape: tuple[int, int, int], label_channels: int, valid: int, hierarchy: Hierarchy,
             *, asl: tuple[float, float, float, float], rules_x: int | None, rules_shape: tuple[int, int, int] | None,
             exclusion: str, easy_filter: bool, p: float, rule_weight: float, grad: int = 0, rules_grad: int = 0,
             num_threads: int = 1) -> tuple[float, float, tuple[float, float, float] | None]:
    """LogicSeg's objective on raw addresses (C-contiguous ``[B, N, P]`` buffers of ``dtype``;
    ``label_channels`` int64 ``[B, P]``, -1 = ignored; ``valid`` the number of valid pixels).

    ``rules_x`` (None: no rules) are the rule logits, ``x`` itself or another buffer of
    ``rules_shape``. Writes ``grad`` (the ASL's gradient divided by ``valid``, plus ``rule_weight``
    times the rules' gradient when ``rules_x`` is ``x``) and ``rules_grad`` (``rule_weight`` times the
    rules' gradient, when they are another buffer); 0 skips a gradient. Returns the objective
    ``ASL + rule_weight * (C + D + E)``, the ASL's value and the rules' values ``(C, D, E)`` (None
    without rules)."""
    from ..core.logic import rules_from_sums

    lib = _load()
    if lib is None:
        raise RuntimeError(f"the compiled CPU kernel is not available: {load_error()}")
    threads = max(1, int(num_threads))
    plan = plan_for(hierarchy)
    values, slopes = None, None
    if rules_x is not None and rules_shape[0] * rules_shape[2] == 0:  # no pixels: no violation (and a null buffer)
        values, rules_x = (0.0, 0.0, 0.0), None
    if shape[0] * shape[2] == 0:
        grad = 0
    rules = logic_arrays(hierarchy, exclusion) if rules_x is not None else None
    if rules is not None:
        sums = np.zeros(rules.num_clauses, dtype=np.float64)
        _logic_call(lib, dtype, rules_x, rules_shape, 0, rules, easy_filter, p, None, None, 0.0, sums.ctypes.data, 0,
                    0, 0, threads)
        values, slopes = rules_from_sums(sums, rules.tables, p, rules_shape[0] * rules_shape[2])
        slopes = np.ascontiguousarray(slopes * float(rule_weight))
    same = rules_x == x and rules_shape == shape
    with_rule_grad = slopes is not None and rule_weight != 0
    asl_sum = np.zeros(1, dtype=np.float64)
    scale = 1.0 / max(valid, 1)
    if shape[0] * shape[2] > 0:
        fused_rules = same and with_rule_grad and bool(grad)  # the rules' gradient in the ASL's pass
        _logic_call(lib, dtype, x, shape, label_channels, rules if fused_rules else None, easy_filter, p, plan, asl,
                    scale, 0, slopes.ctypes.data if fused_rules else 0, asl_sum.ctypes.data, grad, threads)
    if rules_grad and with_rule_grad and not same:
        _logic_call(lib, dtype, rules_x, rules_shape, 0, rules, easy_filter, p, None, None, 0.0, 0, slopes.ctypes.data,
                    0, rules_grad, threads)
    asl_value = float(asl_sum[0]) * scale
    total = asl_value + (rule_weight * sum(values) if values is not None and rule_weight != 0 else 0.0)
    return total, asl_value, values
