"""The ``hieraloss`` command line: ``demo``, ``inspect`` and ``bench``.

``python -m hieraloss demo``     train flat CE, HSSN, HXE, soft-label and LogicSeg models on procedural scenes,
                                 compare them.
``python -m hieraloss inspect``  show a preset or a hierarchy JSON file (tree, channels, layout).
``python -m hieraloss bench``    a quick timing run.
``python -m hieraloss kernels dump <preset or json>``  write the Triton source generated for that tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import presets
from .hierarchy import Hierarchy, HierarchyError, LabelError

__all__ = ["main", "load_hierarchy", "hierarchy_facts"]


class CLIError(Exception):
    """A user-facing error: printed as ``hieraloss: error: ...`` with exit status 2."""


def load_hierarchy(source: str) -> Hierarchy:
    """A preset name (``cityscapes``, ...) or the path of a hierarchy JSON file (:func:`hieraloss.presets.load`)."""
    try:
        return presets.load(source)
    except HierarchyError as exc:
        raise CLIError(f"{source}: not a valid hierarchy JSON file: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise CLIError(f"{source}: not a valid hierarchy JSON file: {exc!r}") from None
    except ValueError as exc:
        raise CLIError(f"unknown preset {source!r} and no such file; {exc}") from None


def hierarchy_facts(h: Hierarchy) -> dict[str, Any]:
    """Counts per depth, layout and the channel table of ``h`` as plain JSON-able data."""
    order = h.to_dict()["order"]
    per_depth = []
    for d in range(1, h.max_depth + 1):
        at = h.depth == d
        per_depth.append({
            "depth": d,
            "nodes": int(at.sum()),
            "leaves": int((at & h.is_leaf).sum()),
            "classes": int(len(h.depth_channels[d - 1])),  # nodes at d plus shallower leaves
        })
    leaf_depths = h.depth[h.leaf_channels]
    return {
        "num_channels": int(h.num_nodes),
        "num_leaves": int(h.num_leaves),
        "num_internal": int(h.num_nodes - h.num_leaves),
        "max_depth": int(h.max_depth),
        "balanced": bool((leaf_depths == h.max_depth).all()),
        "layout": order if isinstance(order, str) else "custom",
        "per_depth": per_depth,
        "channels": [
            {"channel": c, "node_id": int(h.node_ids[c]), "name": h.node_names[c], "depth": int(h.depth[c]),
             "parent_channel": int(h.parent[c]), "leaf": bool(h.is_leaf[c])}
            for c in range(h.num_nodes)
        ],
        "fingerprint": h.fingerprint,
    }


_LAYOUTS = {
    "default": "default (leaves in id order, then internal nodes from the deepest depth up; "
               "channel = node id)",
    "coarse_to_fine": "coarse_to_fine (depth 1 first, then deeper nodes)",
    "custom": "custom (an explicit channel order)",
}


def _cmd_inspect(args: argparse.Namespace) -> int:
    h = load_hierarchy(args.source)
    facts = hierarchy_facts(h)
    if args.json:
        # The hierarchy's own JSON (loadable by Hierarchy.from_json) with the facts added.
        print(json.dumps({**h.to_dict(), "facts": facts}, indent=2))
        return 0
    shape = "balanced" if facts["balanced"] else "unbalanced"
    print(f"{args.source}: {facts['num_channels']} channels = {facts['num_leaves']} leaves + "
          f"{facts['num_internal']} internal nodes, max depth {facts['max_depth']} ({shape})")
    print(f"layout: {_LAYOUTS[facts['layout']]}")
    print("depth  nodes  leaves  classes")
    for row in facts["per_depth"]:
        print(f"{row['depth']:>5}  {row['nodes']:>5}  {row['leaves']:>6}  {row['classes']:>7}")
    print(f"fingerprint: {facts['fingerprint'][:16]}")
    print("tree ([channel] name (leaf id | node id)):")
    print("\n".join(str(h).splitlines()[1:]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.train import DemoConfig, parse_models, run_demo

    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be at least 1, got {args.epochs}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    try:
        models = parse_models(args.models) if args.models is not None else None
    except ValueError as exc:
        raise CLIError(f"--models: {exc}") from None
    load_hierarchy(args.preset)  # fail early with the CLI's message
    config = DemoConfig.preset_defaults(quick=args.quick, preset=args.preset, backend=args.backend,
                                        seed=args.seed, epochs=args.epochs, threads=args.threads,
                                        models=models)
    run_demo(config, out_dir=args.out, progress=not args.no_progress)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .demo.bench import run_bench

    if min(args.shape) < 1:
        raise CLIError(f"--shape needs three positive sizes B H W, got {args.shape}")
    load_hierarchy(args.preset)  # fail early with the CLI's message
    return run_bench(backend=args.backend, preset=args.preset, shape=tuple(args.shape),
                     scripts=[] if args.builtin else None)


def _cmd_kernels_dump(args: argparse.Namespace) -> int:
    h = load_hierarchy(args.source)
    from .torch.kernels import _codegen  # needs torch and triton (an optional dependency)

    source = _codegen.objective_source(h) if args.kernel == "objective" else _codegen.decode_source(h)
    header = (f"# hieraloss {args.kernel} kernel generated for {args.source} ({h.num_nodes} nodes, depth "
              f"{h.max_depth}, fingerprint {h.fingerprint[:16]}): the source that runs, as compiled\n")
    if args.out in (None, "-"):
        sys.stdout.write(header + source)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(header + source)
        print(f"wrote {args.out}: {len(source.splitlines())} lines", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hieraloss", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,inspect,bench,kernels}")

    demo = sub.add_parser("demo", help="train flat CE, HSSN, HXE, soft labels on procedural scenes and "
                          "compare (CPU, minutes)",
                          description="Train identical tiny FCNs on the same procedural scenes, batches and "
                          "schedule, one per objective: flat cross-entropy, HSSN (published weights), HSSN "
                          "with tree_min_weight=1, hierarchical cross-entropy and soft labels; score them "
                          "on a held-out split; print one table, write results.json, demo.png "
                          "(predictions) and miou.png (mIoU per depth) to --out.")
    demo.add_argument("--backend", choices=["torch", "paddle"], default="torch")
    demo.add_argument("--preset", default="cityscapes",
                      help=f"class tree of the scenes: one of {', '.join(presets.names())}, or a JSON file")
    demo.add_argument("--epochs", type=int, default=None,
                      help="passes over the training scenes: the budget (default 7, --quick 2)")
    demo.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                      help="the models to train, in this order (space or comma separated; default all): "
                      "flat, hssn, hssn_tm1, hxe, soft")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    demo.add_argument("--threads", type=int, default=None,
                      help="CPU threads for the framework (default: 1, so the numbers do not depend on "
                      "the machine; more threads help little on this small model and slow it down "
                      "badly on a busy machine)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)

    inspect = sub.add_parser("inspect", help="show a preset or hierarchy JSON: tree, channels, layout",
                             description="Show a hierarchy: the tree with channel ids, counts per depth "
                             "and the channel layout.")
    inspect.add_argument("source", help=f"a preset ({', '.join(presets.names())}) or a hierarchy JSON file")
    inspect.add_argument("--json", action="store_true",
                         help="print Hierarchy.to_json() with a 'facts' entry added")
    inspect.set_defaults(run=_cmd_inspect)

    bench = sub.add_parser("bench", help="quick timings (the checkout's benchmarks/ scripts if present)",
                           description="Run benchmarks/bench_*.py --quick from a source checkout; "
                           "without one, time loss forward+backward and decoding against one read+write "
                           "pass over the logits.")
    bench.add_argument("--backend", choices=["torch", "paddle"], default="torch",
                       help="backend of the built-in timing")
    bench.add_argument("--preset", default="cityscapes", help="hierarchy of the built-in timing")
    bench.add_argument("--builtin", action="store_true",
                       help="the built-in timing even when benchmarks/ is present")
    bench.add_argument("--shape", type=int, nargs=3, default=[2, 128, 256], metavar=("B", "H", "W"),
                       help="logits size of the built-in timing (default: 2 128 256)")
    bench.set_defaults(run=_cmd_bench)

    kernels = sub.add_parser("kernels", help="the Triton kernels generated per hierarchy",
                             description="Tools for the fused Triton kernels, which are generated per hierarchy.")
    ksub = kernels.add_subparsers(dest="kernels_command", required=True, metavar="{dump}")
    dump = ksub.add_parser("dump", help="write the generated Triton source for a tree",
                           description="Write the Triton source that hieraloss generates and compiles for a "
                           "hierarchy (needs torch and triton; nothing runs on a GPU).")
    dump.add_argument("source", help=f"a preset ({', '.join(presets.names())}) or a hierarchy JSON file")
    dump.add_argument("--kernel", choices=["objective", "decode"], default="objective",
                      help="which kernel: the objective (tree-min + cross-entropy, value and gradient) or "
                      "decoding (default: objective)")
    dump.add_argument("--out", default=None, help="output file (default: standard output)")
    dump.set_defaults(run=_cmd_kernels_dump)
    return parser


_OPTIONAL = {"torch", "paddle", "matplotlib", "tqdm", "triton"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hieraloss`` / ``python -m hieraloss``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CLIError, HierarchyError, LabelError) as exc:
        print(f"hieraloss: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _OPTIONAL:
            raise
        print(f"hieraloss: error: {exc.name} is not installed: the demo needs `pip install "
              "hieraloss[demo]`, the paddle backend `pip install hieraloss[paddle]`", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hieraloss: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
