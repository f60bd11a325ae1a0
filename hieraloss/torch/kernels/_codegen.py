"""Kernel source specialised per hierarchy: the tree becomes straight-line code.

Every node's logits are one ``[BLOCK_P]`` vector (one pixel per lane), so each step of the tree
walk is a handful of vector instructions with constant node indices: no descendant-table scan, no
``[nodes x pixels]`` masks, no gathers. ``objective_source(h)`` returns a module defining
``objective_kernel``; ``objective.py`` compiles it once per hierarchy (keyed by fingerprint).

Per pixel (label -> ``pc``, ``ec``: pre-order position of the labelled node and the end of its
subtree, -1 when ignored; node v is on the labelled path iff ``pre[v] <= pc < end[v]``, and a
strict descendant of a partial label iff ``pc < pre[v] < ec``):

1. Post-order walk: load ``x_v``; ``zmax_v = max(x_v, zmax of the children)`` with the winner's
   child rank ``sel_v`` (0 = v itself; earlier wins ties, NaN is taken); the negative entry of v
   (value, and for internal nodes the gradient ``g_v`` that is routed in step 3); the logits of
   the path node at each depth; the online log-sum-exp of every depth's cross-entropy classes.
   Each child is folded into its parent's running maximum as soon as it is complete, the ranks
   ``sel_v`` are packed several to an int32, and the running values are pinned every few nodes
   (``_terms.pin``), so what is alive at any point is a few values per open ancestor and per depth.
2. The path, root first: running minimum (the shallowest tied ancestor keeps it), the positive
   entries, and their gradients delivered to the depth that holds each minimum.
3. Pre-order walk (gradient or loss map): ``R_v = g_v + (R_parent if sel_parent picks v)``; node v
   receives ``R_v`` if it wins its own maximum, its path delivery, and its cross-entropy terms.
   Leaf logits are reloaded (from cache: the program just read them) and their negative terms,
   value and gradient from one ``term_loss_grad``, computed here rather than in step 1 (in step 1
   only without a gradient), so registers hold one value per internal node (and its packed rank),
   not per node, and no leaf term is computed twice.

Before step 1, in modes 0 and 1, every program takes its part in the label count that gives the
per-depth denominators and gradient scales (``_reduce.shared_depth_scales``; see ``COUNT_LOOPS``),
so a training step is one launch.

Modes (constexpr ``MODE``, :class:`Mode`): 0 reduced value; 1 reduced value and the gradient of
the weighted total (per-depth scales counted first); 2 tree-min loss map; 3 gradient of
``sum(map * upstream)``. The run-time parameters are written once, in :data:`OBJECTIVE_PARAMS`: the
generated signature, the launch (by keyword) and the ahead-of-time compile read them there.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from ...core.plan import plan_for
from ...hierarchy import Hierarchy
from ._common import WIDE_TREE_NODES
from ._reduce import padded_width, rows_per_step


class Mode(IntEnum):
    """What one launch of the objective kernel computes (its constexpr ``MODE``)."""

    VALUE = 0  # the reduced value, no gradient (evaluation)
    VALUE_GRAD = 1  # the reduced value and the gradient of the weighted total (a training step)
    LOSS_MAP = 2  # the tree-min loss map (reduction="none")
    MAP_GRAD = 3  # the gradient of sum(map * upstream) (the loss map's backward)


class Param(NamedTuple):
    """One run-time parameter of the objective kernel. ``aot``: its type for the ahead-of-time
    compile, a Triton type name with fields filled per specialisation (``kernels._aot``): ``{x}`` the
    logits' type, ``{acc}`` the accumulator's, ``{label}`` the labels', ``{big}`` i32 or i64 (strides
    past int32), ``{go}`` / ``{out}`` the upstream and output maps', ``{count_i32}`` /
    ``{count_f64}`` the label count's buffers (modes 0 and 1; any buffer of ``{acc}`` otherwise).
    ``specialize``: whether Triton may specialise an integer on its value (1, or divisibility by 16)."""

    name: str
    aot: str
    specialize: bool = True


# The objective kernel's run-time parameters, in order, one line of its signature per row: (comment,
# parameters). The generated def, the launch (objective._launch, by keyword) and the AOT compile read it.
OBJECTIVE_PARAMS: tuple[tuple[str, tuple[Param, ...]], ...] = (
    ("logits [B, N, P], any strides",
     (Param("x_ptr", "*{x}"), Param("sxb", "{big}", False), Param("sxn", "i32", False), Param("sxp", "i32", False))),
    ("labels [B, P], any integer dtype",
     (Param("lab_ptr", "*{label}"), Param("slb", "{big}", False), Param("slp", "i32", False))),
    ("int32 label codes: slot clamp(label + shift) -> pre | end << 16, -1 ignored",
     (Param("code_ptr", "*i32"), Param("shift", "{big}", False), Param("ncode", "i32", False))),
    ("float64 [ncode, L2]: the entries per depth of each label slot (MODE 0, 1)", (Param("table_ptr", "*fp64"),)),
    ("node weights [N] (HAS_W)", (Param("w_ptr", "*{acc}"),)),
    ("upstream map [B, N, P] (MODE 3)",
     (Param("go_ptr", "*{go}"), Param("sgb", "{big}", False), Param("sgn", "i32", False), Param("sgp", "i32", False))),
    ("the label count (MODE 0, 1): _reduce.shared_depth_scales",
     (Param("chunks", "i32", False), Param("sync_ptr", "*{count_i32}"), Param("rows_ptr", "*{count_f64}"),
      Param("reduction", "i32", False), Param("spin_limit", "i32", False))),
    ("per-depth gradient scales [L2], written by the label count (MODE 0, 1)", (Param("scale_ptr", "*{acc}"),)),
    ("gradient (MODE 1, 3) or loss map (MODE 2) [B, N, P], any strides",
     (Param("out_ptr", "*{out}"), Param("sob", "{big}", False), Param("son", "i32", False), Param("sop", "i32"))),
    ("per-program sums [B * programs, 2 L]: tree-min then cross-entropy", (Param("part_ptr", "*{acc}"),)),
    ("the reduction of the sums (MODE 0, 1): programs per group, counters, group sums",
     (Param("group", "i32", False), Param("counter_ptr", "*{count_i32}"), Param("gsum_ptr", "*{count_f64}"))),
    ("per-depth denominators and coefficients, the loss's factor; the outputs",
     (Param("denom_ptr", "*{count_f64}"), Param("coef_ptr", "*{count_f64}"), Param("factor", "fp32"),
      Param("total_ptr", "*{acc}"), Param("parts_ptr", "*{acc}"))),
    ("pixels per image; FOCAL: 0 none, 1..4 the integer gamma, -1 any other gamma",
     (Param("P", "i32", False), Param("gamma", "fp32"))),
)


def objective_param_names() -> list[str]:
    """The objective kernel's run-time parameters in signature order."""
    return [p.name for _, row in OBJECTIVE_PARAMS for p in row]


