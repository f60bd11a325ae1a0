"""The table-driven Triton objective kernel (hieraloss/torch/kernels/objective_table.py) against the
generated one, the loop oracle and the switch that chooses between them.

Runs on the CPU under TRITON_INTERPRET=1 (set by conftest.py), with 16 pixels per program so that
every case spans several programs and a ragged last tile. The ahead-of-time compile of the variant
is tests/kernels/test_kernels_aot.py::test_the_table_driven_objective_compiles_once_per_depth.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import oracle  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hieraloss.torch as ht  # noqa: E402
from hieraloss import presets  # noqa: E402
from hieraloss.testing import hierarchies, label_maps, logits  # noqa: E402
from hieraloss.torch import kernels  # noqa: E402
from hieraloss.torch.kernels import _common  # noqa: E402

pytestmark = pytest.mark.triton

if not kernels.triton_available():
    pytest.skip(f"triton kernels unavailable: {kernels.import_error()!r}", allow_module_level=True)

from hieraloss.torch.kernels import objective as objective_module  # noqa: E402
from hieraloss.torch.kernels._common import OBJECTIVE_ENV, table_driven  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    monkeypatch.setenv(_common.BLOCK_P_ENV, "16")
    monkeypatch.setenv(_common.LABEL_CHUNK_ENV, "8")


@st.composite
def steps(draw):
    """A random tree, labels (ignored pixels, partial labels), logits (ties, maybe a NaN) and one of
    the objective's launches: its function, keyword arguments and, for a map, an upstream map."""
    h = draw(hierarchies(max_depth=4, max_children=4, order=None))
    shape = (draw(st.integers(1, 2)), *draw(st.sampled_from([(1,), (7,), (3, 5), (37,)])))
    labels = draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None))
    x = draw(logits(h, shape, ties=draw(st.booleans())))
    if draw(st.integers(0, 4)) == 0:
        x = x.copy()
        x.reshape(-1)[draw(st.integers(0, x.size - 1))] = np.nan
    kind = draw(st.sampled_from(["hssn", "tree_min", "focal", "map", "ce"]))
    kw = {}
    if kind in ("tree_min", "focal", "map") and draw(st.booleans()):
        kw["node_weight"] = np.random.default_rng(draw(st.integers(0, 99))).uniform(0.1, 2.0, h.num_nodes)
    if kind == "focal":
        kw["gamma"] = draw(st.sampled_from([2.0, 0.5, 3.0]))
    if kind in ("tree_min", "focal"):
        kw["reduction"] = draw(st.sampled_from(["mean", "sum", "hssn"]))
    if kind == "map":
        kw["reduction"] = "none"
    if kind == "ce":
        kw["depth"] = draw(st.integers(1, h.max_depth))
    if kind == "hssn" and draw(st.booleans()):
        kw["tree_min_weight"] = draw(st.sampled_from([0.0, 1.0]))
    return h, x, labels, kind, kw


_FUNCTIONS = {"hssn": "hssn_loss", "tree_min": "tree_min_loss", "focal": "focal_tree_min_loss",
              "map": "tree_min_loss", "ce": "depth_cross_entropy"}


@contextlib.contextmanager
def _objective(objective: str):
    previous = os.environ.get(OBJECTIVE_ENV)
    os.environ[OBJECTIVE_ENV] = objective
    try:
        yield
    finally:
        if previous is None:
            del os.environ[OBJECTIVE_ENV]
        else:
            os.environ[OBJECTIVE_ENV] = previous


def _step(objective, h, x, labels, kind, kw, dtype="float64"):
    """(value, gradient) of one launch through the public function with ``objective``'s kernel."""
    with _objective(objective):
        return _run(h, x, labels, kind, kw, dtype)


def _run(h, x, labels, kind, kw, dtype):
    xt = torch.tensor(x, device=DEVICE).to(DTYPES[dtype]).requires_grad_(True)
    kw = dict(kw)
    if "node_weight" in kw:
        kw["node_weight"] = torch.tensor(kw["node_weight"], device=DEVICE)
    depth = kw.pop("depth", None)
    args = (xt, torch.tensor(labels, device=DEVICE), h) + ((depth,) if depth is not None else ())
    value = getattr(ht, _FUNCTIONS[kind])(*args, backend="triton", **kw)
    # a map's backward takes an upstream map (MODE 3); a scalar's is the training step (MODE 1)
    upstream = (torch.tensor(np.random.default_rng(1).normal(size=value.shape), device=DEVICE, dtype=value.dtype)
                if value.dim() else 1.0)
    (grad,) = torch.autograd.grad((value * upstream).sum(), xt)
    return value.detach().double().cpu().numpy(), grad.double().cpu().numpy()


@settings(max_examples=25)
@given(case=steps())
def test_the_table_kernel_gives_the_generated_kernels_numbers(case):
    """Every launch (value, value and gradient, the cross-entropy alone, the loss map and its backward),
    on random trees with ties, NaN, partial labels and ignored pixels: the same numbers as the
    generated kernel in float64 (sums added in another order: within 1e-12), the gradients routed to
    the same nodes, NaN in the same places."""
    h, x, labels, kind, kw = case
    want = _step("generated", h, x, labels, kind, kw)
    got = _step("table", h, x, labels, kind, kw)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)


