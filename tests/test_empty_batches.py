"""A batch of no matrices, shape (0, n, m), as a batched caller may hold one
(a model whose number of heads or layers is a setting, set to 0; the last,
empty, group of a split): every optimizer front end steps it as an empty
array and steps the other parameters beside it as it would without it.
Before, the drift check's largest estimate (``max`` of no estimates),
``mark_unitary``'s largest unitarity error and the capturable step's
finiteness flag (``aminmax``) raised the library's own reduction errors.
``randomized_svd`` and ``project_unitary`` of empty batches are tested with
those functions."""

import numpy as np
import pytest
from _helpers import haar, random_matrix, unitarity

from unitary_lr.optim import ProjUNN

N = 6


@pytest.mark.parametrize("base", ["rmsprop", "adam", "sgd"])
def test_framework_free_optimizer(backend, dtype, rng, base):
    empty = backend.asarray(np.zeros((0, N, N), dtype))
    W = backend.asarray(haar(rng, N, dtype, (2,)))
    gradients = random_matrix(rng, (3, 2, N, N), dtype)
    together = ProjUNN(0.05, base=base, rank=2, seed=1, drift_check_every=1)
    alone = ProjUNN(0.05, base=base, rank=2, seed=1, drift_check_every=1)
    V = W
    for G in gradients:
        empty = together.step(empty, backend.asarray(np.zeros((0, N, N), dtype)), key="empty")
        W = together.step(W, backend.asarray(G), key="full")
        V = alone.step(V, backend.asarray(G), key="full")
    assert tuple(empty.shape) == (0, N, N) and empty.dtype == backend.dtype(dtype)
    # an empty batch draws no random numbers: the full matrices step as they do alone
    np.testing.assert_array_equal(backend.to_numpy(W), backend.to_numpy(V))
    bound = 1e-12 if dtype in ("float64", "complex128") else 1e-5
    assert np.all(unitarity(backend.to_numpy(W)) < bound)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_optax_update(rng, jit):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from unitary_lr.optax import projunn

    params = {"empty": jnp.zeros((0, N, N), dtype=jnp.float32), "full": jnp.asarray(haar(rng, N, "float32", (2,))),
              "bias": jnp.ones(3, dtype=jnp.float32)}
    tx = projunn(0.05, unitary={"empty": True, "full": True, "bias": False}, rank=2, drift_check_every=1)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for G in random_matrix(rng, (3, 2, N, N), "float32"):
        grads = {"empty": jnp.zeros((0, N, N), dtype=jnp.float32), "full": jnp.asarray(G),
                 "bias": jnp.ones(3, dtype=jnp.float32)}
        updates, state = update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    assert params["empty"].shape == (0, N, N) and params["empty"].dtype == jnp.float32
    assert np.all(unitarity(np.asarray(params["full"])) < 1e-5)
    assert not np.allclose(np.asarray(params["bias"]), 1.0)


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("base", ["rmsprop", "adam", "sgd"])
def test_torch_optimizer(rng, capturable, dtype, base):
    torch = pytest.importorskip("torch")
    from unitary_lr.torch import ProjUNN as TorchProjUNN
    from unitary_lr.torch import is_unitary, mark_unitary

    tdtype = getattr(torch, dtype)
    empty = torch.nn.Parameter(torch.zeros(0, N, N, dtype=tdtype))
    mark_unitary(empty)  # checks W^H W = I of no matrices
    assert is_unitary(empty)
    projected = torch.nn.Parameter(torch.zeros(0, N, N, dtype=tdtype))
    mark_unitary(projected, project=True)
    full = torch.nn.Parameter(torch.asarray(haar(rng, N, dtype, (2,))))
    mark_unitary(full)
    twin = torch.nn.Parameter(full.detach().clone())
    mark_unitary(twin)
    # each parameter's sketches come from a stream of its own, seeded by its
    # place in the group: the full one first in both optimizers
    together = TorchProjUNN([full, empty], lr=0.05, base=base, rank=2, drift_check_every=1, seed=3,
                            capturable=capturable)
    alone = TorchProjUNN([twin], lr=0.05, base=base, rank=2, drift_check_every=1, seed=3, capturable=capturable)
    for step, G in enumerate(random_matrix(rng, (3, 2, N, N), dtype)):
        empty.grad = torch.zeros(0, N, N, dtype=tdtype)
        full.grad, twin.grad = torch.asarray(G), torch.asarray(G)
        for opt in (together, alone):
            torch.manual_seed(step)  # a capturable step draws its sketches from torch's generator
            opt.step()
    assert empty.shape == (0, N, N)
    W = full.detach().numpy()
    assert np.all(unitarity(W) < 1e-5)
    np.testing.assert_allclose(W, twin.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("shape", [(N, 3), (3, N), (N, N)])
@pytest.mark.parametrize("batch", [(0,), (2, 0)])
def test_transports_and_steps_of_an_empty_batch(backend, dtype, shape, batch):
    """A rectangular W's transport checked its largest entry with a maximum
    over no entries (NumPy's, JAX's and the standard's ValueError, PyTorch's
    RuntimeError); square ones and the low-rank polar factor gave the empty
    result."""
    import unitary_lr as ul

    W = backend.asarray(np.zeros((*batch, *shape)), dtype=dtype)
    a = b = backend.asarray(np.zeros((*batch, shape[0], 1)), dtype=dtype)
    G = backend.asarray(np.zeros((*batch, *shape)), dtype=dtype)
    for result in (ul.exp_transport(W, a, b, t=0.5), ul.cayley_transport(W, a, b, t=0.5),
                   ul.projunn_step(W, G, lr=0.1, rank=1, rng=0), ul.tangent_project(W, G)):
        assert tuple(result.shape) == (*batch, *shape)
        assert backend.to_numpy(result).dtype == np.dtype(dtype)
