"""Ahead-of-time compilation of the kernels for an NVIDIA target, without a GPU.

Triton lowers a kernel to PTX and ``ptxas`` (shipped in the triton wheel) assembles it for
``sm_<arch>``; a specialisation that fails to compile on a GPU fails here the same way. Used by
``tests/kernels/test_kernels_aot.py`` (every specialisation the library can launch) and by
``benchmarks/bench_kernels.py --compile-check`` (registers and spills). The interpreter must be off
(``TRITON_INTERPRET`` unset) when triton is imported.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...hierarchy import Hierarchy
from ._codegen import OBJECTIVE_PARAMS, Mode
from ._common import FP_FUSION, NUM_STAGES, launch_sizes, register_cap

_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

# The specialisations the library launches: (mode, tree-min, cross-entropy) per public function.
OBJECTIVE_MODES = {
    "value": (Mode.VALUE, True, False),             # tree-min value without gradient (eval)
    "value+grad": (Mode.VALUE_GRAD, True, False),   # tree_min_loss training step
    "objective": (Mode.VALUE_GRAD, True, True),     # hssn_loss training step (tree-min + CE per depth)
    "ce": (Mode.VALUE_GRAD, False, True),           # depth_cross_entropy
    "objective value": (Mode.VALUE, True, True),
    "loss map": (Mode.LOSS_MAP, True, False),       # reduction="none" forward
    "map grad": (Mode.MAP_GRAD, True, False),       # reduction="none" backward
}


@dataclass
class Usage:
    registers: int
    spill_bytes: int

    def __str__(self) -> str:
        return f"registers {self.registers}, spill stack {self.spill_bytes} B"


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver on a machine without a GPU: the JIT specialises and compiles
    launches for ``sm_<arch>`` as on a GPU."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


@contextlib.contextmanager
def compile_only(arch: int = 90, *, stop_launches: bool = True):
    """Within: the fused kernels run on CPU tensors as far as a launch goes without a GPU. Triton's JIT
    specialises and compiles each launch for ``sm_<arch>`` as on a GPU, and with ``stop_launches``
    every launch stops before the driver call (``warmup=True``; without it, callers pass that
    themselves): nothing runs, outputs stay unwritten. For checks of what the JIT compiles and for
    the host time of a step."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from .. import kernels

    saved = kernels.triton_available, kernels._require_triton, JITFunction.run
    run = JITFunction.run
    previous = getattr(driver, "_active", None)  # None: made on first use (reset_active would make it now)
    driver.set_active(_CompileOnlyDriver(arch))
    kernels.triton_available, kernels._require_triton = (lambda: True), (lambda t: None)
    if stop_launches:
        JITFunction.run = lambda self, *a, grid, warmup, **kw: run(self, *a, grid=grid, warmup=True, **kw)
    try:
        yield
    finally:
        kernels.triton_available, kernels._require_triton, JITFunction.run = saved
        driver.set_active(previous)


def _source(kernel, sig: dict, const: dict, aligned: bool, int_attrs: dict | None = None,
            unaligned: tuple[str, ...] = ()) -> ASTSource:
    """``kernel``'s specialisation as Triton's JIT makes it for a launch: with ``aligned``, every
    pointer argument 16-byte aligned but those named in ``unaligned`` (``tt.divisibility``, as the JIT
    marks tensors from torch's allocator; a view at an odd offset is not). Without it the code differs
    (more registers unaligned, not the JIT's figure). ``int_attrs``: the attributes of the int
    arguments the JIT specialises (divisible by 16 or not)."""
    attrs = {}
    for name in kernel.arg_names:
        if aligned and sig.get(name, "").startswith("*") and name not in unaligned:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
        elif name in (int_attrs or {}):
            attrs[(kernel.arg_names.index(name),)] = int_attrs[name]
    return ASTSource(kernel, sig, const, attrs)


def _compile(source: ASTSource, options: dict, arch: int):
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_objective(h: Hierarchy, arch: int, **spec):
    """Compile the generated objective kernel of ``h`` for ``sm_<arch>`` (``spec``: see
    :func:`objective_source`); returns the compiled kernel."""
    return _compile(*objective_source(h, **spec), arch)


