"""The ``hieraloss`` command line: inspect, errors, bench (demo end to end is in test_package_demo.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hieraloss import Hierarchy, presets
from hieraloss.cli import hierarchy_facts, main
from hieraloss.demo.bench import benchmark_scripts, run_bench
from hieraloss.testing import hierarchies

ROOT = Path(__file__).resolve().parents[2]


def test_inspect_cityscapes_prints_the_preset_facts(capsys):
    assert main(["inspect", "cityscapes"]) == 0
    out = capsys.readouterr().out
    assert "26 channels = 19 leaves + 7 internal nodes, max depth 2 (balanced)" in out
    assert "layout: default" in out
    found = re.findall(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.M)
    rows = {int(m[0]): tuple(map(int, m[1:])) for m in found}
    assert rows == {1: (7, 0, 7), 2: (19, 19, 19)}  # depth: nodes, leaves, classes
    lines = out.splitlines()
    flat = lines.index("  [19] flat (node 19)")
    assert lines[flat + 1:flat + 3] == ["    [0] road (leaf 0)", "    [1] sidewalk (leaf 1)"]
    assert "  [25] vehicle (node 25)" in lines


def test_inspect_json_parses_and_round_trips(capsys):
    assert main(["inspect", "cityscapes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert Hierarchy.from_json(json.dumps(data)) == presets.cityscapes()
    facts = data["facts"]
    assert facts["num_channels"] == 26 and facts["num_leaves"] == 19 and facts["max_depth"] == 2
    assert facts["per_depth"][0] == {"depth": 1, "nodes": 7, "leaves": 0, "classes": 7}
    assert facts["layout"] == "default" and facts["balanced"] is True
    road = facts["channels"][0]
    assert road == {"channel": 0, "node_id": 0, "name": "road", "depth": 2, "parent_channel": 19,
                    "leaf": True}


def test_inspect_unbalanced_preset(capsys):
    assert main(["inspect", "mapillary_vistas_v2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["facts"]
    assert facts["num_leaves"] == 124 and facts["max_depth"] == 4 and facts["balanced"] is False
    assert sum(r["leaves"] for r in facts["per_depth"]) == 124


@settings(max_examples=10)
@given(h=hierarchies(max_depth=3, order=None), as_text=st.booleans())
def test_inspect_a_json_file(tmp_path_factory, h, as_text):
    path = tmp_path_factory.mktemp("h") / "tree.json"
    h.to_json(path)
    args = ["inspect", str(path)] + ([] if as_text else ["--json"])
    proc_out = _capture(args)
    if as_text:
        assert f"{h.num_nodes} channels = {h.num_leaves} leaves" in proc_out
        for c in range(h.num_nodes):  # every channel appears once in the tree
            kind = "leaf" if h.is_leaf[c] else "node"
            assert proc_out.count(f"[{c}] {h.node_names[c]} ({kind} {h.node_ids[c]})") == 1
    else:
        data = json.loads(proc_out)
        assert Hierarchy.from_json(json.dumps(data)) == h
        facts = data["facts"]
        # Independent recount from the parent table.
        depth = np.ones(h.num_nodes, dtype=int)
        for c in range(h.num_nodes):
            p = h.parent[c]
            while p >= 0:
                depth[c] += 1
                p = h.parent[p]
        assert facts["max_depth"] == depth.max()
        for row in facts["per_depth"]:
            assert row["nodes"] == int((depth == row["depth"]).sum())
            assert row["leaves"] == int(((depth == row["depth"]) & h.is_leaf).sum())
        expected_layout = h.to_dict()["order"] if isinstance(h.to_dict()["order"], str) else "custom"
        assert facts["layout"] == expected_layout
        assert facts == hierarchy_facts(h)


def _capture(args):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    return buf.getvalue()


def test_unknown_preset_exits_nonzero_with_a_clear_message(capsys):
    assert main(["inspect", "no_such_tree"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'no_such_tree'" in err and "cityscapes" in err


def test_bad_json_file_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert main(["inspect", str(bad)]) == 2
    assert "not a valid hierarchy JSON" in capsys.readouterr().err
    cyclic = tmp_path / "cyclic.json"
    cyclic.write_text(json.dumps({"format": "hieraloss.hierarchy", "version": 1, "names": ["a", "b", "c"],
                                  "parents": [2, 2, 1]}))
    assert main(["inspect", str(cyclic)]) == 2
    assert "cycle" in capsys.readouterr().err


def test_demo_argument_errors(capsys, tmp_path):
    assert main(["demo", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["demo", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["demo", "--models", "flat", "hxe2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--models: unknown model 'hxe2'" in err and "hssn_tm1" in err
    assert main(["demo", "--models", ",", "--out", str(tmp_path)]) == 2
    assert "--models: no model given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--backend", "jax"])
    assert exc.value.code == 2
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hieraloss", "inspect", "pascal_person_part"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12 channels = 7 leaves + 5 internal nodes, max depth 3" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hieraloss"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "demo" in proc.stderr


def test_bench_builtin_timing(capsys):
    pytest.importorskip("torch")
    assert main(["bench", "--builtin", "--preset", "pascal_person_part", "--shape", "1", "8", "8"]) == 0
    out = capsys.readouterr().out
    assert "built-in timing (torch): logits [1, 12, 8, 8]" in out
    assert "tree_min_loss forward+backward" in out and "decode(method='path')" in out
    assert len(re.findall(r"\d+\.\d+ ms", out)) == 3
    assert main(["bench", "--builtin", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["bench", "--builtin", "--shape", "0", "8", "8"]) == 2
    assert "--shape" in capsys.readouterr().err


def test_bench_builtin_paddle(capsys):
    pytest.importorskip("paddle")
    try:
        import hieraloss.paddle  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"hieraloss.paddle is not available: {exc}")
    assert run_bench(backend="paddle", preset="cityscapes", shape=(1, 8, 8), scripts=[]) == 0
    assert "built-in timing (paddle): logits [1, 26, 8, 8]" in capsys.readouterr().out


def test_bench_runs_checkout_scripts_with_quick(tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    # The checkout's package must be importable from the scripts even when not pip-installed.
    (bench / "bench_ok.py").write_text("import sys\nimport hieraloss\nassert sys.argv[1:] == ['--quick']\n")
    (bench / "helper.py").write_text("raise SystemExit(3)\n")  # not a bench_*.py script: not run
    assert benchmark_scripts(bench) == [bench / "bench_ok.py"]
    assert run_bench(scripts=benchmark_scripts(bench)) == 0
    (bench / "bench_zfail.py").write_text("raise SystemExit(4)\n")
    assert run_bench(scripts=benchmark_scripts(bench)) == 1
    assert "bench_zfail.py exited with status 4" in capsys.readouterr().err


def test_kernels_dump_writes_the_source_that_runs(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from hieraloss.torch.kernels import _codegen

    h = presets.lip()
    out = tmp_path / "lip_objective.py"
    assert main(["kernels", "dump", "lip", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.splitlines()[0].startswith("# hieraloss objective kernel generated for lip (25 nodes")
    assert text.split("\n", 1)[1] == _codegen.objective_source(h)
    compile(text, str(out), "exec")  # it parses as Python
    assert main(["kernels", "dump", "lip", "--kernel", "decode"]) == 0
    assert capsys.readouterr().out.split("\n", 1)[1] == _codegen.decode_source(h)
    assert main(["kernels", "dump", "no_such_tree"]) == 2
