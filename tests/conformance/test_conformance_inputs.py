"""One answer per input, for every backend (issue 13).

The same bad input raises the same exception type with the same message in numpy, torch (the
compiled CPU kernel where built, and the vectorized ops) and paddle (likewise): the messages are
written once, in ``hieraloss/core/checks.py``. Empty inputs (B = 0 or a zero-size spatial axis) give an
exact 0 connected to the graph, empty maps and empty gradients; bool labels raise ``LabelError``.

Written once over the adapters of tests/backends.py (``Direct`` calls each library with numpy
inputs turned into that framework's tensors of the same dtype).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from backends import BACKENDS, Direct, as_dtype

from hieraloss import LabelError, presets
from hieraloss.core.checks import NumberExpectedError
from hieraloss.metrics import HierarchicalSegMetrics

H = presets.cityscapes()
N, L = H.num_nodes, H.max_depth
LOSSES = ("tree_min_loss", "focal_tree_min_loss")
LOGIC_LOSSES = ("logicseg_loss", "asymmetric_bce_loss")  # LogicSeg: no node_weight, no reduction
ALL_LOSSES = (*LOSSES, "hssn_loss", "depth_cross_entropy", *LOGIC_LOSSES)  # hssn, depth CE: torch and paddle only
REDUCTIONS = ("mean", "sum", "none", "hssn")
METHODS = ("path", "hssn", "top_down", "independent")


def _directs():
    out = []
    for param in BACKENDS:
        adapter = param.values[0]
        if adapter is None:  # framework not installed: skipped by the other suites too
            continue
        out.append(Direct(adapter))
    return out


DIRECTS = _directs()


def _x(shape=(2, N, 3), dtype=np.float64):
    return np.zeros(shape, dtype=dtype)


def _labels(shape=(2, 3), dtype=np.int64):
    return np.zeros(shape, dtype=dtype)


def _loss_args(fn, x=None, labels=None):
    """Positional arguments of ``fn`` (``depth_cross_entropy`` takes a depth)."""
    x = _x() if x is None else x
    labels = _labels() if labels is None else labels
    return (x, labels, H, 2) if fn == "depth_cross_entropy" else (x, labels, H)


def _bad_cases():
    """(id, fn, args, kwargs, expected exception type, a word the message must hold)."""
    cases = []
    bad_values = np.array([[0, 26, 300], [0, -3, 0]])
    for fn in ALL_LOSSES:
        cases += [
            (f"{fn}-labels-float", fn, _loss_args(fn, labels=_labels(dtype=np.float32)), {}, LabelError, "float32"),
            (f"{fn}-labels-bool", fn, _loss_args(fn, labels=_labels(dtype=bool)), {}, LabelError, "bool"),
            (f"{fn}-labels-complex", fn, _loss_args(fn, labels=_labels(dtype=np.complex64)), {}, LabelError,
             "complex64"),
            (f"{fn}-labels-shape", fn, _loss_args(fn, labels=_labels((2, 4))), {}, ValueError, "(2, 4)"),
            (f"{fn}-labels-rank", fn, _loss_args(fn, labels=_labels((2, 3, 1))), {}, ValueError, "axis 1"),
            (f"{fn}-labels-values", fn, _loss_args(fn, labels=bad_values), {}, LabelError, "-3, 26, 300"),
            (f"{fn}-logits-int", fn, _loss_args(fn, x=_x(dtype=np.int64)), {}, TypeError, "int64"),
            (f"{fn}-logits-bool", fn, _loss_args(fn, x=_x(dtype=bool)), {}, TypeError, "bool"),
            (f"{fn}-logits-1d", fn, _loss_args(fn, x=_x((N,))), {}, ValueError, "[B, N, *spatial]"),
            (f"{fn}-logits-channels", fn, _loss_args(fn, x=_x((2, N - 1, 3))), {}, ValueError, "25 channels"),
            (f"{fn}-ignore-collides", fn, _loss_args(fn), {"ignore_index": 3}, LabelError, "collides"),
            (f"{fn}-ignore-str", fn, _loss_args(fn), {"ignore_index": "255"}, TypeError, "ignore_index"),
            (f"{fn}-ignore-float", fn, _loss_args(fn), {"ignore_index": 255.0}, TypeError, "ignore_index"),
            (f"{fn}-ignore-bool", fn, _loss_args(fn), {"ignore_index": True}, TypeError, "ignore_index"),
        ]
        if fn not in ("depth_cross_entropy", *LOGIC_LOSSES):
            cases += [
                (f"{fn}-node-weight-shape", fn, _loss_args(fn), {"node_weight": np.ones(5)}, ValueError, "(5,)"),
                (f"{fn}-node-weight-2d", fn, _loss_args(fn), {"node_weight": np.ones((1, N))}, ValueError,
                 "(1, 26)"),
                (f"{fn}-node-weight-bool", fn, _loss_args(fn), {"node_weight": np.ones(N, dtype=bool)},
                 TypeError, "bool"),
            ]
        if fn in LOSSES:
            cases += [
                (f"{fn}-reduction", fn, _loss_args(fn), {"reduction": "average"}, ValueError, "'average'"),
                (f"{fn}-reduction-none", fn, _loss_args(fn), {"reduction": None}, ValueError, "reduction"),
                (f"{fn}-not-finite", fn, _loss_args(fn, x=np.array([[[math.nan] * 3] * N, [[math.inf] * 3] * N])),
                 {"check_finite": True}, ValueError, f"{6 * N} non-finite"),
            ]
    K = H.num_leaves
    leaf_x = np.zeros((2, K, 3))
    leaf_x[0, 1, 2], leaf_x[1, 0, 0], leaf_x[1, 3, 1] = math.nan, math.inf, -math.inf
    for fn in ("hierarchical_cross_entropy", "soft_label_cross_entropy"):
        cases += [
            (f"{fn}-not-finite", fn, (leaf_x, _labels(), H), {"check_finite": True}, ValueError,
             "leaf_logits hold 3 non-finite values (nan or inf)"),
            (f"{fn}-labels-before-finite", fn, (leaf_x, _labels(dtype=np.float32), H), {"check_finite": True},
             LabelError, "float32"),
        ]
    for fn in ("hssn_loss", "depth_cross_entropy", *LOGIC_LOSSES):
        cases += [
            (f"{fn}-not-finite", fn, _loss_args(fn, x=np.array([[[math.nan] * 3] * N, [[math.inf] * 3] * N])),
             {"check_finite": True}, ValueError, f"{6 * N} non-finite"),
            (f"{fn}-labels-before-finite", fn, _loss_args(fn, x=np.full((2, N, 3), math.nan),
                                                          labels=_labels(dtype=np.float32)),
             {"check_finite": True}, LabelError, "float32"),
        ]
    rule_x = np.zeros((2, N, 2))
    rule_x[1, 3, 1] = -math.inf
    cases.append(("logicseg_loss-rule-logits-not-finite", "logicseg_loss", _loss_args("logicseg_loss"),
                  {"check_finite": True, "rule_logits": rule_x}, ValueError,
                  "rule_logits hold 1 non-finite value"))
    for gamma in (math.inf, -math.inf, math.nan, -1.0, True, False, "two", None):
        cases.append((f"focal-gamma-{gamma!r}", "focal_tree_min_loss", _loss_args("focal_tree_min_loss"),
                      {"gamma": gamma}, ValueError, f"gamma must be a finite number >= 0, got {gamma!r}"))
    for gamma in (math.inf, -1.0, True, "two"):
        cases.append((f"hssn-focal-gamma-{gamma!r}", "hssn_loss", _loss_args("hssn_loss"), {"focal_gamma": gamma},
                      ValueError, "gamma must be a finite number >= 0"))
    for p, needle in ((0.5, "p must be a finite number >= 1"), (math.nan, "p must be a finite number >= 1"),
                      (True, "p must be a finite number >= 1")):
        cases.append((f"logicseg-p-{p!r}", "logicseg_loss", _loss_args("logicseg_loss"), {"p": p}, ValueError, needle))
    cases += [
        ("logicseg-exclusion", "logicseg_loss", _loss_args("logicseg_loss"), {"exclusion": "pairs"}, ValueError,
         "exclusion must be one of ('siblings', 'level'), got 'pairs'"),
        ("logicseg-ramp", "logicseg_loss", _loss_args("logicseg_loss"), {"ramp": (3, 1)}, ValueError,
         "ramp must be (start, end) with 0 <= start <= end"),
        ("logicseg-step", "logicseg_loss", _loss_args("logicseg_loss"), {"step": -2}, ValueError,
         "step must be None or a number >= 0"),
        ("logicseg-rule-logits-channels", "logicseg_loss", _loss_args("logicseg_loss"),
         {"rule_logits": _x((2, N - 1, 3))}, ValueError, "25 channels"),
        ("asl-clip", "asymmetric_bce_loss", _loss_args("asymmetric_bce_loss"), {"clip": 1.5}, ValueError,
         "clip must be in [0, 1)"),
        ("asl-gamma", "asymmetric_bce_loss", _loss_args("asymmetric_bce_loss"), {"gamma_neg": -1}, ValueError,
         "gamma_neg must be a finite number >= 0"),
        ("exclusion-loss-mode", "exclusion_loss", (_x(), H), {"exclusion": "all"}, ValueError, "exclusion"),
        ("logic-refine-steps", "logic_refine", (_x(), H), {"steps": -1}, ValueError, "steps must be an int >= 0"),
    ]
    for depth in (0, L + 1, -1, 1.0, 1.5, True, "1"):
        cases.append((f"depth-{depth!r}", "depth_cross_entropy", (_x(), _labels(), H, depth), {}, ValueError,
                      f"depth must be in 1..{L}, got {depth!r}"))
    cases += [
        ("decode-channels", "decode", (_x((1, N - 1, 2)), H), {}, ValueError, "25 channels"),
        ("decode-int", "decode", (_x(dtype=np.int32), H), {}, TypeError, "int32"),
        ("decode-method", "decode", (_x(), H, "greedy"), {}, ValueError, "'greedy'"),
        ("decode-hierarchy", "decode", (_x(), "cityscapes"), {}, TypeError, "Hierarchy"),
        ("expand-bool", "expand_targets", (_labels(dtype=bool), H), {}, LabelError, "bool"),
        ("expand-float", "expand_targets", (_labels(dtype=np.float64), H), {}, LabelError, "float64"),
        ("expand-no-batch", "expand_targets", (np.full((), 3, dtype=np.int64), H), {}, LabelError,
         "batch"),
        ("expand-ignore", "expand_targets", (_labels(), H), {"ignore_index": 3}, LabelError, "collides"),
        ("expand-ignore-float", "expand_targets", (_labels(), H), {"ignore_index": 255.0}, TypeError,
         "ignore_index"),
        ("expand-values", "expand_targets", (bad_values, H), {}, LabelError, "-3, 26, 300"),
        ("triplet-bool", "hierarchy_triplet_loss", (np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2), dtype=bool), H),
         {}, LabelError, "bool"),
        ("triplet-float", "hierarchy_triplet_loss", (np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2)), H), {},
         LabelError, "float64"),
        ("triplet-embeddings-int", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2), dtype=np.int64), np.zeros((1, 2, 2), dtype=np.int64), H), {}, TypeError, "int64"),
        # Shapes: embeddings [B, C, h, w] (after their dtype), then labels [B, H, W] with the same B
        # (after their dtype): one rule and message, hieraloss/core/checks.py.
        ("triplet-embeddings-3d", "hierarchy_triplet_loss", (np.zeros((1, 4, 2)), np.zeros((1, 2), dtype=np.int64), H),
         {}, ValueError, "embeddings must be [B, C, h, w], got shape (1, 4, 2)"),
        ("triplet-embeddings-5d", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2, 1)), np.zeros((1, 2, 2, 1), dtype=np.int64), H), {}, ValueError,
         "embeddings must be [B, C, h, w], got shape (1, 4, 2, 2, 1)"),
        ("triplet-embeddings-shape-before-labels", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2)), np.zeros((1, 2, 2)), H), {}, ValueError, "embeddings must be [B, C, h, w]"),
        ("triplet-labels-rank", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2)), np.zeros((1, 2), dtype=np.int64), H), {}, ValueError,
         "labels must be [B, H, W] with B=1, got shape (1, 2)"),
        ("triplet-labels-batch", "hierarchy_triplet_loss",
         (np.zeros((2, 4, 2, 2)), np.zeros((1, 4, 4), dtype=np.int64), H), {}, ValueError,
         "labels must be [B, H, W] with B=2, got shape (1, 4, 4)"),
        ("triplet-labels-dtype-before-shape", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2)), np.zeros((1, 2)), H), {}, LabelError, "float64"),
        ("triplet-sampling", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64), H), {"sampling": "best"}, ValueError,
         "sampling must be one of ('random', 'first'), got 'best'"),
        ("triplet-max-per-class", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64), H), {"max_per_class": 0}, ValueError,
         "max_per_class must be a positive int, got 0"),
        ("triplet-ignore-float", "hierarchy_triplet_loss",
         (np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64), H), {"ignore_index": 255.0}, TypeError,
         "ignore_index"),
    ]
    return cases


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_same_error_in_every_backend(case):
    """Every backend that has the function raises the same exception type and the same message."""
    _, fn, args, kw, kind, needle = case
    seen = {}
    for direct in DIRECTS:
        if not direct.has(fn):  # hssn_loss / depth_cross_entropy: torch and paddle only
            continue
        with pytest.raises(Exception) as info:  # noqa: B017 - the type is compared across backends below
            direct.call(fn, *args, **kw)
        seen[direct.name] = (type(info.value), str(info.value))
    assert len(seen) >= 1
    for name, (exc_type, message) in seen.items():
        assert issubclass(exc_type, kind), (name, exc_type, message)
        assert needle in message, (name, message)
    assert len(set(seen.values())) == 1, seen


def test_gamma_non_numbers_are_value_and_type_errors():
    """A gamma that is not a number: a ValueError like every bad gamma, and still a TypeError."""
    assert issubclass(NumberExpectedError, ValueError) and issubclass(NumberExpectedError, TypeError)
    for direct in DIRECTS:
        for gamma in ("two", None, True):
            with pytest.raises(NumberExpectedError):
                direct.call("focal_tree_min_loss", _x(), _labels(), H, gamma=gamma)
        with pytest.raises(ValueError) as info:
            direct.call("focal_tree_min_loss", _x(), _labels(), H, gamma=math.inf)
        assert type(info.value) is ValueError  # a number out of range: a plain ValueError


# ---------------------------------------------------------------------------- empty inputs
EMPTY_SHAPES = [(0, 3, 4), (2, 0, 4), (2, 4, 0), (0,), (2, 0)]  # label shapes [B, *spatial]


def _empty(label_shape, dtype="float64"):
    x = as_dtype(np.zeros((label_shape[0], N, *label_shape[1:])), dtype)
    return x, np.zeros(label_shape, dtype=np.int64)


@pytest.mark.parametrize("label_shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("adapter", BACKENDS)
def test_empty_inputs(adapter, label_shape):
    """B = 0 or a zero-size spatial axis: losses are an exact 0 (scalar reductions) or an empty map
    ("none"), in the loss dtype, connected to the logits (a gradient of their shape, all zero);
    decode gives empty maps of the right shapes; expand_targets empty targets and masks."""
    direct = Direct(adapter)
    for dtype in adapter.dtypes:
        x, labels = _empty(label_shape, dtype)
        want_dtype = np.float64 if dtype == "float64" else np.float32
        for fn in ALL_LOSSES:
            if not direct.has(fn):
                continue
            reductions = REDUCTIONS if fn in LOSSES else (None,)
            for reduction in reductions:
                kw = {} if reduction is None else {"reduction": reduction}
                args = _loss_args(fn, x=x, labels=labels)[1:]
                value = direct.numpy(direct.call(fn, x, *args, **kw))
                assert value.dtype == want_dtype, (fn, reduction, dtype, value.dtype)
                if reduction == "none":
                    assert value.shape == x.shape, (fn, value.shape)
                else:
                    assert value.shape == () and float(value) == 0.0, (fn, reduction, value)
                if direct.supports_grad:
                    value, grad = direct.value_and_grad(fn, x, *args, **kw)
                    assert grad.shape == x.shape and not np.any(grad), (fn, reduction, grad.shape)
                    assert grad.dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))
        for method in METHODS:
            leaf, depth = (direct.numpy(t) for t in direct.call("decode", x, H, method))
            assert leaf.shape == label_shape and depth.shape == (label_shape[0], L, *label_shape[1:]), method
            assert leaf.dtype == np.int64 and depth.dtype == np.int64
    targets, mask = (direct.numpy(t) for t in direct.call("expand_targets", labels, H))
    assert targets.shape == mask.shape == (label_shape[0], N, *label_shape[1:])
    assert targets.dtype == np.uint8 and mask.dtype == bool


@pytest.mark.parametrize("adapter", BACKENDS)
def test_empty_hssn_parts_are_zero(adapter):
    direct = Direct(adapter)
    if not direct.has("hssn_loss"):
        pytest.skip(f"{direct.name} has no hssn_loss")
    x, labels = _empty((0, 3, 4))
    total, parts = direct.call("hssn_loss", x, labels, H, return_parts=True, focal_gamma=2.0)
    assert float(direct.numpy(total)) == 0.0
    assert set(parts) == {"tree_min", *(f"ce_depth{d}" for d in range(1, L + 1))}
    assert all(float(direct.numpy(v)) == 0.0 for v in parts.values())


# ---------------------------------------------------------------------------- bool labels
@pytest.mark.parametrize("adapter", BACKENDS)
def test_bool_labels_are_rejected_everywhere(adapter):
    direct = Direct(adapter)
    labels = np.zeros((2, 3), dtype=bool)
    calls = [(fn, _loss_args(fn, labels=labels)) for fn in ALL_LOSSES if direct.has(fn)]
    calls += [("expand_targets", (labels, H)),
              ("hierarchy_triplet_loss", (np.zeros((2, 4, 3, 1)), labels.reshape(2, 3, 1), H))]
    for fn, args in calls:
        with pytest.raises(LabelError, match=r"labels must be integers \(uint8, int32, int64, \.\.\.\), got bool"):
            direct.call(fn, *args)
    metrics = HierarchicalSegMetrics(H)
    with pytest.raises(LabelError, match="bool"):
        metrics.update(direct.tensor(np.zeros((2, 3), dtype=np.int64)), direct.tensor(labels))


# ---------------------------------------------------------------------------- decode's backend
@pytest.mark.parametrize("framework", ["torch", "paddle"])
@pytest.mark.parametrize("method", ["path", "hssn", "top_down", "independent", "logic"])
def test_decode_refuses_an_unknown_backend_for_every_method(framework, method):
    """``backend`` is checked whatever the method, not only where the fused decoder could run."""
    import importlib

    lib = importlib.import_module(f"hieraloss.{framework}")
    x = np.zeros((1, H.num_nodes, 2, 2), dtype=np.float32)
    x = importlib.import_module(framework).to_tensor(x) if framework == "paddle" else __import__("torch").from_numpy(x)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        lib.decode(x, H, method=method, backend="cuda")


# ---------------------------------------------------------------------------- non-finite logits
def _nonfinite_leaf_cases():
    K = H.num_leaves
    road, building, wall = 0, 2, 3  # road: flat; building and wall: construction (Cityscapes train ids)

    def logits(**at):
        x = np.zeros((1, K, 1))
        for leaf, v in at.items():
            x[0, int(leaf.removeprefix("l")), 0] = v
        return x

    y = np.array([[building]])
    return [
        # +inf on a leaf of another category: p(label) = 0, the loss is +inf (as F.cross_entropy)
        ("hxe-inf-other-category", "hierarchical_cross_entropy", logits(**{f"l{road}": math.inf}), y, {}, math.inf),
        ("hxe-alpha0-minus-inf-label", "hierarchical_cross_entropy", logits(**{f"l{building}": -math.inf}), y,
         {"alpha": 0.0}, math.inf),
        ("hxe-minus-inf-label", "hierarchical_cross_entropy", logits(**{f"l{building}": -math.inf}), y, {},
         math.inf),
        # +inf on a sibling: log p(category | root) is inf - inf in any log-sum-exp form
        ("hxe-inf-sibling", "hierarchical_cross_entropy", logits(**{f"l{wall}": math.inf}), y, {}, math.nan),
        ("soft-inf-other", "soft_label_cross_entropy", logits(**{f"l{road}": math.inf}), y, {}, math.nan),
    ]


NONFINITE = _nonfinite_leaf_cases()


@pytest.mark.parametrize("case", NONFINITE, ids=[c[0] for c in NONFINITE])
def test_non_finite_leaf_logits_one_answer(case):
    """The same non-finite input gives the same value in every backend (inf where the math says so)."""
    _, fn, x, y, kw, want = case
    for direct in DIRECTS:
        got = float(direct.numpy(direct.call(fn, x, y, H, **kw)))
        assert (math.isnan(got) and math.isnan(want)) or got == want, (direct.name, fn, got, want)


@pytest.mark.parametrize("method", ["argmax", "top_down"])
def test_nan_leaf_logit_decodes_the_same_everywhere(method):
    """A NaN leaf logit: numpy's and torch's argmax rule (the first NaN wins) in every backend."""
    K = H.num_leaves
    x = np.zeros((2, K, 2))
    x[0, 3, 0] = math.nan
    x[0, 5, 0] = 2.0
    x[1, 7, 1] = math.nan
    x[1, 1, 1] = math.nan
    seen = {}
    for direct in DIRECTS:
        leaf, depth = (direct.numpy(t) for t in direct.call("decode_leaf_logits", x, H, method))
        seen[direct.name] = (leaf.tolist(), depth.tolist())
    assert len({repr(v) for v in seen.values()}) == 1, seen
    if method == "argmax":
        assert seen[DIRECTS[0].name][0][0][0] == 3 and seen[DIRECTS[0].name][0][1][1] == 1


MODULES_WITH_CHECK_FINITE = {  # name: (constructor keywords, call on (node logits, leaf logits, labels))
    "TreeMinLoss": ({}, lambda m, x, leaf, y: m(x, y)),
    "HSSNLoss": ({}, lambda m, x, leaf, y: m(x, y)),
    "HierarchicalCrossEntropyLoss": ({"alpha": 0.2}, lambda m, x, leaf, y: m(leaf, y)),
    "SoftLabelCrossEntropyLoss": ({"beta": 2.0}, lambda m, x, leaf, y: m(leaf, y)),
    "LogicSegLoss": ({}, lambda m, x, leaf, y: m(x, y)),
}


@pytest.mark.parametrize("framework", ["torch", "paddle"])
@pytest.mark.parametrize("name", list(MODULES_WITH_CHECK_FINITE))
def test_modules_take_check_finite(name, framework):
    """The module and layer forms take ``check_finite`` and pass it on: the functional's message."""
    lib = pytest.importorskip(f"hieraloss.{framework}")
    module = pytest.importorskip(framework)
    to_tensor = module.tensor if framework == "torch" else module.to_tensor
    kwargs, call = MODULES_WITH_CHECK_FINITE[name]
    x = np.zeros((2, N, 3))
    x[1, 4, 2] = math.nan
    leaf = np.zeros((2, H.num_leaves, 3))
    leaf[0, 2, 0] = math.inf
    y = to_tensor(_labels())
    call(getattr(lib, name)(H, **kwargs), to_tensor(x), to_tensor(leaf), y)  # unchecked: no error, a non-finite loss
    with pytest.raises(ValueError, match=r"logits hold 1 non-finite values \(nan or inf\)"):
        call(getattr(lib, name)(H, check_finite=True, **kwargs), to_tensor(x), to_tensor(leaf), y)