def _signature_lines() -> str:
    """The run-time parameters as the generated def lists them, one commented row per line."""
    rows = [(", ".join(p.name for p in row) + ",", comment) for comment, row in OBJECTIVE_PARAMS]
    width = max(len(names) for names, _ in rows)
    return "\n".join(f"    {names:<{width}}  # {comment}" for names, comment in rows)


def _not_specialized() -> str:
    names = [f'"{p.name}"' for _, row in OBJECTIVE_PARAMS for p in row if not p.specialize]
    return "[" + ",\n                             ".join(
        ", ".join(names[i:i + 9]) for i in range(0, len(names), 9)) + "]"


# Bumped whenever the generated code changes meaning, so cached kernels are never stale.
CODEGEN_VERSION = 14

# Node logits are loaded this many at a time, all in one one-trip loop (see _terms.load_rows for why
# the loop): one load per loop leaves a warp one load in flight, too little to cover memory latency.
# The focal variant, and the plain one in trees of more than WIDE_TREE_NODES nodes, are faster with 8
# (the measurements: docs/performance.md, "The kernels' constants").
LOAD_GROUP = 16
FOCAL_LOAD_GROUP = 8
WIDE_TREE_LOAD_GROUP = 8


# How the objective kernel's label count (_reduce.shared_depth_scales, run once per program before
# the tree walk) is compiled: (function, labels per loop step, row entries per loop step of the sum).
# The count needs few registers of its own, but sharing the kernel moves ptxas's allocation of the
# tree walk: small trees inline it (a call of its own costs more registers than the few values it
# spills inlined), wide trees call it as a function of its own with shorter steps (inlined, it spills
# more there). Registers and spills: docs/performance.md, "The kernels' constants".
COUNT_LOOPS = {"small": ("shared_depth_scales", 512, 512), "wide": ("shared_depth_scales_apart", 256, 512)}