@settings(max_examples=10)
@given(case=steps(), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_the_table_kernel_in_low_precision(case, dtype):
    """float32 and bfloat16 logits (computed in float32): within float32 rounding of the generated kernel
    (the gradient in the logits' dtype: one rounding of it)."""
    h, x, labels, kind, kw = case
    if np.isnan(x).any():
        return
    want = _step("generated", h, x, labels, kind, kw, dtype)
    got = _step("table", h, x, labels, kind, kw, dtype)
    tol = {"float32": dict(rtol=1e-5, atol=1e-6), "bfloat16": dict(rtol=1e-2, atol=1e-3)}[dtype]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], **tol)


def test_children_ties_go_to_the_earlier_child():
    """A parent below two tied children: zmax's gradient goes to the earlier child in channel order (the
    tie rule both kernels share, and the loop oracle's)."""
    h = presets.cityscapes()
    x = np.full((1, h.num_nodes, 3), -2.0)
    for p in range(h.num_leaves, h.num_nodes):  # every parent's first two children tie above it
        kids = [int(c) for c in h.children[p]]
        if len(kids) >= 2:
            x[0, kids[0]] = x[0, kids[1]] = 1.0
    labels = np.array([[255, 255, 255]])
    labels[0, 0] = h.node_ids[0]
    for objective in ("generated", "table"):
        _, grad = _step(objective, h, x, labels, "tree_min", {"reduction": "sum"})
        np.testing.assert_allclose(grad, oracle.tree_min_grad(x, labels, h, reduction="sum"), atol=1e-12)


def test_the_switch(monkeypatch):
    """HIERALOSS_TRITON_OBJECTIVE: unset or "generated" keeps the generated kernel (the default), "table"
    the table-driven one; anything else names the choices."""
    monkeypatch.delenv(OBJECTIVE_ENV, raising=False)
    assert not table_driven()
    monkeypatch.setenv(OBJECTIVE_ENV, "table")
    assert table_driven()
    monkeypatch.setenv(OBJECTIVE_ENV, "tables")
    with pytest.raises(ValueError, match="HIERALOSS_TRITON_OBJECTIVE must be one of"):
        table_driven()


def test_one_kernel_for_every_tree(monkeypatch):
    """The table-driven variant launches the same kernel for every tree (no per-tree module is
    generated for the objective), and the generated one a kernel per tree."""
    launched = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launched.append(self.kernel)
            return self.kernel[grid]

    monkeypatch.setattr(objective_module, "table_objective_kernel", Spy(objective_module.table_objective_kernel))
    monkeypatch.setenv(OBJECTIVE_ENV, "table")
    for h in (presets.cityscapes(), presets.pascal_person_part()):
        x = torch.zeros(1, h.num_nodes, 4, device=DEVICE, requires_grad=True)
        ht.hssn_loss(x, torch.tensor([[0, 1, 255, 0]], device=DEVICE), h, backend="triton").backward()
    assert len(launched) == 2 and launched[0] is launched[1]


def test_the_table_kernel_takes_trees_past_the_label_codes(monkeypatch):
    """The table-driven objective reads the labels' channels, not the packed 16-bit codes, so it takes
    trees of CODE_NODE_LIMIT nodes or more, which the generated kernel, the decoder and the triplet
    kernels refuse by name. The limit is lowered to 16 here (the rule reads only the node count): a
    19-node tree of this test's own (the plan caches its codes per tree) is then past it, and the
    table kernel still gives the loop oracle's value and gradient; decoding with the fused kernel is
    still refused."""
    import hieraloss.core.plan as core_plan
    from hieraloss import Hierarchy
    from hieraloss.torch.ops.route import use_triton as _use_triton

    h = Hierarchy([16] * 8 + [17] * 7 + [18] + [18, 18, -1])
    monkeypatch.setattr(core_plan, "CODE_NODE_LIMIT", 16)
    assert core_plan.plan_for(h).label_codes(255).codes is None  # too many nodes to pack (cached per tree)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, h.num_nodes, 9))
    labels = rng.choice(np.append(h.node_ids, 255), size=(2, 9))
    x_t = torch.tensor(x, device=DEVICE)
    monkeypatch.setenv(OBJECTIVE_ENV, "generated")
    with pytest.raises(ValueError, match="the fused kernels take hierarchies below 16 nodes"):
        ht.tree_min_loss(x_t, torch.tensor(labels, device=DEVICE), h, backend="triton")
    monkeypatch.setenv(OBJECTIVE_ENV, "table")
    value, grad = _run(h, x, labels, "tree_min", {"reduction": "hssn"}, "float64")
    np.testing.assert_allclose(value, oracle.tree_min_loss(x, labels, h, reduction="hssn"), rtol=1e-12)
    np.testing.assert_allclose(grad, oracle.tree_min_grad(x, labels, h, reduction="hssn"), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="below 16 nodes"):
        _use_triton("triton", x_t, h, "decode")


def test_the_table_kernel_takes_the_objective_parameters():
    """The table kernel's def lists the generated kernel's run-time parameters
    (``_codegen.OBJECTIVE_PARAMS``, in order) and then ``TABLE_PARAMS``: a parameter added to the one
    table and the launch but not to this def fails here by name, not at a launch."""
    from hieraloss.torch.kernels import _codegen
    from hieraloss.torch.kernels.objective_table import TABLE_PARAMS, table_objective_kernel

    names = _codegen.objective_param_names() + [name for name, _ in TABLE_PARAMS]
    assert list(table_objective_kernel.arg_names[:len(names)]) == names
    assert table_objective_kernel.arg_names[len(names)] == "BLOCK_P"  # then the constexprs