def objective_source(h: Hierarchy, *, dtype: str = "float32", mode: str = "objective", focal: bool | float = False,
                     weighted: bool = False, block_p: int | None = None, label_dtype: str = "int64",
                     contiguous_out: bool = True, aligned: bool = True, wide: bool = False
                     ) -> tuple[ASTSource, dict]:
    """``(source, options)`` of one specialisation of the generated objective kernel of ``h``.
    ``focal``: False, True (the default gamma, 2) or a gamma; ``contiguous_out``: the output's pixel
    stride is 1 (Triton specialises it), else any (channels_last logits); ``aligned``: see
    :func:`_source`; ``wide``: the batch strides and the label shift beyond int32 (the JIT passes
    an int as i64 only then: logits of more than 2**31 elements, or labels given as channels)."""
    from . import _reduce
    from ._terms import focal_code
    from .objective import kernel_for

    kernel = kernel_for(h)
    mode_id, tm, ce = OBJECTIVE_MODES[mode]
    bp, warps = launch_sizes(h.num_nodes, 1 << 20)
    acc = "fp64" if dtype == "float64" else "fp32"
    x = _TRITON[dtype]
    counts = mode_id in (Mode.VALUE, Mode.VALUE_GRAD)  # the label count's buffers; else any buffer of acc
    fields = dict(x=x, acc=acc, label=_label_type(label_dtype), big="i64" if wide else "i32",
                  go=acc if mode_id == Mode.MAP_GRAD else x,
                  out=x if mode_id in (Mode.VALUE_GRAD, Mode.MAP_GRAD) else acc,
                  count_i32="i32" if counts else acc, count_f64="fp64" if counts else acc)
    sig = {p.name: p.aot.format(**fields) for _, row in OBJECTIVE_PARAMS for p in row}  # the kernel's own table
    sig.update({name: "i32" for name in kernel.arg_names if name not in sig})
    gamma = 2.0 if focal is True else float(focal)
    const = dict(BLOCK_P=block_p or bp, CB=_reduce.count_chunk(),
                 F64=dtype == "float64", FOCAL=focal_code(gamma), HAS_W=weighted, TM=tm, CE=ce, MODE=int(mode_id),
                 **({"sop": 1} if contiguous_out else {}))
    sig.update({k: "constexpr" for k in const})
    # A channels_last output's pixel stride is the node count.
    int_attrs = {"sop": [["tt.divisibility", 16]]} if not contiguous_out and h.num_nodes % 16 == 0 else {}
    return (_source(kernel, sig, const, aligned, int_attrs),
            dict(num_warps=warps, num_stages=NUM_STAGES, **register_cap(h.num_nodes), **FP_FUSION))


def compile_decode(h: Hierarchy, arch: int, **spec):
    """Compile the generated decode kernel of ``h`` for ``sm_<arch>`` (``spec``: see :func:`decode_source`)."""
    return _compile(*decode_source(h, **spec), arch)


def decode_source(h: Hierarchy, *, dtype: str = "float32", top_down: bool = False, block_p: int | None = None,
                  aligned: bool = True, wide: bool = False) -> tuple[ASTSource, dict]:
    """``(source, options)`` of one specialisation of the generated decode kernel of ``h`` (``aligned``,
    ``wide``: as :func:`objective_source`'s)."""
    from .objective import decode_kernel_for

    kernel = decode_kernel_for(h)
    bp, warps = launch_sizes(h.num_nodes, 1 << 20)
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*" + _TRITON[dtype], sxb="i64" if wide else "i32", anc_ptr="*i32", ids_ptr="*i64",
               leaf_out_ptr="*i64", depth_out_ptr="*i64")
    const = dict(BLOCK_P=block_p or bp, F64=dtype == "float64", TOP_DOWN=top_down)
    sig.update({k: "constexpr" for k in const})
    return _source(kernel, sig, const, aligned), dict(num_warps=warps, num_stages=NUM_STAGES, **FP_FUSION)


def compile_label_count(arch: int, **spec):
    """Compile the label count as a launch of its own for ``sm_<arch>`` (``spec``: see
    :func:`label_count_source`)."""
    return _compile(*label_count_source(**spec), arch)


def label_count_source(*, label_dtype: str = "int64", num_nodes: int = 26, depth: int = 2, dtype: str = "float32",
                       aligned: bool = True, wide: bool = False) -> tuple[ASTSource, dict]:
    """``(source, options)`` of the label count as a launch of its own (``HIERALOSS_LABEL_COUNT=separate``,
    the default), for a tree of ``num_nodes`` nodes and ``depth`` levels and logits of ``dtype``
    (``aligned``, ``wide``: as :func:`objective_source`'s)."""
    from .objective import _label_count_kernel, label_count_constants

    kernel = _label_count_kernel
    big = "i64" if wide else "i32"
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(lab_ptr="*" + _label_type(label_dtype), slb=big, shift=big, table_ptr="*fp64", sync_ptr="*i32",
               rows_ptr="*fp64", coef_ptr="*fp64", denom_ptr="*fp64",
               scale_ptr="*" + ("fp64" if dtype == "float64" else "fp32"))
    const = dict(label_count_constants(num_nodes, depth), F64=dtype == "float64")
    sig.update({k: "constexpr" for k in const})
    return _source(kernel, sig, const, aligned), dict(num_warps=4, **FP_FUSION)


def compile_gradient_scale(arch: int, **spec):
    """Compile the backward's in-place gradient scaling kernel for ``sm_<arch>`` (``spec``: see
    :func:`gradient_scale_source`)."""
    return _compile(*gradient_scale_source(**spec), arch)