def count_loop(num_nodes: int, depth: int) -> tuple[str, int, int]:
    """(function, labels per loop step, rows per loop step of the sum) of the label count of a tree of
    ``num_nodes`` nodes and ``depth`` levels (``COUNT_LOOPS``)."""
    count, step, entries = COUNT_LOOPS["wide" if num_nodes > WIDE_TREE_NODES else "small"]
    return count, step, max(1, entries // padded_width(2 * depth))


def _one_wide(num_nodes: int) -> str:
    """The trip count the generated kernels give load_rows / store_rows for the loads and stores other
    than the node rows: a run-time 1 in wide trees, where Triton's coalescing pass would otherwise
    spend minutes on them; a constant 1, the plain load, in small trees, where they compile in seconds
    and the plain loads keep ptxas's allocation (fewer registers; docs/performance.md)."""
    return "one" if num_nodes > WIDE_TREE_NODES else "1"


def load_groups(num_nodes: int) -> tuple[int, int]:
    """(plain, focal) node loads per group for a tree of ``num_nodes`` nodes."""
    plain = LOAD_GROUP if num_nodes <= WIDE_TREE_NODES else WIDE_TREE_LOAD_GROUP
    return plain, FOCAL_LOAD_GROUP

# Walk 1's running values are pinned (_terms.pin) every this many nodes. Without pins LLVM sinks the
# per-node terms to their first use at the end of the walk and ptxas keeps every node's inputs alive
# until then. 8 took the fewest registers on both presets; ptxas's allocation is sensitive to where
# the pins fall (the figures: docs/performance.md, "The kernels' constants").
PIN_EVERY = 8


def _group_load(emit, indent: str, group: list[int], base: str, name: str) -> None:
    """Emit the loads of ``group``'s logits from ``base`` into ``{name}{v}`` (compute dtype), all in
    one one-trip loop, so they are in flight together."""
    for k, v in enumerate(group):
        emit(f"{indent}lp{k} = {base} + {v} * sn")
        emit(f"{indent}{name}{v} = tl.zeros([BLOCK_P], x_ptr.dtype.element_ty)")
    emit(f"{indent}for _ in range(0, one):")
    for k, v in enumerate(group):
        emit(f"{indent}    {name}{v} = tl.load(lp{k}, mask=pmask, other=0.0)")
    for k, _v in enumerate(group):
        emit(f"{indent}    lp{k} += one - 1")
    for v in group:
        emit(f"{indent}{name}{v} = {name}{v}.to(CT)")


def _loads_starting_at(emit, indent: str, seq: list[int], i: int, base: str, name: str,
                       groups: tuple[int, int]) -> None:
    """The group loads that start at position ``i`` of ``seq``: groups of ``groups[0]`` nodes, or of
    ``groups[1]`` in the focal variant (a constexpr branch: each compiled variant has one)."""
    plain, focal = groups
    starts_plain, starts_focal = i % plain == 0, i % focal == 0
    if plain == focal or not (starts_plain or starts_focal):
        if starts_plain:
            _group_load(emit, indent, seq[i:i + plain], base, name)
        return
    if starts_focal:
        emit(f"{indent}if FOCAL:")
        _group_load(emit, indent + "    ", seq[i:i + focal], base, name)
    if starts_plain:
        emit(f"{indent}if not FOCAL:")
        _group_load(emit, indent + "    ", seq[i:i + plain], base, name)


_HEADER = '''\
"""Generated by hieraloss.torch.kernels._codegen for hierarchy {fingerprint} (N={n}, L={L})."""
import triton
import triton.language as tl

from hieraloss.torch.kernels._terms import (
    exp, load_rows, log, lse_update, opaque, pin, store_rows, term_grad, term_loss, term_loss_grad,
)
from hieraloss.torch.kernels._reduce import finalize_sums, shared_depth_scales, shared_depth_scales_apart

N = tl.constexpr({n})
L = tl.constexpr({L})
L2 = tl.constexpr({l2})  # per-depth sums: tree-min then cross-entropy
D2 = tl.constexpr({d2})
RB = tl.constexpr({rb})
COUNT_STEP = tl.constexpr({count_step})
COUNT_RB = tl.constexpr({count_rb})


# sop is left to Triton's specialisation of 1: a contiguous output (the usual one) costs no multiply
# and no register for it; channels_last logits get a compile of their own.
@triton.jit(do_not_specialize={do_not_specialize})
def objective_kernel(
{params}
    # CB: labels per chunk of the label count
    BLOCK_P: tl.constexpr, CB: tl.constexpr, F64: tl.constexpr, FOCAL: tl.constexpr, HAS_W: tl.constexpr,
    TM: tl.constexpr, CE: tl.constexpr, MODE: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    GRAD: tl.constexpr = MODE == 1 or MODE == 3
    VALUE: tl.constexpr = MODE == 0 or MODE == 1
    if VALUE:
        # The denominators and, before the gradient needs them, the scales: counted in this launch.
        {count}(lab_ptr, slb, slp, shift, ncode, table_ptr, P, chunks, sync_ptr, rows_ptr, reduction,
            spin_limit, coef_ptr, denom_ptr, scale_ptr, MODE == 1, L2, D2, CB, COUNT_STEP, COUNT_RB, F64)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < P
    o64 = offs.to(tl.int64)
    sn = sxn.to(tl.int64)
    xb = x_ptr + b * sxb + o64 * sxp
    # The node rows are loaded and stored through load_rows / store_rows (see there why) with a
    # run-time 1 as their trip count; so are, in wide trees, the other loads and stores.
    one = (ncode > 0).to(tl.int32)
    one_wide = {one_wide}
    lab = load_rows(lab_ptr + b * slb + o64 * slp, pmask, one_wide)
    slot = tl.minimum(tl.maximum(lab.to(tl.int64) + shift, 0), ncode - 1)
    code = load_rows(code_ptr + slot, pmask, one_wide, -1)
    valid = code >= 0
    pc = tl.where(valid, code & 65535, -1)
    ec = tl.where(valid, code >> 16, -1)
    zero = tl.zeros([BLOCK_P], CT)
    if MODE == 3:
        gn = sgn.to(tl.int64)
        gob = go_ptr + b * sgb + o64 * sgp
    if MODE != 0:
        on = son.to(tl.int64)
        ob = out_ptr + b * sob + o64 * sop
        # The pre-order walk derives its addresses and path tests from opaque copies, so the compiler
        # cannot merge them with the first walk's and keep one value per node alive in between.
        xb3 = x_ptr + b * sxb + opaque(o64) * sxp
        pc3 = opaque(pc)
        ec3 = opaque(ec)
'''


I1, I2, I3 = " " * 4, " " * 8, " " * 12  # the indents of the kernel body and of its `if` blocks


class _ObjectiveWriter:
    """Writes the objective kernel for one tree: one method per part of the walk (the module
    docstring's steps), each emitting straight-line code with the tree's values as constants.

    Names in the kernel, per node v and depth d (0-based): ``x{v}`` its logits, ``y{v}`` "on the
    labelled path", ``zm{v}`` its zmax, ``zr{v}`` / ``sr{v}`` the running maximum over the children
    folded so far and the winner's rank; ``xp{d}`` / ``pn{d}`` / ``on{d}`` the logits, channel and
    presence of the path node at depth d; ``tms{d}`` the tree-min sums; ``m{d}`` / ``s{d}`` the
    online log-sum-exp of depth d's classes and ``xt{d}`` / ``kn{d}`` the target's logit and whether
    the pixel counts; ``g{v}`` an internal node's negative gradient, ``dp{d}`` the path gradient
    delivered to depth d, ``r{v}`` the gradient routed down from v's zmax, ``sw{w}`` the packed ranks.
    """

    def __init__(self, h: Hierarchy):
        self.tree = t = plan_for(h)  # its values go into the source
        self.L = L = t.max_depth
        self.ce_sets = [set(chans.tolist()) for chans in t.depth_channels]  # depth d+1: its nodes, shallower leaves
        d2 = padded_width(2 * L)
        count, step, count_rb = count_loop(t.num_nodes, L)
        self.lines = [_HEADER.format(fingerprint=h.fingerprint[:16], n=t.num_nodes, L=L, l2=2 * L, d2=d2,
                                     rb=rows_per_step(d2), count=count, count_step=step, count_rb=count_rb,
                                     one_wide=_one_wide(t.num_nodes), params=_signature_lines(),
                                     do_not_specialize=_not_specialized())]
        self.emit = self.lines.append
        self.groups = load_groups(t.num_nodes)
        self.post = t.postorder.tolist()
        self.pre = t.preorder.tolist()
        # The winner ranks (0..fan-out) of the internal nodes, kept from walk 1 to walk 3, are packed
        # several to an int32 word (below the sign bit): node v's rank is bits [sh, sh + bits) of word
        # ``sw{w}``, (w, sh) = slot[v], and every constant it is compared with is shifted to match.
        bits = max(1, max((len(c) for c in t.children), default=0).bit_length())
        per_word = 31 // bits
        internal = [v for v in self.post if not t.is_leaf[v]]
        self.slot = {v: (j // per_word, (j % per_word) * bits) for j, v in enumerate(internal)}
        self.rank_mask = (1 << bits) - 1

    def source(self) -> str:
        self.declare_running_values()
        self.post_order_walk()
        self.labelled_path()
        self.cross_entropy_sums()
        self.pre_order_walk()
        self.totals()
        self.emit("")
        return "\n".join(self.lines)

    # ------------------------------------------------------------ expressions
    def on_path(self, v: int, pc: str = "pc") -> str:
        return f"({pc} >= {self.tree.pre[v]}) & ({pc} < {self.tree.end[v]})"

    def counted_negative(self, v: int, y: str, pc: str = "pc", ec: str = "ec") -> str:
        """Valid (pc >= 0), not a strict descendant of a partial label, not on the path."""
        return f"({pc} >= 0) & ~(({pc} < {self.tree.pre[v]}) & ({ec} > {self.tree.pre[v]})) & ~{y}"

    @staticmethod
    def weight(v: int) -> str:
        return f"tl.load(w_ptr + {v}).to(CT)"

    def ce_depths(self, v: int) -> list[int]:
        """The depths whose cross-entropy classes hold v."""
        return [d for d in range(self.L) if v in self.ce_sets[d]]

    # ------------------------------------------------------------ the parts
    def declare_running_values(self) -> None:
        emit, L = self.emit, self.L
        for d in range(L):
            emit(f"{I1}xp{d} = zero")
            emit(f"{I1}pn{d} = tl.zeros([BLOCK_P], tl.int32)")
            emit(f"{I1}on{d} = tl.zeros([BLOCK_P], tl.int1)")
        emit(f"{I1}if TM:")
        for d in range(L):
            emit(f"{I2}tms{d} = zero")
            emit(f"{I2}if MODE == 1:")
            emit(f"{I3}tsc{d} = tl.load(scale_ptr + {d}, cache_modifier=\".cg\").to(CT)")
        emit(f"{I1}if CE:")
        for d in range(L):
            emit(f"{I2}xt{d} = zero")
            emit(f"{I2}kn{d} = tl.zeros([BLOCK_P], tl.int1)")
            emit(f"{I2}if MODE == 1:")
            emit(f"{I3}csc{d} = tl.load(scale_ptr + {L + d}, cache_modifier=\".cg\").to(CT)")

    def post_order_walk(self) -> None:
        """Step 1: zmax and the winner's rank, the negative entries, the path nodes, the softmax sums."""
        t, emit = self.tree, self.emit
        self.ce_started = [False] * self.L
        self.open_nodes: set[int] = set()  # internal nodes with some children folded, not yet complete
        for i, v in enumerate(self.post):
            dv = int(t.depth[v]) - 1
            if i and i % PIN_EVERY == 0:
                self.pin_running_values()
            _loads_starting_at(emit, I1, self.post, i, "xb", "x", self.groups)
            emit(f"{I1}# node {v} (depth {dv + 1}{', leaf' if t.is_leaf[v] else ''})")
            emit(f"{I1}y{v} = {self.on_path(v)}")
            emit(f"{I1}xp{dv} = tl.where(y{v}, x{v}, xp{dv})")
            emit(f"{I1}pn{dv} = tl.where(y{v}, {v}, pn{dv})")
            emit(f"{I1}on{dv} = on{dv} | y{v}")
            self.zmax(v)
            self.negative_entry(v, dv)
            self.softmax_sums(v)
            self.fold_into_parent(v)

    def pin_running_values(self) -> None:
        """The running values, computed by now (see PIN_EVERY)."""
        emit, L = self.emit, self.L
        for d in range(L):
            emit(f"{I1}xp{d} = pin(xp{d})")
            emit(f"{I1}pn{d} = pin(pn{d})")
            emit(f"{I1}on{d} = pin(on{d})")
        emit(f"{I1}if TM:")
        for d in range(L):
            emit(f"{I2}tms{d} = pin(tms{d})")
        emit(f"{I1}if CE:")
        for d in range(L):
            if self.ce_started[d]:
                emit(f"{I2}m{d} = pin(m{d})")
                emit(f"{I2}s{d} = pin(s{d})")
            emit(f"{I2}xt{d} = pin(xt{d})")
            emit(f"{I2}kn{d} = pin(kn{d})")
        for u in sorted(self.open_nodes):
            emit(f"{I1}zr{u} = pin(zr{u})")
            emit(f"{I1}sr{u} = pin(sr{u})")

    def zmax(self, v: int) -> None:
        emit = self.emit
        if self.tree.is_leaf[v]:
            emit(f"{I1}zm{v} = x{v}")
            return
        # The children were folded into (zr, sr) as each completed (fold_into_parent). In the order v
        # (rank 0), children 1..k, v wins unless a child is NaN (the last NaN is taken), if it ties or
        # beats the children's maximum or is NaN itself.
        emit(f"{I1}pw = (x{v} >= zr{v}) | ((x{v} != x{v}) & (zr{v} == zr{v}))")
        emit(f"{I1}zm{v} = tl.where(pw, x{v}, zr{v})")
        w, sh = self.slot[v]
        rank = f"tl.where(pw, 0, sr{v})"  # already shifted to its place in the word
        emit(f"{I1}sw{w} = {rank}" if sh == 0 else f"{I1}sw{w} = sw{w} | {rank}")
        self.open_nodes.discard(v)

    def negative_entry(self, v: int, dv: int) -> None:
        emit = self.emit
        emit(f"{I1}if TM:")
        emit(f"{I2}ng = {self.counted_negative(v, f'y{v}')}")
        emit(f"{I2}wv = {self.weight(v)} if HAS_W else 1.0")
        emit(f"{I2}if MODE == 0:")
        emit(f"{I3}tms{dv} += tl.where(ng, term_loss(zm{v}, gamma, FOCAL) * wv, 0.0)")
        if self.tree.is_leaf[v]:
            # A leaf's value and gradient come from one term_loss_grad in the pre-order walk, which
            # reloads its logit anyway: here only the value without a gradient.
            return
        emit(f"{I2}if MODE == 1:")
        emit(f"{I3}lv, dv_ = term_loss_grad(zm{v}, gamma, FOCAL)")
        emit(f"{I3}tms{dv} += tl.where(ng, lv * wv, 0.0)")
        emit(f"{I3}g{v} = pin(tl.where(ng, dv_ * (wv * tsc{dv}), 0.0))")
        emit(f"{I2}if MODE == 2:")
        emit(f"{I3}g{v} = pin(tl.where(ng, term_loss(zm{v}, gamma, FOCAL) * wv, 0.0))")
        emit(f"{I2}if MODE == 3:")
        emit(f"{I3}gov = load_rows(gob + {v} * gn, pmask, one).to(CT)")
        emit(f"{I3}g{v} = pin(tl.where(ng, term_grad(zm{v}, gamma, FOCAL) * wv * gov, 0.0))")

    def softmax_sums(self, v: int) -> None:
        """v's logit into the online log-sum-exp of every depth whose classes hold it."""
        emit, members = self.emit, self.ce_depths(v)
        if not members:
            return
        emit(f"{I1}if CE:")
        for d in members:
            if not self.ce_started[d]:
                emit(f"{I2}m{d} = x{v}")
                emit(f"{I2}s{d} = zero + 1.0")
                self.ce_started[d] = True
            else:
                emit(f"{I2}m{d}, s{d} = lse_update(m{d}, s{d}, x{v})")
            emit(f"{I2}xt{d} = tl.where(y{v}, x{v}, xt{d})")
            emit(f"{I2}kn{d} = kn{d} | y{v}")

    def fold_into_parent(self, v: int) -> None:
        """v into its parent's running maximum over the children, as soon as v is complete (in order;
        the earlier wins ties, a NaN is taken): no child's value waits for the parent."""
        emit, p = self.emit, int(self.tree.parent[v])
        if p < 0:
            return
        k = self.tree.child_rank[v] + 1
        if k == 1:
            emit(f"{I1}zr{p} = zm{v}")
            emit(f"{I1}sr{p} = tl.zeros([BLOCK_P], tl.int32) + {1 << self.slot[p][1]}")
            self.open_nodes.add(p)
        else:
            emit(f"{I1}bt = (zm{v} > zr{p}) | (zm{v} != zm{v})")
            emit(f"{I1}zr{p} = tl.where(bt, zm{v}, zr{p})")
            emit(f"{I1}sr{p} = tl.where(bt, {k << self.slot[p][1]}, sr{p})")

    def labelled_path(self) -> None:
        """Step 2: the running minimum down the path, the positive entries and their gradients."""
        emit = self.emit
        emit(f"{I1}if TM:")
        emit(f"{I2}zmin = xp0")
        emit(f"{I2}am = tl.zeros([BLOCK_P], tl.int32)")
        for d in range(self.L):
            emit(f"{I2}dp{d} = zero")
        for d in range(self.L):
            if d:
                emit(f"{I2}lw = (xp{d} < zmin) | (xp{d} != xp{d})")
                emit(f"{I2}zmin = tl.where(lw, xp{d}, zmin)")
                emit(f"{I2}am = tl.where(lw, {d}, am)")
            emit(f"{I2}wp = load_rows(w_ptr + pn{d}, on{d}, one_wide).to(CT) if HAS_W else 1.0")
            emit(f"{I2}if MODE == 0:")
            emit(f"{I3}tms{d} += tl.where(on{d}, term_loss(-zmin, gamma, FOCAL) * wp, 0.0)")
            emit(f"{I2}if MODE == 2:")
            emit(f"{I3}pl{d} = tl.where(on{d}, term_loss(-zmin, gamma, FOCAL) * wp, 0.0)")
            emit(f"{I2}if GRAD:")
            emit(f"{I3}if MODE == 1:")
            emit(f"{I3}    lp, dl = term_loss_grad(-zmin, gamma, FOCAL)")
            emit(f"{I3}    tms{d} += tl.where(on{d}, lp * wp, 0.0)")
            emit(f"{I3}    up = wp * tsc{d}")
            emit(f"{I3}else:")
            emit(f"{I3}    dl = term_grad(-zmin, gamma, FOCAL)")
            emit(f"{I3}    up = wp * load_rows(gob + pn{d}.to(tl.int64) * gn, on{d}, one_wide).to(CT)")
            emit(f"{I3}gp = tl.where(on{d}, -dl * up, 0.0)")
            for k in range(d + 1):
                emit(f"{I3}dp{k} += tl.where(am == {k}, gp, 0.0)")

    def cross_entropy_sums(self) -> None:
        """Each depth's cross-entropy summed over the program's pixels, into its row of part_ptr."""
        emit, L = self.emit, self.L
        emit(f"{I1}if VALUE:")
        emit(f"{I2}part = part_ptr + (b * tl.num_programs(0) + pid) * {2 * L}")
        emit(f"{I2}if CE:")
        for d in range(L):
            emit(f"{I3}lse{d} = m{d} + log(s{d})")
            emit(f"{I3}tl.store(part + {L + d}, tl.sum(tl.where(kn{d}, lse{d} - xt{d}, 0.0), axis=0))")

    def pre_order_walk(self) -> None:
        """Step 3 (modes 1-3): every node's gradient (or loss map entry), routed down from the zmax."""
        t, emit = self.tree, self.emit
        # The cross-entropy's softmax exp: _terms.exp (one MUFU op) for small trees, tl.exp for wide
        # ones (the ftz exp made ptxas spill in wide trees' kernels: docs/kernels.md).
        ce_exp = "exp" if t.num_nodes <= WIDE_TREE_NODES else "tl.exp"
        emit(f"{I1}if MODE != 0:")
        reload = [v for v in self.pre if t.is_leaf[v] or self.ce_depths(v)]
        for v in self.pre:
            dv = int(t.depth[v]) - 1
            p = int(t.parent[v])
            members = self.ce_depths(v)
            if v in reload:
                _loads_starting_at(emit, I2, reload, reload.index(v), "xb3", "xl", self.groups)
            emit(f"{I2}# node {v}")
            emit(f"{I2}y = {self.on_path(v, 'pc3')}")
            if t.is_leaf[v] or members:
                emit(f"{I2}xv = xl{v}")
            emit(f"{I2}gr = zero")
            emit(f"{I2}if TM:")
            if not t.is_leaf[v]:
                w, sh = self.slot[v]
                emit(f"{I3}sl{v} = sw{w} & {self.rank_mask << sh}")  # v's winner rank, shifted by sh
            rin = f"tl.where(sl{p} == {(t.child_rank[v] + 1) << self.slot[p][1]}, r{p}, 0.0)" if p >= 0 else "zero"
            if t.is_leaf[v]:
                self.leaf_gradient(v, dv, rin)
            else:
                emit(f"{I3}if MODE == 2:")
                emit(f"{I3}    gr = tl.where(y, pl{dv}, g{v})")
                emit(f"{I3}else:")
                emit(f"{I3}    r{v} = {rin} + g{v}")
                emit(f"{I3}    gr = tl.where(sl{v} == 0, r{v}, 0.0) + tl.where(y, dp{dv}, 0.0)")
            if members:
                emit(f"{I2}if CE:")
                for d in members:
                    emit(f"{I3}gr += tl.where(kn{d}, csc{d} * ({ce_exp}(xv - lse{d}) - tl.where(y, 1.0, 0.0)), 0.0)")
            emit(f"{I2}store_rows(ob + {v} * on, gr.to(out_ptr.dtype.element_ty), pmask, one)")

    def leaf_gradient(self, v: int, dv: int, rin: str) -> None:
        """A leaf's negative entry (value and gradient from one term_loss_grad), what its parent routes
        to it, and its path delivery."""
        emit = self.emit
        emit(f"{I3}ng = {self.counted_negative(v, 'y', 'pc3', 'ec3')}")
        emit(f"{I3}wv = {self.weight(v)} if HAS_W else 1.0")
        emit(f"{I3}if MODE == 1:")
        emit(f"{I3}    lv, dv_ = term_loss_grad(xv, gamma, FOCAL)")
        emit(f"{I3}    tms{dv} = pin(tms{dv} + tl.where(ng, lv * wv, 0.0))")
        emit(f"{I3}    gv = tl.where(ng, dv_ * (wv * tsc{dv}), 0.0)")
        emit(f"{I3}if MODE == 2:")
        emit(f"{I3}    gv = tl.where(ng, term_loss(xv, gamma, FOCAL) * wv, 0.0)")
        emit(f"{I3}if MODE == 3:")
        emit(f"{I3}    gov = load_rows(gob + {v} * gn, pmask, one).to(CT)")
        emit(f"{I3}    gv = tl.where(ng, term_grad(xv, gamma, FOCAL) * wv * gov, 0.0)")
        emit(f"{I3}if MODE == 2:")
        emit(f"{I3}    gr = tl.where(y, pl{dv}, gv)")
        emit(f"{I3}else:")
        emit(f"{I3}    gr = {rin} + gv + tl.where(y, dp{dv}, 0.0)")

    def totals(self) -> None:
        """Step 4: the tree-min sums into part_ptr; the last programs reduce every part to the total."""
        emit = self.emit
        emit(f"{I1}if VALUE:")
        emit(f"{I2}if TM:")
        for d in range(self.L):
            emit(f"{I3}tl.store(part + {d}, tl.sum(tms{d}, axis=0))")
        emit(f"{I2}finalize_sums(part_ptr, group, counter_ptr, gsum_ptr, denom_ptr, coef_ptr, factor, total_ptr,")
        emit(f"{I2}              parts_ptr, one_wide, L2, D2, RB, TM, CE, F64)")


def objective_source(h: Hierarchy) -> str:
    """Python source of a module holding ``objective_kernel`` specialised for ``h``."""
    return _ObjectiveWriter(h).source()


_DECODE_HEADER = '''

@triton.jit(do_not_specialize=["sxb", "sxn", "sxp", "P"])
def decode_kernel(
    x_ptr, sxb, sxn, sxp,             # logits [B, N, P], any strides
    anc_ptr, ids_ptr,                 # int32 ancestor table [N, L], int64 node ids [N]
    leaf_out_ptr, depth_out_ptr,      # int64 [B, P], [B, L, P]
    P,
    BLOCK_P: tl.constexpr, F64: tl.constexpr, TOP_DOWN: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < P
    o64 = offs.to(tl.int64)
    sn = sxn.to(tl.int64)
    xb = x_ptr + b * sxb + o64 * sxp
    one = (P > 0).to(tl.int32)  # a run-time 1: the trip count of load_rows / store_rows
'''


def decode_source(h: Hierarchy) -> str:
    """Source of ``decode_kernel`` for ``h``: ``path`` (argmax over leaves of the sum of logits along
    the path, ties to the lowest leaf channel) or ``top_down`` (the best child of the node chosen so
    far, ties to the lowest channel), as straight-line code over ``[BLOCK_P]`` vectors."""
    t = plan_for(h)
    lines = [_DECODE_HEADER]
    emit = lines.append

    def load(v: int) -> str:
        return f"load_rows(xb + {v} * sn, pmask, one).to(CT)"

    emit(f"{I1}if TOP_DOWN:")
    # The best child of every parent (the implicit root included), children in channel order.
    parents = [-1] + [v for v in range(t.num_nodes) if not t.is_leaf[v]]
    for u in parents:
        kids = t.roots if u < 0 else t.children[u]
        name = "root" if u < 0 else str(u)
        emit(f"{I2}bx = {load(kids[0])}")
        emit(f"{I2}ch_{name} = tl.zeros([BLOCK_P], tl.int32) + {kids[0]}")
        for c in kids[1:]:
            emit(f"{I2}xc = {load(c)}")
            emit(f"{I2}bt = xc > bx")
            emit(f"{I2}bx = tl.where(bt, xc, bx)")
            emit(f"{I2}ch_{name} = tl.where(bt, {c}, ch_{name})")
    emit(f"{I2}cur = ch_root")
    for _ in range(t.max_depth - 1):
        emit(f"{I2}nxt = cur")
        for u in parents[1:]:
            emit(f"{I2}nxt = tl.where(cur == {u}, ch_{u}, nxt)")
        emit(f"{I2}cur = nxt")
    emit(f"{I2}leaf = cur")
    emit(f"{I1}else:")
    first = True

    def walk(v: int, parent_sum: str | None) -> None:
        nonlocal first
        s = f"s{v}"
        emit(f"{I2}{s} = {load(v)}" + (f" + {parent_sum}" if parent_sum else ""))
        if t.is_leaf[v]:
            if first:
                emit(f"{I2}best = {s}")
                emit(f"{I2}leaf = tl.zeros([BLOCK_P], tl.int32) + {v}")
                first = False
            else:
                emit(f"{I2}bt = ({s} > best) | (({s} == best) & (leaf > {v}))")
                emit(f"{I2}best = tl.where(bt, {s}, best)")
                emit(f"{I2}leaf = tl.where(bt, {v}, leaf)")
        for c in t.children[v]:
            walk(c, s)

    for r in t.roots:
        walk(r, None)
    emit(f"{I1}leaf = tl.where(pmask, leaf, 0)")
    emit(f"{I1}one_wide = {_one_wide(t.num_nodes)}")
    emit(f"{I1}store_rows(leaf_out_ptr + b * P + o64, load_rows(ids_ptr + leaf, pmask, one_wide), pmask, one)")
    for d in range(t.max_depth):
        emit(f"{I1}node = load_rows(anc_ptr + leaf * {t.max_depth} + {d}, pmask, one_wide)")
        emit(f"{I1}store_rows(depth_out_ptr + (b * {t.max_depth} + {d}) * P + o64, load_rows(ids_ptr + node, pmask, "
             "one_wide), pmask, one)")
    emit("")
    return "\n".join(lines)
