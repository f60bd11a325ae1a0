"""Backend adapters for the conformance suite (tests/conformance/test_conformance_backends.py).

An adapter exposes one backend through numpy in / numpy out::

    name: str
    supports_grad: bool
    dtypes: tuple of dtype names ("float64", "float32", "float16", "bfloat16")
    tree_min_loss(logits, labels, hierarchy, **kw) -> np.ndarray   # kw: ignore_index, reduction, node_weight
    focal_tree_min_loss(logits, labels, hierarchy, **kw) -> np.ndarray   # kw also: gamma
    value_and_grad(fn_name, logits, labels, hierarchy, upstream=None, **kw) -> (value, dlogits)
        # gradient of sum(value * upstream); upstream None = ones           (when supports_grad)
    decode(logits, hierarchy, method) -> (leaf, depth_labels)
    expand_targets(labels, hierarchy, ignore_index) -> (targets, mask)
    hierarchy_triplet_loss(embeddings, labels, hierarchy, **kw) -> float
    triplet_value_and_grad(embeddings, labels, hierarchy, **kw) -> (float, dembeddings)  (when supports_grad)
    triplet_weight(step, total_steps) -> float

Dtypes: the suite hands over numpy arrays. numpy has no bfloat16, so a bfloat16 input arrives as a
float32 array (values already rounded to bfloat16) wrapped by :func:`as_dtype`; adapters call
:func:`dtype_name` on a logits/embeddings array to learn which framework dtype to build
(``"bfloat16"`` for such arrays, else ``str(array.dtype)``). Adapters return numpy arrays in any
float dtype (bfloat16 results converted to float32).

The torch and paddle adapters live in ``tests/_adapter_torch.py`` / ``tests/_adapter_paddle.py``
(each defines ``ADAPTER``). A missing file or framework skips that backend; an adapter that fails to
import makes that backend's tests fail (with the import error), without hiding the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

import hieraloss.numpy as hnp

_HERE = Path(__file__).resolve().parent


class Bfloat16Array(np.ndarray):
    """A float32 array whose values are bfloat16 numbers, marking "run this in bfloat16"."""


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float values to the nearest bfloat16 (round half to even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def as_dtype(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` converted to the dtype called ``name`` (bfloat16: see the module docstring)."""
    if name == "bfloat16":
        return round_to_bfloat16(x).view(Bfloat16Array)
    return np.asarray(x).astype(name)


def dtype_name(x: np.ndarray) -> str:
    """The dtype name an adapter should use for the array ``x``."""
    return "bfloat16" if isinstance(x, Bfloat16Array) else str(np.asarray(x).dtype)


def as_float64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class NumpyAdapter:
    """hieraloss.numpy: the reference backend (forward only)."""

    name = "numpy"
    supports_grad = False
    dtypes = ("float64", "float32", "float16")

    @staticmethod
    def _plain(x):
        return None if x is None else np.asarray(x)

    def tree_min_loss(self, logits, labels, hierarchy, **kw):
        return np.asarray(hnp.tree_min_loss(self._plain(logits), labels, hierarchy, **kw))

    def focal_tree_min_loss(self, logits, labels, hierarchy, **kw):
        return np.asarray(hnp.focal_tree_min_loss(self._plain(logits), labels, hierarchy, **kw))

    def value_and_grad(self, fn_name, logits, labels, hierarchy, upstream=None, **kw):
        raise NotImplementedError("hieraloss.numpy is forward only")

    def decode(self, logits, hierarchy, method):
        leaf, depth = hnp.decode(self._plain(logits), hierarchy, method=method)
        return np.asarray(leaf), np.asarray(depth)

    def expand_targets(self, labels, hierarchy, ignore_index=255):
        return hnp.expand_targets(labels, hierarchy, ignore_index=ignore_index)

    def hierarchy_triplet_loss(self, embeddings, labels, hierarchy, **kw):
        return float(hnp.hierarchy_triplet_loss(self._plain(embeddings), labels, hierarchy, **kw))

    def triplet_value_and_grad(self, embeddings, labels, hierarchy, **kw):
        raise NotImplementedError("hieraloss.numpy is forward only")

    def triplet_weight(self, step, total_steps):
        return float(hnp.triplet_weight(step, total_steps))


class _BrokenAdapter:
    """Stands in for an adapter that failed to import: every use re-raises the import error."""

    supports_grad = True
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self._error = error

    def __getattr__(self, attr):
        raise RuntimeError(
            f"tests/_adapter_{self.name}.py failed to import: {self._error!r}"
        ) from self._error


def _framework_adapter(name: str, framework: str):
    if not (_HERE / f"_adapter_{name}.py").exists():
        return pytest.param(
            None, id=name, marks=pytest.mark.skip(reason=f"tests/_adapter_{name}.py not written")
        )
    if importlib.util.find_spec(framework) is None:
        return pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"{framework} is not installed"))
    if str(_HERE) not in sys.path:
        sys.path.insert(0, str(_HERE))
    try:
        adapter = importlib.import_module(f"_adapter_{name}").ADAPTER
    except Exception as exc:  # noqa: BLE001 - surfaced by every test of this backend
        adapter = _BrokenAdapter(name, exc)
    return pytest.param(adapter, id=name)