def gradient_scale_source(*, dtype: str = "float32", numel: int = 1 << 20, aligned: bool = True
                          ) -> tuple[ASTSource, dict]:
    """``(source, options)`` of the gradient scaling for a gradient of ``numel`` entries: the JIT
    specialises the count (1 a constant, a multiple of 16 marked so, beyond int32 an int64)."""
    from ._grad_buffer import _SCALE_BLOCK, _scale_kernel

    acc = "fp64" if dtype == "float64" else "fp32"
    sig = {name: "i32" for name in _scale_kernel.arg_names}
    sig.update(g_ptr="*" + _TRITON[dtype], scale_ptr="*" + acc, n="i32" if numel < 2**31 else "i64")
    const = dict(BLOCK=_SCALE_BLOCK, F64=dtype == "float64", **({"n": 1} if numel == 1 else {}))
    sig.update({k: "constexpr" for k in const})
    int_attrs = {"n": [["tt.divisibility", 16]]} if numel % 16 == 0 else {}
    return _source(_scale_kernel, sig, const, aligned, int_attrs), dict(num_warps=4, **FP_FUSION)


def _cubin_tool(compiled, tool: str, *args: str) -> str:
    """Output of one of the triton wheel's CUDA binary tools run on the kernel's cubin."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(path), *args, f.name], capture_output=True, text=True).stdout


def usage(compiled) -> Usage | None:
    """Registers and spill stack per thread of a compiled kernel (cuobjdump from the triton wheel)."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", _cubin_tool(compiled, "cuobjdump", "-res-usage"))
    return Usage(int(m.group(1)), int(m.group(2))) if m else None


def instruction_counts(compiled) -> dict[str, int]:
    """SASS instructions of a compiled kernel by opcode (``nvdisasm`` from the triton wheel), plus
    ``"total"``. The generated objective kernel is straight-line and compute-bound, so its static
    count tracks its time (the H100 check: docs/performance.md)."""
    counts: dict[str, int] = {}
    for line in _cubin_tool(compiled, "nvdisasm", "-c").splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def _label_type(dtype: str) -> str:
    return {"int64": "i64", "int32": "i32", "uint8": "u8", "int16": "i16"}[dtype]


def compile_triplet(arch: int, **spec):
    """Compile one of the triplet loss kernels for ``sm_<arch>`` (``spec``: see :func:`triplet_source`)."""
    return _compile(*triplet_source(**spec), arch)


def triplet_source(*, kernel: str, dtype: str = "float32", channels: int = 256, grad: bool = True,
                   ordered: bool = False, label_dtype: str = "int64", num_leaves: int = 19, aligned: bool = True,
                   wide: bool = False) -> tuple[ASTSource, dict]:
    """``(source, options)`` of one of the triplet loss kernels (``kernel``: ``"codes"``, ``"select"`` or
    ``"score"``) as :mod:`.triplet` launches it: ``aligned``, the labels' (codes) or the embeddings'
    (score) data 16-byte aligned; ``wide``, their strides beyond int32."""
    from . import triplet

    big = "i64" if wide else "i32"
    if kernel == "codes":
        k = triplet._codes_kernel
        sig = {name: "i32" for name in k.arg_names}
        sig.update(lab_ptr="*" + _label_type(label_dtype), slb=big, sly=big, slx=big, scale_y="fp32",
                   scale_x="fp32", group_ptr="*i32", out_ptr="*i32")
        const, warps, user_ptr = dict(BLOCK=triplet._CODE_BLOCK), 4, "lab_ptr"
    elif kernel == "select":
        k = triplet._select_kernel
        sig = {name: "i32" for name in k.arg_names}
        sig.update(code_ptr="*i32", order_ptr="*i64" if ordered else "*i32", group_ptr="*i32", possible_ptr="*i32",
                   anchor_ptr="*i32", positive_ptr="*i32", negative_ptr="*i32", count_ptr="*i32")
        const, warps, user_ptr = dict(BLOCK=triplet._SELECT_BLOCK, ORDERED=ordered), triplet._SELECT_WARPS, None
    else:
        k = triplet._score_kernel
        acc = "fp64" if dtype == "float64" else "fp32"
        sig = {name: "i32" for name in k.arg_names}
        sig.update(emb_ptr="*" + _TRITON[dtype], seb=big, sec=big, sey=big, sex=big, code_ptr="*i32",
                   anchor_ptr="*i32", positive_ptr="*i32", negative_ptr="*i32", count_ptr="*i32", psi_ptr="*i32",
                   const_ptr="*" + acc, scale_hi="fp32", scale_lo="fp32", grad_ptr="*" + acc, part_ptr="*" + acc)
        bt, bc, warps = triplet._score_sizes(channels, dtype == "float64")
        const, user_ptr = dict(BT=bt, BC=bc, KP=triplet._class_chunk(num_leaves), F64=dtype == "float64",
                               GRAD=grad), "emb_ptr"
    sig.update({name: "constexpr" for name in const})
    return _source(k, sig, const, True, unaligned=() if aligned or user_ptr is None else (user_ptr,)), \
        dict(num_warps=warps, **FP_FUSION)
