"""jaxattr's baselines against reference implementations in PyTorch, same weights.

TRAK against ``traker`` (the TRAK authors' package) and the explicit influence
function against ``dattri``. Skipped unless ``torch`` and the package are
installed (``pip install jaxattr[peers]``). traker divides gradients by
``sqrt(num_params)`` and rescales its kernel inverse by an arbitrary constant,
so its damping ``lambda_reg`` is ours divided by ``num_params`` and the two
score matrices agree up to one positive factor. dattri's influence uses the
same sign and units as jaxattr.
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
try:
    import trak
    from trak import projectors
    from trak import utils as trak_utils
except ImportError:
    trak = None

needs_trak = pytest.mark.skipif(trak is None, reason="traker is not installed")

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


def _fixed_projector(matrix):
    """A traker projector that multiplies by ``matrix`` (in traker's flat order)."""

    class Fixed(projectors.NoOpProjector):
        def project(self, grads, model_id):
            if isinstance(grads, dict):
                grads = trak_utils.vectorize(grads, device="cpu")
            return grads @ torch.as_tensor(matrix)

    return Fixed(grad_dim=matrix.shape[0], proj_dim=matrix.shape[1], device="cpu")


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


def _to_jax(data):
    return jnp.asarray(data[0]), jnp.asarray(data[1], jnp.int32)


@needs_trak
@pytest.mark.parametrize("lambda_reg", [0.01, 0.1])
def test_unprojected_trak_matches_traker(tmp_path, lambda_reg):
    model = _torch_model()
    params = _jax_params(model)
    train, queries = _data(N, 1), _data(Q, 2)
    num_params = ravel_pytree(params)[0].size
    noop = projectors.NoOpProjector(grad_dim=num_params, proj_dim=0, device="cpu")
    theirs = _traker_scores(model, noop, train, queries, lambda_reg, tmp_path)
    task = jaxattr.classification(_apply)
    scorer = baselines.trak(
        task,
        [params],
        _to_jax(train),
        key=None,
        proj_dim=None,
        damping=lambda_reg * num_params,
    )
    _agree_up_to_scale(scorer(_to_jax(queries)), theirs, 1e-4)


@needs_trak
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
    projector = _fixed_projector(theirs_matrix)
    theirs = _traker_scores(model, projector, train, queries, 1e-3, tmp_path)
    scorer = baselines.trak(
        jaxattr.classification(_apply),
        [params],
        _to_jax(train),
        key=key,
        proj_dim=k,
        damping=1e-3 * num_params,
    )
    _agree_up_to_scale(scorer(_to_jax(queries)), theirs, 1e-4)


def test_explicit_influence_matches_dattri():
    pytest.importorskip("dattri")
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.task import AttributionTask

    model = _torch_model()
    params = _jax_params(model)
    train, queries = _data(N, 1), _data(Q, 2)

    def loss(torch_params, data):
        logits = torch.func.functional_call(model, torch_params, data[0])
        return torch.nn.functional.cross_entropy(logits, data[1])

    def loader(data):
        tensors = torch.utils.data.TensorDataset(*map(torch.as_tensor, data))
        return torch.utils.data.DataLoader(tensors, batch_size=len(data[1]))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorExplicit(task=task, device="cpu", regularization=0.1)
    attributor.cache(loader(train))
    theirs = attributor.attribute(loader(train), loader(queries)).detach().numpy().T
    ours_task = jaxattr.classification(_apply)
    scorer = baselines.influence_explicit(
        ours_task,
        params,
        _to_jax(train),
        damping=0.1,
        curvature="hessian",
        measure=ours_task.neg_loss,
    )
    ours = np.asarray(scorer(_to_jax(queries)))
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(ours).max())
