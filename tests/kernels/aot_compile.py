"""Compile kernel specialisations ahead of time for an NVIDIA target (no GPU needed) and print one
JSON line per specialisation. Run by tests/kernels/test_kernels_aot.py in a subprocess, because the test
session runs Triton under the interpreter (TRITON_INTERPRET=1), which cannot compile.

    python tests/kernels/aot_compile.py '<json list of specs>'

A spec: {"tree": <preset name> | {"parents": [...], "names": [...], "order": ...},
"kernel": "objective" | "decode" | "scale" (with "numel") | "count" (with "num_nodes", "depth") |
"jit-match" (see _jit_match) | "table" (with "trees": [...], see _table) |
"triplet" (with "part": "codes" | "select" | "score", "channels", "grad",
"ordered", "num_leaves"), "arch": 90, "dtype": "float32", "mode": <_aot.OBJECTIVE_MODES key>,
"focal": bool | gamma, "weighted": bool, "block_p": int | null, "top_down": bool, "label_dtype": "int64",
"contiguous_out": bool, "aligned": bool, "wide": bool,
"ptx_ops": [<PTX opcodes to count>], "searched_pointers": bool (see searched_pointers)}.
"""

import json
import os
import re
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from hieraloss import Hierarchy, presets  # noqa: E402
from hieraloss.torch.kernels import _aot  # noqa: E402


def _tree(spec):
    if isinstance(spec, str):
        return getattr(presets, spec)()
    return Hierarchy(spec["parents"], spec.get("names"), spec.get("order", "default"))


def _key(src) -> tuple:
    """What decides the code of a specialisation: the kernel's source, its signature, constants and
    the non-empty attributes (triton 3.9 also records empty ones, for constexprs)."""
    return (src.fn.cache_key, sorted(src.signature.items()), sorted(src.constants.items()),
            sorted((k, v) for k, v in src.attrs.items() if v))


def _launch_every_specialisation(h) -> None:
    """The public functions' launches for ``h`` on small CPU tensors: every mode, dtype, focal,
    weights, int32 labels, channels_last logits, one pixel per image, decoding; the gradient scaling
    for gradient sizes a multiple of 16 or not; the label count as a launch of its own; the triplet
    term's kernels for every dtype, flat and random key order, with and without the gradient."""
    import torch

    import hieraloss.torch as hlt
    from hieraloss.torch.kernels import objective

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, h.num_nodes, 16, 16, generator=gen)
    y = torch.tensor(h.node_ids)[torch.randint(0, h.num_nodes, (2, 16, 16), generator=gen)]
    kw = dict(backend="triton", check_labels=False)
    for logits in (x, x.bfloat16(), x.double(), x.contiguous(memory_format=torch.channels_last)):
        leaf = logits.clone().requires_grad_(True)
        hlt.tree_min_loss(leaf, y, h, reduction="hssn", **kw).backward()
        (2 * hlt.hssn_loss(leaf, y, h, **kw)).backward()
        hlt.decode(logits, h, "top_down", backend="triton")
    leaf = x.clone().requires_grad_(True)
    hlt.focal_tree_min_loss(leaf, y.int(), h, gamma=2.0, **kw).backward()
    hlt.focal_tree_min_loss(leaf, y, h, gamma=1.5, node_weight=torch.rand(h.num_nodes, generator=gen),
                            **kw).backward()
    hlt.depth_cross_entropy(leaf, y, h, 1, **kw).backward()
    (hlt.tree_min_loss(leaf, y, h, reduction="none", **kw) * x).sum().backward()
    odd = x[:, :, :15, :15].clone().requires_grad_(True)  # a gradient of 2 * N * 225 entries
    (3 * hlt.tree_min_loss(odd, y[:, :15, :15], h, **kw)).backward()
    points = x[:, :, 0, 0].clone().requires_grad_(True)  # one pixel per image: the pixels of one image
    hlt.hssn_loss(points, y[:, 0, 0], h, **kw).backward()
    hlt.decode(points.detach(), h, "top_down", backend="triton")
    previous = os.environ.get(objective.LABEL_COUNT_ENV)
    os.environ[objective.LABEL_COUNT_ENV] = "in-kernel" if objective.separate_label_count() else "separate"
    try:  # the other label count too
        for labels in (y, y.int()):
            hlt.hssn_loss(x.clone().requires_grad_(True), labels, h, **kw).backward()
    finally:
        if previous is None:
            os.environ.pop(objective.LABEL_COUNT_ENV)
        else:
            os.environ[objective.LABEL_COUNT_ENV] = previous
    with torch.no_grad():
        hlt.tree_min_loss(x, y, h, **kw)
        hlt.hssn_loss(x, y, h, **kw)
    hlt.decode(x, h, "path", backend="triton")
    if h.num_leaves < 2:
        return
    emb = torch.randn(2, 8, 8, 8, generator=gen)
    # 7 triplets per class: tables of K * 7 entries, which the positives' and negatives' start after
    for e, sampling, most in ((emb, "first", 200), (emb.double(), "random", 7), (emb.bfloat16(), "first", 200)):
        hlt.hssn_loss(x.clone().requires_grad_(True), y.int(), h, embeddings=e.clone().requires_grad_(True),
                      triplet_weight=0.5, sampling=sampling, generator=gen, max_per_class=most, **kw).backward()
    with torch.no_grad():
        hlt.hssn_loss(x, y, h, embeddings=emb, triplet_weight=0.5, **kw)


