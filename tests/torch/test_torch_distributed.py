"""Cross-rank triplet loss and HSSNLoss under DistributedDataParallel: two real gloo processes on CPU.

The gathered loss must equal the single-process loss on the global batch (rank 0's pixels in flat
order, then rank 1's): checked against the loop oracle for ``sampling="first"`` and against the
local torch op for ``sampling="random"`` with rank 0's generator; the local gradients of the two
ranks, put together, must equal the gradient of that single-process loss.
"""

from __future__ import annotations

import pickle

import numpy as np
import oracle
import pytest
from _dist_utils import WORLD, fixed_cases, global_arrangement, init_gloo, make_case, spawn_workers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hieraloss import presets
from hieraloss.testing import hierarchies

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import hieraloss.torch as ht  # noqa: E402

TIMEOUT_S = 60


# ---------------------------------------------------------------------------- cases
@st.composite
def _random_cases(draw):
    h = draw(hierarchies(max_depth=3, max_children=3, balanced=None, order=None))
    return make_case(h, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(["first", "random"])),
                 draw(st.integers(1, 4)), same_shape=draw(st.booleans()), ignore=draw(st.floats(0, 0.5)))


# ---------------------------------------------------------------------------- expectations
def _single_process(case):
    """(value, gradient rows [P, C]) of the local torch op on the global arrangement."""
    emb, labels = global_arrangement(case)
    e = torch.tensor(emb, dtype=case.get("dtype", torch.float64), requires_grad=True)
    gen = torch.Generator().manual_seed(case["seed"])
    loss = ht.hierarchy_triplet_loss(e, torch.from_numpy(labels), case["h"], sampling=case["sampling"],
                                     max_per_class=case["max_per_class"], generator=gen)
    loss.backward()
    return loss.item(), e.grad[0, :, 0, :].T.double().numpy()


# ---------------------------------------------------------------------------- workers
def _gather_worker(rank, port, case_file, out_dir):
    init_gloo(rank, port, timeout_s=TIMEOUT_S)
    try:
        with open(case_file, "rb") as f:
            cases = pickle.load(f)
        results = []
        for case in cases:
            emb, labels = case["ranks"][rank]
            e = torch.tensor(emb, dtype=case.get("dtype", torch.float64), requires_grad=True)
            before = e.detach().clone()
            lab = torch.from_numpy(labels)
            gen = torch.Generator().manual_seed(case["seed"] if rank == 0 else case["seed"] + 1000 + rank)
            loss = ht.hierarchy_triplet_loss(e, lab, case["h"], sampling=case["sampling"],
                                             max_per_class=case["max_per_class"], generator=gen,
                                             gather_across_ranks=True)
            loss.backward()
            assert e.grad is not None  # connected even without local triplets
            assert torch.equal(e.detach(), before) and torch.equal(lab, torch.from_numpy(labels))
            assert loss.dtype == (torch.float64 if e.dtype == torch.float64 else torch.float32)
            results.append((loss.item(), e.grad.movedim(1, -1).reshape(-1, emb.shape[1]).double().numpy()))
        # An explicit process group (here both ranks again) gives the same as the default group.
        emb, labels = cases[0]["ranks"][rank]
        group = dist.new_group([0, 1])
        again = ht.HierarchyTripletLoss(cases[0]["h"], sampling=cases[0]["sampling"], process_group=group,
                                        gather_across_ranks=True)(torch.tensor(emb), torch.from_numpy(labels))
        results.append((again.item(), None))
        # Disagreeing ranks raise on every rank instead of hanging.
        h = cases[0]["h"]
        emb, labels = cases[0]["ranks"][rank]
        errors = []
        for kw in (dict(C=emb.shape[1] + rank), dict(max_per_class=7 + rank),
                   dict(h=presets.cityscapes() if rank else presets.pascal_person_part())):
            e = torch.zeros(emb.shape[0], kw.get("C", emb.shape[1]), *emb.shape[2:])
            hh = kw.get("h", h)
            lab = torch.zeros(labels.shape, dtype=torch.int64)
            try:
                ht.hierarchy_triplet_loss(e, lab, hh, max_per_class=kw.get("max_per_class", 3),
                                          gather_across_ranks=True)
                errors.append("")
            except RuntimeError as exc:
                errors.append(str(exc))
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump((results, errors), f)
    finally:
        dist.destroy_process_group()


