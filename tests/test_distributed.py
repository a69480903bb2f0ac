"""DistributedDataParallel (gloo, CPU): two replicas stay bit-identical, because
their sketches come from the same seed stream, and match one process that
trains on the whole global batch."""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
pytest.importorskip("torch.distributed", reason="this PyTorch build has no torch.distributed")

import _ddp_worker  # noqa: E402

from unitary_lr.torch import ProjUNN  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_ddp_replicas_identical_and_equal_to_single_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker.worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    single = _ddp_worker.train(net := _ddp_worker.build(), net)
    # the mean of two half-batch gradients equals the full-batch gradient up to rounding
    _replicas_trained_as(tmp_path, single, _ddp_worker.build().state_dict(), atol=1e-13)


def _replicas_trained_as(tmp_path, single, initial, *, atol):
    """The two replicas' saved states are identical, equal to ``single`` to
    ``atol``, trained away from ``initial``, and the recurrent matrix unitary."""
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"replicas differ in {name}"
        torch.testing.assert_close(value, single[name], rtol=0, atol=atol)
        assert (value - initial[name]).abs().max() > 1e-3, f"{name} did not train"
    W = rank0["rnn.weight_hh"]
    assert torch.linalg.matrix_norm(W.mH @ W - torch.eye(W.shape[-1], dtype=W.dtype)) < 1e-12


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_zero_redundancy_optimizer_shards_projunn_and_matches_one_process(tmp_path):
    """torch.distributed.optim.ZeroRedundancyOptimizer with
    ``optimizer_class=ProjUNN``: it builds each rank's ProjUNN from whole
    parameter groups holding every option (which ProjUNN's checks must let
    through), each rank steps its share, and the replicas end identical and
    equal, to rounding, to one ProjUNN in one process on the global batch."""
    torch.multiprocessing.spawn(_ddp_worker.zero_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    net = _ddp_worker.build(complex_=False)  # ZeroRedundancyOptimizer takes parameters of one dtype
    single = _ddp_worker.train(net, net, make_optimizer=lambda model: ProjUNN(_ddp_worker.explicit_groups(model),
                                                                              **_ddp_worker.ZERO_OPTIONS))
    _replicas_trained_as(tmp_path, single, _ddp_worker.build(complex_=False).state_dict(), atol=1e-12)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_seed_none_warns_in_a_distributed_job(tmp_path):
    # ranks seeded base + rank drew other sketch seeds: the replicas drifted
    # apart without a word (7e-3 after 5 steps)
    torch.multiprocessing.spawn(_ddp_worker.seed_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"seed{rank}.pt") for rank in range(2)]
    for result in results:
        assert len(result["warnings"]) == 2, result["warnings"]
        assert result["warnings"][0].startswith("ProjUNN(seed=None) in a torch.distributed job draws its sketch seed")
        assert result["warnings"][1].startswith("projunn_retraction(seed=None) in a torch.distributed job")
    assert torch.equal(results[0]["W"], results[1]["W"])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_a_weight_one_rank_loads_and_broadcasts_leaves_the_replicas_identical(tmp_path):
    """The check of a weight written by something else than the optimizer
    reads the rank's own version counter, which a broadcast does not move:
    rank 0 re-projected the weight it loaded, rank 1 did not, and the
    replicas ended 1.5e-4 apart. In a job of several processes the checks
    follow the step count only, alike on every rank."""
    torch.multiprocessing.spawn(_ddp_worker.broadcast_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    results = [torch.load(tmp_path / f"broadcast{rank}.pt") for rank in range(2)]
    for how in ("ProjUNN", "retraction"):
        (W0, count0), (W1, count1) = results[0][how], results[1][how]
        assert torch.equal(W0, W1), how
        assert count0 == count1, how
