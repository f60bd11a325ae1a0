"""Ahead-of-time compilation of every kernel specialisation the library launches, for sm_80 and
sm_90, without a GPU (Triton lowers to PTX and the wheel's ptxas assembles it). A specialisation
that fails here fails the same way on a GPU: this is how CI, which has no GPU, catches compile
failures such as triton 3.6's MLIR pass crash on the old gather-based kernel at small tiles.

CI runs this file under the newest triton and again under the oldest one the package admits for
current torch releases (3.6.0; see .ci/run). The compiles run in one subprocess (tests/kernels/aot_compile.py),
because this session runs Triton under the interpreter. Registers and spills are reported by
``benchmarks/bench_kernels.py --compile-check``, not asserted here; the float32 training kernel's
exp, log and reciprocal instructions are counted in its PTX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hieraloss.testing import hierarchies  # noqa: E402

pytestmark = pytest.mark.triton
SCRIPT = Path(__file__).with_name("aot_compile.py")
ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16", "float64")
MODES = ("value", "value+grad", "objective", "ce", "objective value", "loss map", "map grad")


def _compile(specs: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(specs)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs), proc.stderr[-4000:]
    return results


def _assert_all_compile(specs: list[dict]) -> None:
    failed = [r for r in _compile(specs) if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['spec']}\n{r['trace']}" for r in failed[:5])


def _small_tree_specs(tree) -> list[dict]:
    """Every mode x dtype, focal (gamma 2, 3: products; 1.5: exp) and weighted variants, test and
    production tiles, contiguous and channels_last outputs, aligned and unaligned pointers (a view
    at an odd offset), int32 and int64 batch strides, both archs."""
    specs = []
    for arch in ARCHS:
        for i, mode in enumerate(MODES):
            for j, dtype in enumerate(DTYPES):
                specs.append(dict(tree=tree, kernel="objective", arch=arch, dtype=dtype, mode=mode,
                                  focal=(False, True, False, 1.5, False, 3.0)[(i + j) % 6], weighted=(i + j) % 3 == 0,
                                  block_p=16 if (i + j) % 2 else None,
                                  label_dtype=("int64", "int32", "uint8", "int16")[(i + j) % 4],
                                  contiguous_out=(i + 2 * j) % 3 != 0, aligned=(i + j) % 4 != 2,
                                  wide=(i + 3 * j) % 4 == 1))
        for top_down in (False, True):
            for dtype in ("float32", "float64"):
                for block_p in (16, None):
                    specs.append(dict(tree=tree, kernel="decode", arch=arch, dtype=dtype, top_down=top_down,
                                      block_p=block_p, aligned=block_p is None, wide=dtype == "float64"))
    return specs


@pytest.mark.parametrize("preset", ["pascal_person_part", "cityscapes", "lip"])
def test_presets_compile(preset):
    _assert_all_compile(_small_tree_specs(preset))


def test_flat_single_node_and_deep_trees_compile():
    """The case that crashed triton 3.6 before: a flat tree of 3 leaves, float64, BLOCK_P 16; one node;
    a chain 7 levels deep (16 per-depth sums in the label count)."""
    _assert_all_compile(_small_tree_specs({"parents": [-1, -1, -1]}) + _small_tree_specs({"parents": [-1]})
                        + _small_tree_specs({"parents": [2, 2, 3, 4, 5, 6, 7, -1]}))


def test_mapillary_training_steps_compile():
    """The largest preset (149 nodes, leaves at depths 2-4): the production training specialisations
    on sm_90, one with channels_last logits (each takes tens of seconds to compile, so not every mode)."""
    specs = [dict(tree="mapillary_vistas_v2", kernel="objective", arch=90, dtype=dtype, mode=mode, focal=focal,
                  weighted=False, contiguous_out=contiguous)
             for dtype, mode, focal, contiguous in (("float32", "objective", False, True),
                                                    ("bfloat16", "value+grad", True, True),
                                                    ("float32", "value+grad", False, False))]
    specs.append(dict(tree="mapillary_vistas_v2", kernel="decode", arch=90, dtype="float16", top_down=True))
    _assert_all_compile(specs)


def test_ahead_of_time_compiles_what_the_jit_launches():
    """``_aot``'s specialisations are the ones Triton's JIT compiles when the public functions launch
    (pointer alignment, int widths, specialised strides and sizes, options), for every kernel: the
    objective, decoding, the gradient scaling, the label count and the triplet's three. Else these
    tests and the compile-check's registers would be about kernels no launch runs. Cityscapes; a
    32-node forest (a channels_last pixel stride divisible by 16); a flat 70-node tree
    (register-capped under triton older than 3.9)."""
    trees = ["cityscapes", {"parents": [28 + i // 7 for i in range(28)] + [-1] * 4},
             {"parents": [69] * 69 + [-1]}]
    nodes = [26, 32, 70]
    for result, n in zip(_compile([dict(kernel="jit-match", tree=t) for t in trees]), nodes, strict=True):
        assert result["ok"], (result["spec"], result.get("mismatches"), result.get("error"))
        checked = result["checked"]
        assert {d["kernel"] for d in checked} == {"objective", "decode", "count", "scale", "codes", "select", "score"}
        assert {d["mode"] for d in checked if d["kernel"] == "objective"} == set(MODES)
        # gradients of 2 x n x 16 x 16 and 2 x n x 15 x 15 entries
        assert {d["numel"] % 16 == 0 for d in checked if d["kernel"] == "scale"} == {True, n % 8 == 0}
        assert {d["ordered"] for d in checked if d["kernel"] == "select"} == {True, False}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_table_driven_objective_compiles_once_per_depth(arch):
    """The table-driven objective kernel (HIERALOSS_TRITON_OBJECTIVE=table) compiles for every
    specialisation the losses launch (modes, dtypes, focal, weights, channels_last), and a second tree
    of the same depth (Cityscapes, then a 60-node two-level forest) compiles nothing new; a deeper tree
    (Mapillary, 149 nodes) adds its own. Registers and spills: docs/performance.md."""
    trees = ["cityscapes", {"parents": [50 + i // 5 for i in range(50)] + [-1] * 10}, "mapillary_vistas_v2"]
    (result,) = _compile([dict(kernel="table", trees=trees, arch=arch)])
    assert result["ok"], result.get("trace") or result.get("error")
    first, same_depth, deeper = result["counts"]
    assert first >= 8 and same_depth == first and deeper > same_depth, result["counts"]
    assert {u["MODE"] for u in result["usage"]} == {0, 1, 2, 3}
    assert {u["L"] for u in result["usage"]} == {2, 4}


def test_wide_trees_give_the_coalescing_pass_no_pointer_to_search():
    """In the generated kernels of wide trees every tensor load and store takes its pointer as a block
    argument (``_terms.load_rows``), so Triton's coalescing pass, quadratic in the straight-line code
    for the others, has nothing to search (triton 3.6, a 584-node tree's objective kernel: 170 s to
    compile, 109 of them that pass; 59 s once no pointer was left to search). Small trees keep the
    plain loads of the labels and the sums (fewer registers), and do have such pointers."""
    wide = {"parents": [69] * 69 + [-1]}
    results = _compile([dict(tree=wide, kernel="objective", arch=90, dtype="float32", mode=mode,
                             weighted=mode == "map grad", searched_pointers=True)
                        for mode in ("value+grad", "objective", "objective value", "map grad")]
                       + [dict(tree=wide, kernel="decode", arch=90, dtype="float32", top_down=True,
                               searched_pointers=True)]
                       + [dict(tree="cityscapes", kernel="objective", arch=90, dtype="float32", mode="value+grad",
                               searched_pointers=True)])
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    *wide_results, small = results
    assert [r["searched_pointers"] for r in wide_results] == [0] * len(wide_results), wide_results
    assert small["searched_pointers"] > 0, small


def test_gradient_scale_and_label_count_compile():
    """The backward's in-place scaling of the gradient the objective wrote, for every dtype and the
    sizes the JIT tells apart (1, a multiple of 16 or not, beyond int32); the label count as a launch
    of its own (the benchmarks' A/B), for every label dtype, shallow and deep, small and wide trees (their
    own loop steps), aligned or not (a view at an odd offset), int32 or int64 strides."""
    _assert_all_compile([dict(kernel="scale", arch=arch, dtype=dt, numel=n, aligned=n != 1)
                         for arch in ARCHS for i, dt in enumerate(DTYPES)
                         for n in (1, 4096 + i, 2**31 + 16 * i)]
                        + [dict(kernel="count", arch=arch, label_dtype=ld, depth=depth, num_nodes=(26, 149)[i % 2],
                                dtype=("float32", "float64")[(i + depth) % 2], aligned=(i + depth) % 3 != 0,
                                wide=(i + depth) % 2 == 1)
                           for arch in ARCHS for i, ld in enumerate(("int64", "int32", "uint8", "int16"))
                           for depth in (1, 3, 7)])


def test_triplet_kernels_compile():
    """The triplet loss's three kernels: label codes for every label dtype, the selection in flat and
    in random key order, and the scoring for every dtype, with and without the gradient, from one
    channel to the widest the library sends to the kernels (channel counts set the tile sizes); the
    labels and embeddings aligned or not (a view at an odd offset), with int32 or int64 strides."""
    specs = [dict(kernel="triplet", part="codes", arch=arch, label_dtype=ld, aligned=i != 1, wide=i == 2)
             for arch in ARCHS for i, ld in enumerate(("int64", "int32", "uint8", "int16"))]
    specs += [dict(kernel="triplet", part="select", arch=arch, ordered=ordered) for arch in ARCHS
              for ordered in (False, True)]
    specs += [dict(kernel="triplet", part="score", arch=arch, dtype=dtype, grad=grad, channels=channels,
                   num_leaves=leaves, aligned=(i + j) % 3 != 1, wide=(i + j) % 4 == 3)
              for arch in ARCHS for i, dtype in enumerate(DTYPES) for grad in (True, False)
              for j, (channels, leaves) in enumerate(((1, 2), (17, 19), (256, 124), (4096, 7), (64, 3000)))]
    _assert_all_compile(specs)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=hierarchies(max_depth=4, max_children=4, order=None), seed=st.integers(0, 2**16))
def test_random_trees_compile(h, seed):
    rng = np.random.default_rng(seed)
    tree = h.to_dict()
    specs = [dict(tree=tree, kernel="objective", arch=int(rng.choice(ARCHS)), dtype=str(rng.choice(DTYPES)),
                  mode=str(rng.choice(MODES)), focal=bool(rng.integers(2)), weighted=bool(rng.integers(2)),
                  block_p=int(rng.choice([16, 32, 128])))
             for _ in range(3)]
    _assert_all_compile(specs)


_FAST_MATH = ("rcp.approx.ftz.f32", "ex2.approx.ftz.f32", "ex2.approx.f32", "lg2.approx.f32", "div.full.f32",
              "div.rn.f32")


@pytest.mark.parametrize("preset", ["cityscapes", "pascal_person_part"])
def test_training_step_computes_each_entry_once_with_fast_math(preset):
    """The float32 training kernel (value and gradient) evaluates each tree-min entry once: one exp,
    one log and one reciprocal per negative entry (N nodes) and per depth's positive entry (L), so
    no leaf term is computed twice, and each is a single MUFU op (no division, no denormal-keeping
    exp); the exp-based focal factor adds one exp per entry, integer gammas none. Half logits compute
    in float32 alike; float64 kernels take none of the float32 approximations. The objective kernel
    (cross-entropy included) of these small trees has no division and no denormal-keeping exp either."""
    from hieraloss import presets

    h = getattr(presets, preset)()
    entries = h.num_nodes + h.max_depth
    cases = [("float32", False, 1), ("float32", 2.0, 1), ("float32", 1.5, 2), ("bfloat16", 3.0, 1),
             ("float64", False, 0)]
    results = _compile([dict(tree=preset, kernel="objective", arch=90, dtype=dtype, mode=mode, focal=focal,
                             ptx_ops=list(_FAST_MATH)) for dtype, focal, _ in cases
                        for mode in ("value+grad", "objective")])
    pairs = zip(results[::2], results[1::2], strict=True)
    for (dtype, focal, exps), (step, objective) in zip(cases, pairs, strict=True):
        assert step["ok"] and objective["ok"], step.get("trace") or objective.get("trace")
        f32 = dtype != "float64"
        assert step["ptx_ops"] == {"rcp.approx.ftz.f32": entries * f32, "ex2.approx.ftz.f32": entries * exps,
                                   "ex2.approx.f32": 0, "lg2.approx.f32": entries * f32, "div.full.f32": 0,
                                   "div.rn.f32": 0}, (dtype, focal)
        # hssn_loss's kernel: the cross-entropy's exps are single MUFU ops too in a tree this small
        ops = objective["ptx_ops"]
        assert ops["ex2.approx.f32"] == ops["div.full.f32"] == ops["div.rn.f32"] == 0, (dtype, focal, ops)
        assert ops["ex2.approx.ftz.f32"] > step["ptx_ops"]["ex2.approx.ftz.f32"] or not f32, (dtype, focal, ops)