def _match(name: str, kernel, describe, build, checked: list, mismatches: list) -> None:
    """Each specialisation the JIT compiled of ``kernel``: ``describe(src, constants by name)`` gives
    its description, ``build(**description)`` the ``(source, options)`` ``_aot`` makes of it."""
    for caches in kernel.device_caches.values():
        for compiled in caches[0].values():
            src = compiled.src
            const = {kernel.arg_names[i[0]]: v for i, v in src.constants.items()}
            desc = describe(src, const)
            ours, options = build(**desc)
            checked.append({"kernel": name, **desc})
            meta = compiled.metadata
            if _key(ours) != _key(src) or _options_differ(options, meta):
                mismatches.append({"kernel": name, "spec": desc,
                                   "jit": [src.signature, {str(k): v for k, v in src.constants.items()},
                                           {str(k): v for k, v in src.attrs.items()}],
                                   "aot": [ours.signature, {str(k): v for k, v in ours.constants.items()},
                                           {str(k): v for k, v in ours.attrs.items()}],
                                   "options": [options, {k: getattr(meta, k, None) for k in _OPTIONS}]})


_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion")


def _options_differ(options: dict, meta) -> bool:
    """Whether the JIT compiled with other options than ``_aot``'s: warps, register cap and FMA
    contraction always named; stages where ``_aot`` names them (else both take Triton's default)."""
    return (options["num_warps"] != meta.num_warps or options.get("maxnreg") != getattr(meta, "maxnreg", None)
            or options.get("enable_fp_fusion") != meta.enable_fp_fusion
            or options.get("num_stages", meta.num_stages) != meta.num_stages)


