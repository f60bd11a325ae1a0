"""Cross-rank triplet loss of the Paddle backend: two real processes (``paddle.distributed.spawn``,
gloo, CPU). The gathered loss must equal the single-process loss on the global batch (loop oracle
for ``sampling="first"``, the local paddle op with rank 0's generator for ``"random"``), and the
ranks' local gradients together must equal that loss's gradient."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import oracle
import pytest
from _dist_utils import WORLD, fixed_cases, global_arrangement, make_case

from hieraloss import presets

paddle = pytest.importorskip("paddle")
pdist = pytest.importorskip("paddle.distributed")

import hieraloss.paddle as hp  # noqa: E402
from hieraloss.paddle import distributed as hpd  # noqa: E402

TIMEOUT_S = 90


def _single_process(case):
    emb, labels = global_arrangement(case)
    e = paddle.to_tensor(emb, stop_gradient=False)
    loss = hp.hierarchy_triplet_loss(e, paddle.to_tensor(labels), case["h"], sampling=case["sampling"],
                                     max_per_class=case["max_per_class"],
                                     generator=np.random.default_rng(case["seed"]))
    loss.backward()
    return float(loss.numpy()), e.grad.numpy()[0, :, 0, :].T


def _worker(case_file, out_dir):
    paddle.set_device("cpu")
    pdist.init_parallel_env()
    rank = pdist.get_rank()
    with open(case_file, "rb") as f:
        cases = pickle.load(f)
    results = []
    for case in cases:
        emb, labels = case["ranks"][rank]
        e = paddle.to_tensor(emb, stop_gradient=False)
        seed = case["seed"] if rank == 0 else case["seed"] + 1000 + rank  # only rank 0's is used
        loss = hpd.hierarchy_triplet_loss(e, paddle.to_tensor(labels), case["h"], sampling=case["sampling"],
                                          max_per_class=case["max_per_class"], generator=np.random.default_rng(seed))
        loss.backward()
        assert e.grad is not None  # connected even without local triplets
        results.append((float(loss.numpy()), np.moveaxis(e.grad.numpy(), 1, -1).reshape(-1, emb.shape[1])))
    # An explicit process group (both ranks again) gives the same as the default one.
    emb, labels = cases[4]["ranks"][rank]
    group = pdist.new_group([0, 1])
    again = hpd.hierarchy_triplet_loss(paddle.to_tensor(emb), paddle.to_tensor(labels), cases[4]["h"],
                                       sampling=cases[4]["sampling"], max_per_class=cases[4]["max_per_class"],
                                       generator=np.random.default_rng(cases[4]["seed"] + rank), process_group=group)
    results.append((float(again.numpy()), None))
    errors = []
    for C, h in ((3 + rank, presets.cityscapes()),
                 (3, presets.cityscapes() if rank else presets.pascal_person_part())):
        try:
            hpd.hierarchy_triplet_loss(paddle.zeros([1, C, 2, 2], dtype="float64"),
                                       paddle.zeros([1, 2, 2], dtype="int64"), h)
            errors.append("")
        except RuntimeError as exc:
            errors.append(str(exc))
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump((results, errors), f)


def _spawn(case_file, out_dir):
    _wait(pdist.spawn(_worker, args=(case_file, out_dir), nprocs=WORLD, backend="gloo", join=False))


def _wait(ctx):
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"paddle workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.mark.distributed
def test_paddle_gathered_triplet_equals_single_process_on_global_batch(tmp_path):
    h = presets.lip()
    cases = fixed_cases() + [make_case(h, 20, "first", 3, same_shape=False, min_side=3),
                             make_case(h, 21, "random", 4, min_side=3)]
    case_file = tmp_path / "cases.pkl"
    case_file.write_bytes(pickle.dumps(cases))
    _spawn(str(case_file), str(tmp_path))
    out = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    for k, case in enumerate(cases):
        want, want_grad = _single_process(case)
        if case["sampling"] == "first":
            emb, labels = global_arrangement(case)
            ref = oracle.triplet_loss_first(emb, labels, case["h"], max_per_class=case["max_per_class"])
            assert want == pytest.approx(ref, rel=1e-12, abs=1e-12)
        for r in range(WORLD):
            assert out[r][0][k][0] == pytest.approx(want, rel=1e-12, abs=1e-12), (k, r, case["sampling"])
        grad = np.concatenate([out[r][0][k][1] for r in range(WORLD)])
        np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12, err_msg=f"case {k}")
    values = [out[0][0][k][0] for k in range(len(cases))]
    assert [out[r][0][len(cases)][0] for r in range(WORLD)] == [values[4]] * WORLD  # explicit group
    assert values[8] == 0.0 and all(v > 0 for i, v in enumerate(values) if i != 8)
    for r in range(WORLD):
        assert "embedding width C" in out[r][1][0] and "hierarchy" in out[r][1][1]


def test_paddle_gather_without_process_group_is_the_local_loss():
    h = presets.cityscapes()
    emb, labels = make_case(h, 11, "random", 4)["ranks"][0]
    run = lambda f: f(paddle.to_tensor(emb), paddle.to_tensor(labels), h, generator=3)  # noqa: E731
    assert float(run(hpd.hierarchy_triplet_loss).numpy()) == float(run(hp.hierarchy_triplet_loss).numpy())


# ---------------------------------------------------------------------------- DataParallel
def _tiny_net(num_nodes):
    class TinyNet(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.body = paddle.nn.Conv2D(3, 6, 3, padding=1)
            self.classifier = paddle.nn.Conv2D(6, num_nodes, 1)
            self.embed = paddle.nn.Conv2D(6, 4, 1, stride=2)

        def forward(self, x):
            f = paddle.nn.functional.relu(self.body(x))
            return self.classifier(f), self.embed(f)

    return TinyNet()


def _flat_params(model):
    return np.concatenate([p.numpy().reshape(-1) for p in model.parameters()])


def _data_parallel_worker(out_dir):
    paddle.set_device("cpu")
    pdist.init_parallel_env()
    rank = pdist.get_rank()
    h = presets.cityscapes()
    results = {}
    for gather in (False, True):
        paddle.seed(rank)  # different initial weights: DataParallel must broadcast rank 0's
        model = paddle.DataParallel(_tiny_net(h.num_nodes), find_unused_parameters=False)
        opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
        start = _flat_params(model)
        rng = np.random.default_rng(100 + rank)
        triplets = []
        for _ in range(3):
            x = paddle.to_tensor(rng.normal(size=(2, 3, 8, 8)).astype("float32"))
            labels = rng.integers(0, h.num_leaves, (2, 8, 8))
            if rank == 1:  # no valid triplet: one class only, or (gathered) no valid pixel at all
                labels[:] = 255 if gather else 13
            labels = paddle.to_tensor(labels)
            logits, emb = model(x)
            if gather:
                tt = hpd.hierarchy_triplet_loss(emb, labels, h, sampling="first")
                loss = hp.hssn_loss(logits, labels, h) + 0.5 * tt
            else:
                loss, parts = hp.hssn_loss(logits, labels, h, embeddings=emb, triplet_weight=0.5,
                                           sampling="first", return_parts=True)
                tt = parts["triplet"]
            triplets.append(float(tt.numpy()))
            loss.backward()
            opt.step()
            opt.clear_grad()
        results[gather] = (start, _flat_params(model), triplets)
    with open(os.path.join(out_dir, f"dp{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


@pytest.mark.distributed
def test_hssn_loss_under_data_parallel_with_a_rank_without_triplets(tmp_path):
    ctx = pdist.spawn(_data_parallel_worker, args=(str(tmp_path),), nprocs=WORLD, backend="gloo", join=False)
    _wait(ctx)
    out = [pickle.loads((tmp_path / f"dp{r}.pkl").read_bytes()) for r in range(WORLD)]
    for gather in (False, True):
        (start0, end0, trip0), (start1, end1, trip1) = out[0][gather], out[1][gather]
        np.testing.assert_array_equal(start0, start1)  # DataParallel broadcast rank 0's weights
        np.testing.assert_array_equal(end0, end1)  # and kept the ranks in sync
        assert not np.array_equal(start0, end0)
        assert all(t > 0 for t in trip0)
        assert trip1 == (trip0 if gather else [0.0, 0.0, 0.0])
