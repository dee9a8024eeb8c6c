"""jaxattr's TRAK against the reference implementation (PyPI ``traker``), same weights.

Skipped unless ``torch`` and ``traker`` are installed (``pip install
jaxattr[peers]``). traker divides gradients by ``sqrt(num_params)`` and
rescales its kernel inverse by an arbitrary constant, so its damping
``lambda_reg`` is ours divided by ``num_params`` and the two score matrices
agree up to one positive factor.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxattr
from jaxattr import baselines

torch = pytest.importorskip("torch")
trak = pytest.importorskip("trak")
projectors = pytest.importorskip("trak.projectors")
trak_utils = pytest.importorskip("trak.utils")

N, Q, DIM, HIDDEN, CLASSES = 20, 6, 3, 4, 3


def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    )


def _jax_params(model):
    w = [p.detach().numpy() for p in model.parameters()]
    return {"w1": w[0].T, "b1": w[1], "w2": w[2].T, "b2": w[3]}


def _apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, rng.integers(0, CLASSES, size=n).astype(np.int64)


def _torch_order(model):
    """For each entry of jaxattr's flat parameters, its index in traker's flat order."""
    sizes = [p.numel() for p in model.parameters()]
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    shaped = [
        part.reshape(p.shape) for part, p in zip(parts, model.parameters(), strict=True)
    ]
    tree = {"w1": shaped[0].T, "b1": shaped[1], "w2": shaped[2].T, "b2": shaped[3]}
    return np.asarray(ravel_pytree(tree)[0])


class _FixedProjector(projectors.NoOpProjector):
    """A traker projector that multiplies by a given matrix (traker's flat order)."""

    def __init__(self, matrix, **kw):
        super().__init__(grad_dim=matrix.shape[0], proj_dim=matrix.shape[1], **kw)
        self.matrix = torch.as_tensor(matrix)

    def project(self, grads, model_id):
        if isinstance(grads, dict):
            grads = trak_utils.vectorize(grads, device="cpu")
        return grads @ self.matrix


def _traker_scores(model, projector, train, queries, lambda_reg, save_dir):
    traker = trak.TRAKer(
        model=model,
        task="image_classification",
        train_set_size=N,
        save_dir=str(save_dir),
        device="cpu",
        projector=projector,
        use_half_precision=False,
        lambda_reg=lambda_reg,
        logging_level=logging.ERROR,
    )
    to_torch = lambda d: (torch.as_tensor(d[0]), torch.as_tensor(d[1]))
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=to_torch(train), num_samples=N)
    traker.finalize_features()
    traker.start_scoring_checkpoint("q", model.state_dict(), model_id=0, num_targets=Q)
    traker.score(batch=to_torch(queries), num_samples=Q)
    return np.asarray(traker.finalize_scores(exp_name="q")).T  # (Q, N)


def _agree_up_to_scale(ours, theirs, tol):
    ours, theirs = np.ravel(ours), np.ravel(theirs)
    factor = np.dot(ours, theirs) / np.dot(theirs, theirs)
    assert factor > 0
    np.testing.assert_allclose(ours, factor * theirs, atol=tol * np.abs(ours).max())


@pytest.mark.parametrize("lambda_reg", [0.01, 0.1])
def test_unprojected_trak_matches_traker(tmp_path, lambda_reg):
    model = _torch_model()
    params = _jax_params(model)
    train, queries = _data(N, 1), _data(Q, 2)
    num_params = ravel_pytree(params)[0].size
    noop = projectors.NoOpProjector(grad_dim=num_params, proj_dim=0, device="cpu")
    theirs = _traker_scores(model, noop, train, queries, lambda_reg, tmp_path)
    task = jaxattr.classification(_apply)
    to_jax = lambda d: (jnp.asarray(d[0]), jnp.asarray(d[1], jnp.int32))
    scorer = baselines.trak(
        task,
        [params],
        to_jax(train),
        key=None,
        proj_dim=None,
        damping=lambda_reg * num_params,
    )
    _agree_up_to_scale(scorer(to_jax(queries)), theirs, 1e-4)


def test_projected_trak_matches_traker_with_the_same_projection(tmp_path):
    model = _torch_model()
    params = _jax_params(model)
    train, queries = _data(N, 1), _data(Q, 2)
    num_params, k, key = ravel_pytree(params)[0].size, 12, jax.random.PRNGKey(4)
    # jaxattr draws model m's projection from fold_in(key, m).
    ours = baselines.projection_matrix(
        jax.random.fold_in(key, 0), num_params, k, jnp.float32
    )
    theirs_matrix = np.zeros((num_params, k), np.float32)
    theirs_matrix[_torch_order(model)] = np.asarray(ours)
    projector = _FixedProjector(theirs_matrix, device="cpu")
    theirs = _traker_scores(model, projector, train, queries, 1e-3, tmp_path)
    to_jax = lambda d: (jnp.asarray(d[0]), jnp.asarray(d[1], jnp.int32))
    scorer = baselines.trak(
        jaxattr.classification(_apply),
        [params],
        to_jax(train),
        key=key,
        proj_dim=k,
        damping=1e-3 * num_params,
    )
    _agree_up_to_scale(scorer(to_jax(queries)), theirs, 1e-4)