def _jit_match(h) -> dict:
    """Whether ``_aot`` compiles what the JIT does: the public functions run on small CPU tensors with
    a mocked sm_90 driver, every launch stopping before the driver call (``warmup=True``) once the JIT
    has specialised and compiled its kernel; each specialisation it compiled, of every kernel, must
    have the same source, signature, constants, attributes (pointer alignment, specialised ints) and
    options as the one ``_aot`` builds from its description."""
    from hieraloss.torch.kernels import _grad_buffer, triplet
    from hieraloss.torch.kernels._terms import focal_code
    from hieraloss.torch.kernels.objective import _label_count_kernel, decode_kernel_for, kernel_for

    kernels = (kernel_for(h), decode_kernel_for(h), _label_count_kernel, _grad_buffer._scale_kernel,
               triplet._codes_kernel, triplet._select_kernel, triplet._score_kernel)
    for kernel in kernels[2:]:  # shared by every tree: only this tree's launches
        kernel.device_caches.clear()
    # Triton's default turned off, as triton 3.10 will: a launch that does not name FMA contraction
    # then compiles without it and differs from _aot's.
    default_fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
    try:
        with _aot.compile_only(90):
            _launch_every_specialisation(h)
    finally:
        if default_fusion is None:
            os.environ.pop("TRITON_DEFAULT_FP_FUSION")
        else:
            os.environ["TRITON_DEFAULT_FP_FUSION"] = default_fusion
    modes = {v: k for k, v in _aot.OBJECTIVE_MODES.items()}
    dtypes = {"*" + v: k for k, v in _aot._TRITON.items()}
    labels = {"*i64": "int64", "*i32": "int32", "*u8": "uint8", "*i16": "int16"}
    gammas = {focal_code(g): g for g in (1.0, 2.0, 3.0, 4.0, 1.5)}

    def aligned(kernel, src, arg):
        return bool(src.attrs.get((kernel.arg_names.index(arg),)))

    def objective(src, const):
        return dict(dtype=dtypes[src.signature["x_ptr"]], block_p=const["BLOCK_P"],
                    aligned=aligned(kernels[0], src, "x_ptr"), wide=src.signature["sxb"] == "i64",
                    mode=modes[(const["MODE"], bool(const["TM"]), bool(const["CE"]))],
                    focal=False if const["FOCAL"] == 0 else gammas[const["FOCAL"]], weighted=bool(const["HAS_W"]),
                    label_dtype=labels[src.signature["lab_ptr"]], contiguous_out="sop" in const)

    def decode(src, const):
        return dict(dtype=dtypes[src.signature["x_ptr"]], block_p=const["BLOCK_P"],
                    aligned=aligned(kernels[1], src, "x_ptr"), wide=src.signature["sxb"] == "i64",
                    top_down=bool(const["TOP_DOWN"]))

    def count(src, const):
        return dict(label_dtype=labels[src.signature["lab_ptr"]], num_nodes=h.num_nodes, depth=const["L2"] // 2,
                    dtype="float64" if const["F64"] else "float32", aligned=aligned(kernels[2], src, "lab_ptr"),
                    wide=src.signature["slb"] == "i64")

    def scale(src, const):
        divisible = aligned(kernels[3], src, "n")
        numel = 1 if "n" in const else (4096 if divisible else 4097) + (2**32 if src.signature["n"] == "i64" else 0)
        return dict(dtype=dtypes[src.signature["g_ptr"]], numel=numel, aligned=aligned(kernels[3], src, "g_ptr"))

    def codes(src, const):
        return dict(kernel="codes", label_dtype=labels[src.signature["lab_ptr"]],
                    aligned=aligned(kernels[4], src, "lab_ptr"), wide=src.signature["slb"] == "i64")

    def select(src, const):
        return dict(kernel="select", ordered=bool(const["ORDERED"]))

    def score(src, const):
        return dict(kernel="score", dtype=dtypes[src.signature["emb_ptr"]], channels=const["BC"],
                    num_leaves=const["KP"], grad=bool(const["GRAD"]), aligned=aligned(kernels[6], src, "emb_ptr"),
                    wide=src.signature["seb"] == "i64")

    checked, mismatches = [], []
    for name, kernel, describe, build in (
            ("objective", kernels[0], objective, lambda **d: _aot.objective_source(h, **d)),
            ("decode", kernels[1], decode, lambda **d: _aot.decode_source(h, **d)),
            ("count", kernels[2], count, _aot.label_count_source),
            ("scale", kernels[3], scale, _aot.gradient_scale_source),
            ("codes", kernels[4], codes, _aot.triplet_source),
            ("select", kernels[5], select, _aot.triplet_source),
            ("score", kernels[6], score, _aot.triplet_source)):
        _match(name, kernel, describe, build, checked, mismatches)
    return {"ok": not mismatches and len(checked) >= 10, "checked": checked, "mismatches": mismatches[:3]}


def _launch_objective_specialisations(h) -> None:
    """The public losses' objective launches for ``h`` on small CPU tensors: every mode, float dtype,
    focal (products and exp), node weights, int32 labels, channels_last logits, the cross-entropy
    alone, one pixel per image."""
    import torch

    import hieraloss.torch as hlt

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, h.num_nodes, 16, 16, generator=gen)
    y = torch.tensor(h.node_ids)[torch.randint(0, h.num_nodes, (2, 16, 16), generator=gen)]
    kw = dict(backend="triton", check_labels=False)
    for logits in (x, x.bfloat16(), x.double(), x.contiguous(memory_format=torch.channels_last)):
        leaf = logits.clone().requires_grad_(True)
        hlt.tree_min_loss(leaf, y, h, reduction="hssn", **kw).backward()
        hlt.hssn_loss(leaf, y, h, **kw).backward()
    leaf = x.clone().requires_grad_(True)
    hlt.focal_tree_min_loss(leaf, y.int(), h, gamma=2.0, **kw).backward()
    hlt.focal_tree_min_loss(leaf, y, h, gamma=1.5, node_weight=torch.rand(h.num_nodes, generator=gen),
                            **kw).backward()
    hlt.depth_cross_entropy(leaf, y, h, 1, **kw).backward()
    (hlt.tree_min_loss(leaf, y, h, reduction="none", **kw) * x).sum().backward()
    points = x[:, :, 0, 0].clone().requires_grad_(True)
    hlt.hssn_loss(points, y[:, 0, 0], h, **kw).backward()
    with torch.no_grad():
        hlt.hssn_loss(x, y, h, **kw)


