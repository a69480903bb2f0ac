"""DistributedDataParallel (gloo, CPU): two replicas stay bit-identical, because
their sketches come from the same seed stream, and match one process that
trains on the whole global batch."""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
pytest.importorskip("torch.distributed", reason="this PyTorch build has no torch.distributed")

import _ddp_worker  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this PyTorch build has no gloo backend")
def test_ddp_replicas_identical_and_equal_to_single_process(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker.worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = _ddp_worker.train(net := _ddp_worker.build(), net)
    initial = _ddp_worker.build().state_dict()
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"replicas differ in {name}"
        # the mean of two half-batch gradients equals the full-batch gradient up to rounding
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-13)
        assert (value - initial[name]).abs().max() > 1e-3, f"{name} did not train"
    W = rank0["rnn.weight_hh"]
    assert torch.linalg.matrix_norm(W.mH @ W - torch.eye(W.shape[-1], dtype=W.dtype)) < 1e-12
