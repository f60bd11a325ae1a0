"""Compile kernel specialisations ahead of time for an NVIDIA target (no GPU needed) and print one
JSON line per specialisation. Run by tests/test_kernels_aot.py in a subprocess, because the test
session runs Triton under the interpreter (TRITON_INTERPRET=1), which cannot compile.

    python tests/aot_compile.py '<json list of specs>'

A spec: {"tree": <preset name> | {"parents": [...], "names": [...], "order": ...},
"kernel": "objective" | "decode" | "scale" | "count" (with "depth") |
"triplet" (with "part": "codes" | "select" |
"score", "channels", "grad", "ordered", "num_leaves"), "arch": 90,
"dtype": "float32", "mode": <_aot.OBJECTIVE_MODES key>, "focal": bool | gamma, "weighted": bool,
"block_p": int | null, "top_down": bool, "label_dtype": "int64", "ptx_ops": [<PTX opcodes to count>]}.
"""

import json
import os
import re
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hieraloss import Hierarchy, presets  # noqa: E402
from hieraloss.torch.kernels import _aot  # noqa: E402


def _tree(spec):
    if isinstance(spec, str):
        return getattr(presets, spec)()
    return Hierarchy(spec["parents"], spec.get("names"), spec.get("order", "default"))


def main() -> int:
    specs = json.loads(sys.argv[1])
    for spec in specs:
        h = _tree(spec["tree"]) if spec.get("tree") is not None else None
        try:
            if spec["kernel"] == "count":
                k = _aot.compile_label_count(spec["arch"], label_dtype=spec["label_dtype"], depth=spec["depth"],
                                             dtype=spec["dtype"])
            elif spec["kernel"] == "triplet":
                k = _aot.compile_triplet(spec["arch"], kernel=spec["part"], dtype=spec.get("dtype", "float32"),
                                         channels=spec.get("channels", 256), grad=spec.get("grad", True),
                                         ordered=spec.get("ordered", False),
                                         label_dtype=spec.get("label_dtype", "int64"),
                                         num_leaves=spec.get("num_leaves", 19))
            elif spec["kernel"] == "scale":
                k = _aot.compile_gradient_scale(spec["arch"], dtype=spec["dtype"])
            elif spec["kernel"] == "objective":
                k = _aot.compile_objective(h, spec["arch"], dtype=spec["dtype"], mode=spec["mode"],
                                           focal=spec.get("focal", False), weighted=spec.get("weighted", False),
                                           block_p=spec.get("block_p"), label_dtype=spec.get("label_dtype", "int64"))
            else:
                k = _aot.compile_decode(h, spec["arch"], dtype=spec["dtype"], top_down=spec.get("top_down", False),
                                        block_p=spec.get("block_p"))
            use = _aot.usage(k)
            out = {"ok": True, "registers": use and use.registers, "spill": use and use.spill_bytes}
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