def _table(trees: list, arch: int) -> dict:
    """The table-driven objective kernel (``HIERALOSS_TRITON_OBJECTIVE=table``) compiled as the JIT
    launches it for each tree in turn, under a mocked ``sm_<arch>`` driver: how many specialisations
    it holds after each tree (a tree of a depth seen before should add none), and the registers and
    spills of each."""
    from hieraloss.torch.kernels._common import OBJECTIVE_ENV
    from hieraloss.torch.kernels.objective_table import table_objective_kernel

    os.environ[OBJECTIVE_ENV] = "table"
    table_objective_kernel.device_caches.clear()
    counts = []
    with _aot.compile_only(arch):
        for tree in trees:
            _launch_objective_specialisations(_tree(tree))
            counts.append(sum(len(caches[0]) for caches in table_objective_kernel.device_caches.values()))
    usage = []
    for caches in table_objective_kernel.device_caches.values():
        for compiled in caches[0].values():
            const = {table_objective_kernel.arg_names[i[0]]: v for i, v in compiled.src.constants.items()}
            use = _aot.usage(compiled)
            usage.append({"MODE": const.get("MODE"), "L": const.get("L"), "x": compiled.src.signature["x_ptr"],
                          "registers": use and use.registers, "spill": use and use.spill_bytes})
    return {"ok": True, "counts": counts, "usage": usage}


def searched_pointers(ttir: str) -> int:
    """Tensor loads and stores in the kernel function of ``ttir`` (not in the functions it calls, whose
    slices stay inside them) whose pointer is an op's result, not a block argument: Triton's coalescing
    pass searches the whole connected slice of each such op, which is quadratic in the length of the
    straight-line objective kernel (see ``_terms.load_rows``). MLIR's printer reuses names across
    sibling regions, so a pointer's definition is the nearest one before its use."""
    lines = ttir.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*tt\.func public @", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*tt\.func ", lines[i])), len(lines))
    lines = lines[start:end]
    searched = 0
    for i, line in enumerate(lines):
        m = re.search(r"\btt\.(?:load|store) (%[\w.$-]+)[^:]*: tensor<.*!tt\.ptr", line)
        if not m:
            continue
        name = re.escape(m.group(1))
        for prior in reversed(lines[:i]):
            if re.match(rf"\s*{name}(?::\d+)? = ", prior):
                searched += 1
                break
            if re.search(rf"[(,] ?{name}(?: = |: )", prior):  # iter_args, function or block arguments
                break
    return searched


def main() -> int:
    specs = json.loads(sys.argv[1])
    for spec in specs:
        h = _tree(spec["tree"]) if spec.get("tree") is not None else None
        try:
            if spec["kernel"] == "jit-match":
                print(json.dumps({"spec": spec, **_jit_match(h)}, default=str), flush=True)
                continue
            if spec["kernel"] == "table":
                print(json.dumps({"spec": spec, **_table(spec["trees"], spec.get("arch", 90))}, default=str),
                      flush=True)
                continue
            extra = {k: spec[k] for k in ("aligned", "wide") if k in spec}
            if spec["kernel"] == "count":
                k = _aot.compile_label_count(spec["arch"], label_dtype=spec["label_dtype"],
                                             num_nodes=spec.get("num_nodes", 26), depth=spec["depth"],
                                             dtype=spec["dtype"], **extra)
            elif spec["kernel"] == "triplet":
                k = _aot.compile_triplet(spec["arch"], kernel=spec["part"], dtype=spec.get("dtype", "float32"),
                                         channels=spec.get("channels", 256), grad=spec.get("grad", True),
                                         ordered=spec.get("ordered", False),
                                         label_dtype=spec.get("label_dtype", "int64"),
                                         num_leaves=spec.get("num_leaves", 19), **extra)
            elif spec["kernel"] == "scale":
                k = _aot.compile_gradient_scale(spec["arch"], dtype=spec["dtype"], numel=spec.get("numel", 1 << 20),
                                                **extra)
            elif spec["kernel"] == "objective":
                k = _aot.compile_objective(h, spec["arch"], dtype=spec["dtype"], mode=spec["mode"],
                                           focal=spec.get("focal", False), weighted=spec.get("weighted", False),
                                           block_p=spec.get("block_p"), label_dtype=spec.get("label_dtype", "int64"),
                                           contiguous_out=spec.get("contiguous_out", True),
                                           aligned=spec.get("aligned", True), wide=spec.get("wide", False))
            else:
                k = _aot.compile_decode(h, spec["arch"], dtype=spec["dtype"], top_down=spec.get("top_down", False),
                                        block_p=spec.get("block_p"), aligned=spec.get("aligned", True),
                                        wide=spec.get("wide", False))
            use = _aot.usage(k)
            out = {"ok": True, "registers": use and use.registers, "spill": use and use.spill_bytes}
            if spec.get("searched_pointers"):
                out["searched_pointers"] = searched_pointers(k.asm["ttir"])
            if spec.get("ptx_ops"):
                ptx = k.asm["ptx"]
                out["ptx_ops"] = {op: len(re.findall(rf"^\s*{re.escape(op)}\s", ptx, re.M)) for op in spec["ptx_ops"]}
        except Exception as exc:  # noqa: BLE001 - reported to the test with the spec
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                   "trace": traceback.format_exc()[-3000:]}
        print(json.dumps({"spec": spec, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