def _run_gather(cases, tmp_path):
    case_file = tmp_path / "cases.pkl"
    case_file.write_bytes(pickle.dumps(cases))
    spawn_workers(_gather_worker, str(case_file), str(tmp_path), timeout_s=TIMEOUT_S)
    return [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def _check_gathered(cases, out):
    for k, case in enumerate(cases):
        want, want_grad = _single_process(case)
        tol = dict(rel=1e-12, abs=1e-12) if "dtype" not in case else dict(rel=1e-5, abs=1e-6)
        if case["sampling"] == "first":  # the independent loop reference
            emb, labels = global_arrangement(case)
            ref = oracle.triplet_loss_first(emb, labels, case["h"], max_per_class=case["max_per_class"])
            assert want == pytest.approx(ref, **tol)
        got = [out[r][0][k] for r in range(WORLD)]
        for value, _ in got:  # every rank holds the global value
            assert value == pytest.approx(want, **tol), (k, case["sampling"])
        grad = np.concatenate([g for _, g in got])
        np.testing.assert_allclose(grad, want_grad, rtol=tol["rel"] * 100, atol=tol["abs"], err_msg=f"case {k}")


@pytest.mark.distributed
def test_gathered_triplet_equals_single_process_on_global_batch(tmp_path):
    cases = fixed_cases()
    low = [dict(make_case(presets.cityscapes(), 31 + i, sampling, 4, min_side=3), dtype=dtype)
           for i, (sampling, dtype) in enumerate([("first", torch.float32), ("random", torch.float16)])]
    cases = cases[:-1] + low + cases[-1:]  # the no-triplet case stays last
    out = _run_gather(cases, tmp_path)
    _check_gathered(cases, out)
    values = [out[0][0][k][0] for k in range(len(cases))]
    assert [out[r][0][len(cases)][0] for r in range(WORLD)] == [values[0]] * WORLD  # explicit group
    assert values[-1] == 0.0 and all(v > 0 for v in values[:-1])  # the fixed cases have triplets
    # Gathering changes the value: rank 0 alone would see other triplets.
    alone = ht.hierarchy_triplet_loss(torch.tensor(cases[0]["ranks"][0][0]), torch.tensor(cases[0]["ranks"][0][1]),
                                      cases[0]["h"], sampling="first")
    assert alone.item() != pytest.approx(values[0])
    for r in range(WORLD):
        errors = out[r][1]
        assert "embedding width C" in errors[0]
        assert "max_per_class" in errors[1]
        assert "hierarchy" in errors[2]


@pytest.mark.distributed
@settings(max_examples=2, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(_random_cases(), min_size=6, max_size=6))
def test_gathered_triplet_random_hierarchies(cases, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gather")
    _check_gathered(cases, _run_gather(cases, tmp))


def test_gather_without_process_group_is_the_local_loss():
    h = presets.cityscapes()
    case = make_case(h, 11, "random", 4)
    emb, labels = case["ranks"][0]
    run = lambda **kw: ht.hierarchy_triplet_loss(  # noqa: E731
        torch.tensor(emb), torch.from_numpy(labels), h, generator=torch.Generator().manual_seed(3), **kw)
    assert run(gather_across_ranks=True).item() == run().item()
    with pytest.raises(TypeError, match="gather_across_ranks"):
        run(gather_across_ranks=1)
    loss = ht.HSSNLoss(h, triplet_weight=1.0, gather_across_ranks=True)
    assert loss.gather_across_ranks and ht.HierarchyTripletLoss(h, gather_across_ranks=True).gather_across_ranks


# ---------------------------------------------------------------------------- DDP
class _TinyNet(torch.nn.Module):
    def __init__(self, num_nodes):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = torch.nn.Conv2d(6, num_nodes, 1)
        self.embed = torch.nn.Conv2d(6, 4, 1, stride=2)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return self.classifier(f), self.embed(f)


def _ddp_worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, port, timeout_s=TIMEOUT_S)
    try:
        h = presets.cityscapes()
        results = {}
        for gather in (False, True):
            torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
            model = DDP(_TinyNet(h.num_nodes), find_unused_parameters=False)
            criterion = ht.HSSNLoss(h, triplet_weight=0.5, sampling="first", gather_across_ranks=gather)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
            gen = torch.Generator().manual_seed(100 + rank)
            triplets = []
            for _ in range(3):
                x = torch.randn(2, 3, 8, 8, generator=gen)
                labels = torch.randint(0, h.num_leaves, (2, 8, 8), generator=gen)
                if rank == 1:  # no valid triplet: one class only, or (gathered) no valid pixel at all
                    labels = torch.full_like(labels, 255) if gather else torch.full_like(labels, 13)
                logits, emb = model(x)
                loss, parts = criterion(logits, labels, emb, return_parts=True)
                triplets.append(parts["triplet"].item())
                opt.zero_grad()
                loss.backward()
                opt.step()
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[gather] = (start.numpy(), params.numpy(), triplets)
        # Control: a loss that leaves the embedding head unused on every rank must fail under
        # find_unused_parameters=False (so the checks above can fail).
        model = DDP(_TinyNet(h.num_nodes), find_unused_parameters=False)
        error = ""
        try:
            for _ in range(2):
                logits, _ = model(torch.randn(1, 3, 4, 4))
                ht.HSSNLoss(h)(logits, torch.zeros(1, 4, 4, dtype=torch.int64)).backward()
        except RuntimeError as exc:
            error = str(exc)
        results["control"] = error
        with open(f"{out_dir}/ddp{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_hssn_loss_under_ddp_with_a_rank_without_triplets(tmp_path):
    spawn_workers(_ddp_worker, str(tmp_path), timeout_s=TIMEOUT_S)
    out = [pickle.loads((tmp_path / f"ddp{r}.pkl").read_bytes()) for r in range(WORLD)]
    for gather in (False, True):
        (start0, end0, trip0), (start1, end1, trip1) = out[0][gather], out[1][gather]
        np.testing.assert_array_equal(start0, start1)  # DDP broadcast rank 0's weights
        np.testing.assert_array_equal(end0, end1)  # and kept the ranks in sync
        assert not np.array_equal(start0, end0)  # the optimizer did step
        assert all(t > 0 for t in trip0)
        if gather:
            assert trip1 == trip0  # the same global value on both ranks
        else:
            assert trip1 == [0.0, 0.0, 0.0]  # rank 1 alone has no triplet
    for r in range(WORLD):
        assert "unused" in out[r]["control"] or "did not receive grad" in out[r]["control"] \
            or "finished reduction" in out[r]["control"], out[r]["control"]