class Direct:
    """An adapter's library called directly, for the input-conformance tests
    (tests/conformance/test_conformance_inputs.py): numpy arrays become the framework's tensors of the *same*
    dtype (int, bool or complex logits and labels included: nothing is cast, so the backends' own
    checks see the bad input), other arguments pass unchanged, and the adapter's ``loss_backend``
    (torch: ``"auto"`` = the compiled kernel where built, ``"torch"``; paddle likewise) goes to every
    function that takes ``backend``.

    ``call(fn, *args, **kw)``: the raw result (tensors, not converted back). ``value_and_grad(fn, x,
    *args, **kw)``: numpy ``(value, d sum(value) / d x)``, raising if the value is not connected to
    ``x``. ``numpy(t)``: a result as a numpy array. ``has(fn)``: whether the library has ``fn``.
    """

    def __init__(self, adapter):
        self.name = adapter.name
        self.framework = self.name.split("_")[0]  # numpy, torch or paddle
        self.lib = importlib.import_module(f"hieraloss.{self.framework}")
        self.backend = getattr(adapter, "loss_backend", None)
        self.supports_grad = adapter.supports_grad

    def has(self, fn: str) -> bool:
        return hasattr(self.lib, fn)

    def tensor(self, a, grad: bool = False):
        if not isinstance(a, np.ndarray) or self.framework == "numpy":
            return a
        bf16 = dtype_name(a) == "bfloat16"
        a = np.array(a, dtype=np.float32) if bf16 else np.array(a)
        if self.framework == "torch":
            import torch

            t = torch.from_numpy(a)
            t = t.to(torch.bfloat16) if bf16 else t
            return t.requires_grad_(grad) if grad else t
        import paddle

        t = paddle.to_tensor(a)
        t = t.astype("bfloat16") if bf16 else t
        t.stop_gradient = not grad
        return t

    def numpy(self, t) -> np.ndarray:
        if self.framework == "torch":
            import torch

            t = t.detach()
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        if self.framework == "paddle":
            import paddle

            return (t.astype("float32") if t.dtype == paddle.bfloat16 else t).numpy()
        return np.asarray(t)

    def call(self, fn: str, *args, **kw):
        f = getattr(self.lib, fn)
        if "rule_logits" in kw:  # a tensor argument given by keyword
            kw["rule_logits"] = self.tensor(kw["rule_logits"])
        if self.backend is not None and "backend" in inspect.signature(f).parameters:
            kw.setdefault("backend", self.backend)
        return f(*(self.tensor(a) for a in args), **kw)

    def value_and_grad(self, fn: str, x, *args, **kw) -> tuple[np.ndarray, np.ndarray]:
        xt = self.tensor(x, grad=True)
        f = getattr(self.lib, fn)
        if self.backend is not None and "backend" in inspect.signature(f).parameters:
            kw.setdefault("backend", self.backend)
        value = f(xt, *(self.tensor(a) for a in args), **kw)
        if self.framework == "torch":
            import torch

            (grad,) = torch.autograd.grad(value.sum(), xt)  # raises if not connected to x
        else:
            value.sum().backward()
            grad = xt.grad
            if grad is None:
                raise AssertionError(f"{self.name}: {fn}'s value is not connected to the logits")
        return self.numpy(value), self.numpy(grad)


def triton_adapters() -> list:
    """The fused Triton kernels' adapters, with the generated and with the table-driven objective kernel
    (tests/conformance/test_conformance_triton.py runs the suite on them with fewer examples: on a CPU
    the kernels run under the interpreter)."""
    param = _framework_adapter("torch_triton", "triton")
    adapter = param.values[0]
    if adapter is None or not hasattr(adapter, "objective"):  # skipped, or failed to import
        return [param, pytest.param(adapter, id="torch_triton_table", marks=param.marks)]
    table = importlib.import_module("_adapter_torch_triton").TABLE_ADAPTER
    return [param, pytest.param(table, id="torch_triton_table")]


BACKENDS = [
    pytest.param(NumpyAdapter(), id="numpy"),
    _framework_adapter("torch", "torch"),
    _framework_adapter("torch_eager", "torch"),
    _framework_adapter("paddle", "paddle"),
    _framework_adapter("paddle_eager", "paddle"),
]

# Relative/absolute tolerances per input dtype for loss values (float32 accumulation for halves).
TOLERANCES = {
    "float64": dict(rtol=1e-9, atol=1e-12),
    "float32": dict(rtol=2e-5, atol=1e-6),
    "float16": dict(rtol=2e-3, atol=1e-4),
    "bfloat16": dict(rtol=2e-3, atol=1e-4),
}
