"""hieraloss.integrations.torchmetrics.HierarchicalSegMetric against the numpy HierarchicalSegMetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchmetrics")

from _sync_counter import CountSyncs  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hieraloss  # noqa: E402
from hieraloss import LabelError  # noqa: E402
from hieraloss.integrations.torchmetrics import HierarchicalSegMetric  # noqa: E402
from hieraloss.metrics import HierarchicalSegMetrics  # noqa: E402
from hieraloss.testing import hierarchies, label_maps  # noqa: E402
from hieraloss.testing import logits as logit_maps  # noqa: E402


def _per_depth_predictions(h, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-depth node ids, a mix of paths and of independent per-depth picks (not paths)."""
    x = torch.from_numpy(logits)
    _, path = hieraloss.torch.decode(x, h, "path")
    _, independent = hieraloss.torch.decode(x, h, "independent")
    pick = torch.from_numpy(rng.random(path.shape[:1] + path.shape[2:]) < 0.5).unsqueeze(1)
    return torch.where(pick, path, independent)


def _assert_same(reference: HierarchicalSegMetrics, metric: HierarchicalSegMetric) -> None:
    assert np.array_equal(reference.state(), metric.to_metrics().state())
    ref, got = reference.scalars(), metric.compute()
    assert set(ref) == set(got)
    for key, value in ref.items():
        assert (math.isnan(value) and math.isnan(float(got[key]))) or value == float(got[key]), key


@given(h=hierarchies(max_depth=4), data=st.data())
def test_equals_the_numpy_metric_on_random_trees(h, data):
    shape = (2, 5, 3)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    reference, metric = HierarchicalSegMetrics(h), HierarchicalSegMetric(h)
    for _ in range(2):
        target = torch.from_numpy(data.draw(label_maps(h, shape, ignore_fraction=None, partial_fraction=None)))
        x = data.draw(logit_maps(h, shape, ties=data.draw(st.booleans())))
        per_depth = _per_depth_predictions(h, x, rng)
        confidence = torch.from_numpy(rng.random((shape[0], h.max_depth, *shape[1:])))
        leaf = hieraloss.torch.decode(torch.from_numpy(x), h, "path")[0]
        reference.update(per_depth, target, confidence)
        metric.update(per_depth, target, confidence)
        reference.update(leaf, target)
        metric.update(torch.from_numpy(x), target)  # node logits, decoded by path
    _assert_same(reference, metric)


def test_states_merge_by_summation_as_torchmetrics_syncs_them():
    h = hieraloss.presets.mapillary_vistas_v2()
    g = torch.Generator().manual_seed(1)
    whole, parts = HierarchicalSegMetric(h), [HierarchicalSegMetric(h), HierarchicalSegMetric(h)]
    reference = HierarchicalSegMetrics(h)
    for i in range(4):
        target = torch.randint(0, h.num_nodes, (2, 8, 8), generator=g)
        target[:, 0] = 255
        _, pred = hieraloss.torch.decode(torch.randn(2, h.num_nodes, 8, 8, generator=g), h, "independent")
        whole.update(pred, target)
        parts[i % 2].update(pred, target)
        reference.update(pred, target)
    parts[0].merge_state(parts[1])  # torchmetrics' own reduction (dist_reduce_fx), as in a DDP sync
    _assert_same(reference, whole)
    _assert_same(reference, parts[0])
    assert reference.compute()["consistency_rate"] < 1  # off-path pixels took part


def test_update_makes_no_host_sync_off_the_cpu(monkeypatch):
    """The path every non-CPU device takes (discard slots instead of boolean indexing), run on the
    CPU: no host read, and the same counts as the CPU's compacting path."""
    h = hieraloss.presets.mapillary_vistas_v2()
    compacting = HierarchicalSegMetric(h)
    monkeypatch.setattr(HierarchicalSegMetric, "_compacts", staticmethod(lambda device: False))
    metric = HierarchicalSegMetric(h)
    g = torch.Generator().manual_seed(3)
    leaf = torch.randint(0, h.num_leaves, (2, 8, 8), generator=g)
    _, per_depth = hieraloss.torch.decode(torch.randn(2, h.num_nodes, 8, 8, generator=g), h, "independent")
    target = torch.randint(0, h.num_nodes, (2, 8, 8), generator=g)
    confidence = torch.rand(2, h.max_depth, 8, 8, generator=g)
    with CountSyncs() as counter:
        metric.update(leaf, target)
        metric.update(per_depth, target, confidence)
    assert counter.events == []
    compacting.update(leaf, target)
    compacting.update(per_depth, target, confidence)
    for name in ("leaf_joint", "depth_joint", "depth_repeat", "calibration"):
        assert torch.equal(getattr(metric, name), getattr(compacting, name)), name
    assert int(metric.depth_joint.sum()) > 0 and int(metric.depth_repeat.sum()) > 0


def test_bad_values_raise_at_compute_or_at_update_with_validate_args():
    h = hieraloss.presets.cityscapes()
    metric = HierarchicalSegMetric(h)
    raw = torch.full((1, 4, 4), 33)  # a raw Cityscapes id
    metric.update(torch.zeros(1, 4, 4, dtype=torch.int64), raw)
    with pytest.raises(LabelError, match="1[6] target values.*train ids"):
        metric.compute()
    strict = HierarchicalSegMetric(h, validate_args=True)
    with pytest.raises(LabelError, match="33"):
        strict.update(torch.zeros(1, 4, 4, dtype=torch.int64), raw)
    with pytest.raises(LabelError, match="predictions"):
        bad_pred = HierarchicalSegMetric(h)
        bad_pred.update(torch.full((1, 4, 4), h.num_leaves), torch.zeros(1, 4, 4, dtype=torch.int64))
        bad_pred.compute()
    with pytest.raises(ValueError, match="node logits"):
        metric.update(torch.randn(1, h.num_leaves, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int64))


def test_reset_and_full_metrics_object():
    h = hieraloss.presets.cityscapes()
    metric = HierarchicalSegMetric(h)
    target = torch.randint(0, h.num_leaves, (1, 4, 4))
    metric.update(target.clone(), target)
    assert metric.compute()["miou_depth2"] == 1.0
    assert "ece_depth1" not in metric.compute()  # no confidence given
    assert "100.00" in metric.to_metrics().format_table()
    metric.reset()
    assert int(metric.leaf_joint.sum()) == 0
