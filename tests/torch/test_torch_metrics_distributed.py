"""HierarchicalSegMetrics.all_reduce over two real gloo processes on CPU."""

from __future__ import annotations

import numpy as np
import pytest
from _dist_utils import WORLD, init_gloo, spawn_workers

pytestmark = pytest.mark.distributed

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TIMEOUT_S = 120


def _data():
    from hieraloss import presets

    h = presets.mapillary_vistas_v2()
    rng = np.random.default_rng(7)
    shape = (4, 6, 9)
    target = rng.integers(0, h.num_nodes, shape)
    target[rng.random(shape) < 0.2] = 255
    leaf = rng.integers(0, h.num_leaves, shape)
    per_depth = np.stack([h.labels_at_depth(leaf, d + 1) for d in range(h.max_depth)], axis=1)
    # Make some per-depth predictions inconsistent: depth-1 label from another pixel.
    per_depth[:, 0] = np.roll(per_depth[:, 0], 1, axis=-1)
    return h, target, leaf, per_depth


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from hieraloss.metrics import HierarchicalSegMetrics

    init_gloo(rank, port, timeout_s=TIMEOUT_S)
    try:
        h, target, leaf, per_depth = _data()
        half = slice(rank * 2, rank * 2 + 2)
        m = HierarchicalSegMetrics(h)
        m.update(leaf[half], target[half])
        m.update(per_depth[half], target[half])
        m.all_reduce()
        np.save(f"{out_dir}/state{rank}.npy", m.state())
        # A rank with another hierarchy makes the collective check fail on every rank.
        from hieraloss import presets

        other = HierarchicalSegMetrics(presets.cityscapes() if rank else h)
        try:
            other.all_reduce()
            np.save(f"{out_dir}/mismatch{rank}.npy", np.array([0]))
        except RuntimeError as exc:
            assert "different hierarchies" in str(exc)
            np.save(f"{out_dir}/mismatch{rank}.npy", np.array([1]))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_single_process(tmp_path):
    from hieraloss.metrics import HierarchicalSegMetrics

    spawn_workers(_worker, str(tmp_path), timeout_s=TIMEOUT_S)
    h, target, leaf, per_depth = _data()
    single = HierarchicalSegMetrics(h)
    single.update(leaf, target)
    single.update(per_depth, target)
    assert single.compute()["consistency_rate"] < 1.0
    for rank in range(WORLD):
        np.testing.assert_array_equal(np.load(tmp_path / f"state{rank}.npy"), single.state())
        assert np.load(tmp_path / f"mismatch{rank}.npy").tolist() == [1]
