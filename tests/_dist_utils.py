"""Run a function in real worker processes (``torch.multiprocessing.spawn``) with bounded time.

Workers call :func:`init_gloo` to join a gloo process group on 127.0.0.1; results go back through
files in a temporary directory. A worker's exception fails the test with its traceback. Also the
random triplet cases shared by the torch and paddle distributed tests (numpy only).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import oracle
import pytest

from hieraloss import presets

WORLD = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world: int = WORLD, timeout_s: float = 60.0) -> None:
    """Join a torch.distributed gloo group of ``world`` processes on 127.0.0.1:``port``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def spawn_workers(worker: Callable, *args, world: int = WORLD, timeout_s: float = 120.0) -> None:
    """``worker(rank, port, *args)`` in ``world`` spawned processes; fails the test if they do not
    all finish within ``timeout_s`` (stragglers are terminated) or if one raises."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(free_port(), *args), nprocs=world, join=False)
    try:
        for _ in range(int(timeout_s)):
            if ctx.join(timeout=1):
                break
        else:
            pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


# ---------------------------------------------------------------------------- triplet cases
def _rank_data(h, rng, B, emb_hw, lab_hw, C, ignore, single_class=None):
    labels = rng.integers(0, h.num_leaves, size=(B, *lab_hw))
    partial = (rng.random(labels.shape) < 0.1) & (h.num_nodes > h.num_leaves)  # these do not take part
    labels[partial] = rng.integers(h.num_leaves, h.num_nodes, size=int(partial.sum()))
    if single_class is not None:
        labels[:] = single_class
    labels[rng.random(labels.shape) < ignore] = 255
    emb = rng.normal(size=(B, C, *emb_hw))
    return emb, labels


def make_case(h, seed, sampling, max_per_class, *, same_shape=True, ignore=0.2, empty_rank=None,
              single_class=None, min_side=1):
    """Per-rank float64 embeddings [B, C, h, w] and labels [B, H, W] (leaves, some partial labels,
    ignore) from ``seed``; ``same_shape``: every rank has the same shapes (concatenation-equivalent)."""
    rng = np.random.default_rng(seed)
    C = int(rng.integers(1, 5))
    shapes = []
    for _ in range(WORLD):
        if same_shape and shapes:
            shapes.append(shapes[0])
            continue
        B = int(rng.integers(1, 3))
        emb_hw = tuple(int(v) for v in rng.integers(min_side, 7, size=2))
        lab_hw = tuple(v * int(rng.integers(1, 3)) + int(rng.integers(0, 2)) for v in emb_hw)
        shapes.append((B, emb_hw, lab_hw))
    ranks = []
    for r, (B, emb_hw, lab_hw) in enumerate(shapes):
        emb, labels = _rank_data(h, rng, B, emb_hw, lab_hw, C, 1.0 if r == empty_rank else ignore,
                                 single_class)
        ranks.append((emb, labels))
    return dict(h=h, ranks=ranks, sampling=sampling, max_per_class=max_per_class, seed=seed)


def fixed_cases():
    city, person, vistas = presets.cityscapes(), presets.pascal_person_part(), presets.mapillary_vistas_v2()
    case = functools.partial(make_case, min_side=3)
    return [
        case(city, 1, "first", 200),
        case(city, 2, "first", 2),
        case(person, 3, "first", 3, same_shape=False),
        case(vistas, 4, "first", 5, same_shape=False),  # unbalanced
        case(person, 5, "random", 200),
        case(vistas, 6, "random", 2, same_shape=False),
        case(city, 7, "first", 200, empty_rank=1),  # rank 1 has no pixel taking part
        case(city, 8, "random", 3, empty_rank=0),
        case(city, 9, "first", 200, single_class=4),  # no triplet on any rank
    ]


def global_arrangement(case):
    """The global batch as one single-process input: embeddings [1, C, 1, P] and labels [1, 1, P]
    at embedding size, ranks in order, each in flat (b, i, j) order."""
    rows, labs = [], []
    for emb, labels in case["ranks"]:
        small = oracle.resize_nearest(labels, emb.shape[2:])
        rows.append(np.moveaxis(emb, 1, -1).reshape(-1, emb.shape[1]))
        labs.append(small.reshape(-1))
    emb = np.concatenate(rows).T[None, :, None, :]
    return emb, np.concatenate(labs)[None, None, :]
