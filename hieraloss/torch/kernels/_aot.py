"""Ahead-of-time compilation of the kernels for an NVIDIA target, without a GPU.

Triton lowers a kernel to PTX and ``ptxas`` (shipped in the triton wheel) assembles it for
``sm_<arch>``; a specialisation that fails to compile on a GPU fails here the same way. Used by
``tests/test_kernels_aot.py`` (every specialisation the library can launch) and by
``benchmarks/bench_kernels.py --compile-check`` (registers and spills). The interpreter must be off
(``TRITON_INTERPRET`` unset) when triton is imported.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...hierarchy import Hierarchy
from ._common import NUM_STAGES, launch_sizes, register_cap

_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}

# The specialisations the library launches: (mode, tree-min, cross-entropy) per public function.
OBJECTIVE_MODES = {
    "value": (0, True, False),          # tree-min value without gradient (eval)
    "value+grad": (1, True, False),     # tree_min_loss training step
    "objective": (1, True, True),       # hssn_loss training step (tree-min + CE per depth)
    "ce": (1, False, True),             # depth_cross_entropy
    "objective value": (0, True, True),
    "loss map": (2, True, False),       # reduction="none" forward
    "map grad": (3, True, False),       # reduction="none" backward
}


@dataclass
class Usage:
    registers: int
    spill_bytes: int

    def __str__(self) -> str:
        return f"registers {self.registers}, spill stack {self.spill_bytes} B"


def compile_objective(h: Hierarchy, arch: int, *, dtype: str = "float32", mode: str = "objective",
                      focal: bool | float = False, weighted: bool = False, block_p: int | None = None,
                      label_dtype: str = "int64"):
    """Compile the generated objective kernel of ``h`` for ``sm_<arch>``; returns the compiled kernel.
    ``focal``: False, True (the default gamma, 2) or a gamma."""
    from . import _reduce
    from ._terms import focal_code
    from .objective import kernel_for

    kernel = kernel_for(h)
    mode_id, tm, ce = OBJECTIVE_MODES[mode]
    bp, warps = launch_sizes(h.num_nodes, 1 << 20)
    acc = "fp64" if dtype == "float64" else "fp32"
    x = _TRITON[dtype]
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*" + x, sxb="i64", lab_ptr="*" + _label_type(label_dtype), slb="i64", code_ptr="*i32",
               shift="i64", table_ptr="*fp64", w_ptr="*" + acc, go_ptr="*" + acc, sgb="i64", sync_ptr="*i32",
               rows_ptr="*fp64", scale_ptr="*" + acc,
               out_ptr="*" + (x if mode_id in (1, 3) else acc), part_ptr="*" + acc, counter_ptr="*i32",
               gsum_ptr="*fp64", denom_ptr="*fp64", coef_ptr="*fp64", factor="fp32", total_ptr="*" + acc,
               parts_ptr="*" + acc, gamma="fp32")
    gamma = 2.0 if focal is True else float(focal)
    const = dict(BLOCK_P=block_p or bp, CB=_reduce.count_chunk(),
                 F64=dtype == "float64", FOCAL=focal_code(gamma), HAS_W=weighted, TM=tm, CE=ce, MODE=mode_id)
    sig.update({k: "constexpr" for k in const})
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=NUM_STAGES, **register_cap(h.num_nodes)))


def compile_decode(h: Hierarchy, arch: int, *, dtype: str = "float32", top_down: bool = False,
                   block_p: int | None = None):
    """Compile the generated decode kernel of ``h`` for ``sm_<arch>``."""
    from .objective import decode_kernel_for

    kernel = decode_kernel_for(h)
    bp, warps = launch_sizes(h.num_nodes, 1 << 20)
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(x_ptr="*" + _TRITON[dtype], sxb="i64", anc_ptr="*i32", ids_ptr="*i64", leaf_out_ptr="*i64",
               depth_out_ptr="*i64")
    const = dict(BLOCK_P=block_p or bp, F64=dtype == "float64", TOP_DOWN=top_down)
    sig.update({k: "constexpr" for k in const})
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=NUM_STAGES))


def compile_label_count(arch: int, *, label_dtype: str = "int64", depth: int = 2, dtype: str = "float32"):
    """Compile the label count as a launch of its own (``objective.SEPARATE_COUNT``, the benchmarks'
    A/B) for ``sm_<arch>``, for a tree of ``depth`` levels and logits of ``dtype``."""
    from .objective import _label_count_kernel, label_count_constants

    kernel = _label_count_kernel
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update(lab_ptr="*" + _label_type(label_dtype), slb="i64", shift="i64", table_ptr="*fp64", sync_ptr="*i32",
               rows_ptr="*fp64", coef_ptr="*fp64", denom_ptr="*fp64",
               scale_ptr="*" + ("fp64" if dtype == "float64" else "fp32"))
    const = dict(label_count_constants(depth), F64=dtype == "float64")
    sig.update({k: "constexpr" for k in const})
    return triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4))


def compile_gradient_scale(arch: int, *, dtype: str = "float32"):
    """Compile the backward's in-place gradient scaling kernel for ``sm_<arch>``."""
    from ._grad_buffer import _SCALE_BLOCK, _scale_kernel

    acc = "fp64" if dtype == "float64" else "fp32"
    sig = {name: "i32" for name in _scale_kernel.arg_names}
    sig.update(g_ptr="*" + _TRITON[dtype], scale_ptr="*" + acc, n="i64")
    const = dict(BLOCK=_SCALE_BLOCK, F64=dtype == "float64")
    sig.update({k: "constexpr" for k in const})
    return triton.compile(ASTSource(_scale_kernel, sig, const), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4))


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
    count tracks its time: on the H100 (triton 3.6) the Mapillary focal / plain value+grad kernels
    took 1.24x the time for 1.27x the instructions."""
    counts: dict[str, int] = {}
    for line in _cubin_tool(compiled, "nvdisasm", "-c").splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def _label_type(dtype: str) -> str:
    return {"int64": "i64", "int32": "i32", "uint8": "u8", "int16": "i16"}[dtype]


def compile_triplet(arch: int, *, kernel: str, dtype: str = "float32", channels: int = 256, grad: bool = True,
                    ordered: bool = False, label_dtype: str = "int64", num_leaves: int = 19):
    """Compile one of the triplet loss kernels (``kernel``: ``"codes"``, ``"select"`` or ``"score"``)
    for ``sm_<arch>``, as :mod:`.triplet` launches it."""
    from . import triplet

    if kernel == "codes":
        k = triplet._codes_kernel
        sig = {name: "i32" for name in k.arg_names}
        sig.update(lab_ptr="*" + _label_type(label_dtype), slb="i64", sly="i64", slx="i64", scale_y="fp32",
                   scale_x="fp32", ignore="i64", group_ptr="*i32", out_ptr="*i32")
        const, warps = dict(BLOCK=triplet._CODE_BLOCK), 4
    elif kernel == "select":
        k = triplet._select_kernel
        sig = {name: "i32" for name in k.arg_names}
        sig.update(code_ptr="*i32", order_ptr="*i64" if ordered else "*i32", group_ptr="*i32", possible_ptr="*i32",
                   anchor_ptr="*i32",
                   positive_ptr="*i32", negative_ptr="*i32", count_ptr="*i32")
        const, warps = dict(BLOCK=triplet._SELECT_BLOCK, ORDERED=ordered), triplet._SELECT_WARPS
    else:
        k = triplet._score_kernel
        acc = "fp64" if dtype == "float64" else "fp32"
        sig = {name: "i32" for name in k.arg_names}
        sig.update(emb_ptr="*" + _TRITON[dtype], seb="i64", sec="i64", sey="i64", sex="i64", code_ptr="*i32",
                   anchor_ptr="*i32", positive_ptr="*i32", negative_ptr="*i32", count_ptr="*i32", psi_ptr="*i32",
                   const_ptr="*" + acc, scale_hi="fp32", scale_lo="fp32", grad_ptr="*" + acc, sgb="i64", sgc="i64",
                   sgy="i64", sgx="i64", part_ptr="*" + acc)
        bt, bc, warps = triplet._score_sizes(channels, dtype == "float64")
        const = dict(BT=bt, BC=bc, KP=triplet._class_chunk(num_leaves), F64=dtype == "float64",
                     GRAD=grad)
    sig.update({name: "constexpr" for name in const})
    return triton.compile(ASTSource(k, sig, const), target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
