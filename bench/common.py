"""What every jaxattr benchmark shares: data, settings, training and timing.

The settings are those of DESIGN.md section 6 (after the dattri benchmark):
MNIST-MLP (784-128-64-10 ReLU, SGD lr 0.01 momentum 0.9, batch 64, 50 epochs)
and MNIST-LR (linear 784-10, SGD lr 0.01, batch 32, 20 epochs), on the first
training and test images of MNIST, normalised with mean 0.1307 and std 0.3081.
"""

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxattr
from jaxattr import evaluate
from jaxattr._demo import MLP  # the demo's model: one definition for both
from jaxattr.evaluate import _train as evaluate_train

REPO = Path(__file__).resolve().parent.parent
MNIST_ENV = "JAXATTR_MNIST"
MEAN, STD = 0.1307, 0.3081

# Data ---------------------------------------------------------------------


def mnist_path(path: str | None = None) -> Path | None:
    """The MNIST file: ``path``, else ``$JAXATTR_MNIST``, else ``../shared/data``.

    Returns None when the chosen file does not exist.
    """
    chosen = path or os.environ.get(MNIST_ENV) or REPO.parent / "shared/data/mnist.npz"
    chosen = Path(chosen)
    return chosen if chosen.exists() else None


def load_mnist(path, num_train: int, num_test: int) -> tuple:
    """The first ``num_train`` training and ``num_test`` test images, normalised.

    Returns:
      ``((x_train, y_train), (x_test, y_test))``: float32 ``(n, 784)`` inputs
      ``(x / 255 - 0.1307) / 0.3081`` and int32 labels.
    """
    with np.load(path) as d:
        train = _normalise(d["x_train"][:num_train], d["y_train"][:num_train])
        test = _normalise(d["x_test"][:num_test], d["y_test"][:num_test])
    return train, test


def _normalise(x: np.ndarray, y: np.ndarray) -> tuple:
    x = (x.reshape(len(x), -1).astype(np.float32) / 255.0 - MEAN) / STD
    return x.astype(np.float32), y.astype(np.int32)


# Models and settings --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """A model and its training recipe.

    Attributes:
      name: command-line name, e.g. ``"mnist-mlp"``.
      hidden: hidden widths (empty for a linear model).
      lr, momentum, batch_size, epochs: the SGD recipe.
    """

    name: str
    hidden: tuple
    lr: float
    momentum: float
    batch_size: int
    epochs: int

    @property
    def model(self) -> MLP:
        return MLP(self.hidden)

    def optimizer(self) -> optax.GradientTransformation:
        momentum = self.momentum or None
        return optax.sgd(self.lr, momentum=momentum)

    def describe(self) -> str:
        widths = "-".join(map(str, (784, *self.hidden, 10)))
        kind = "mlp relu" if self.hidden else "linear"
        return (
            f"{kind} {widths}; sgd lr {self.lr} momentum {self.momentum}; batch "
            f"{self.batch_size}; {self.epochs} epochs"
        )

    def train_setup(self, batching: str = "compact") -> evaluate.TrainSetup:
        """The :class:`jaxattr.evaluate.TrainSetup` that retrains this setting."""
        model = self.model
        return evaluate.TrainSetup(
            init_fn=lambda key: model.init(key, jnp.zeros(784)),
            apply_fn=model.apply,
            optimizer=self.optimizer(),
            epochs=self.epochs,
            batch_size=self.batch_size,
            description=self.describe(),
            batching=batching,
        )


SETTINGS = {
    "mnist-mlp": Setting("mnist-mlp", (128, 64), 0.01, 0.9, 64, 50),
    "mnist-lr": Setting("mnist-lr", (), 0.01, 0.0, 32, 20),
}


def num_params(params: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


# Training with in-training simulation --------------------------------------


@dataclasses.dataclass
class Trained:
    """One training run of the full training set.

    Attributes:
      params: final parameters.
      sketch: the in-training :class:`jaxattr.DenseSketch` (None if not simulated).
      plain_epoch_s: seconds per plain epoch (compilation excluded).
      sim_s: seconds of the simulated epochs.
      plain_run_s: estimated seconds of a whole plain run (epochs x plain epoch).
      checkpoints: ``{epoch: params}`` after each epoch asked for in ``keep_epochs``.
    """

    params: Any
    sketch: Any
    plain_epoch_s: float
    sim_s: float
    plain_run_s: float
    checkpoints: dict = dataclasses.field(default_factory=dict)


def train_full(
    setup: evaluate.TrainSetup,
    data: tuple,
    key: jax.Array,
    sim: jaxattr.InTraining | None,
    sim_epochs: int,
    keep_epochs: tuple = (),
) -> Trained:
    """Trains on all of ``data`` exactly as :func:`jaxattr.evaluate.train_model`.

    Same initialisation, data order and minibatches for the same ``key``, so the
    result is the full-set model of :func:`jaxattr.evaluate.retrain` with that
    key (up to float rounding); the last ``sim_epochs`` epochs run the
    in-training simulation ``sim``. Parameters after epoch ``e`` (counted from 1)
    are kept for every ``e`` in ``keep_epochs``.
    """
    n = len(data[1])
    init_key, order_key, _ = jax.random.split(key, 3)
    params = setup.init_fn(init_key)
    opt_state = setup.optimizer.init(params)
    steps = setup.steps_per_epoch(n)
    first_sim = setup.epochs - sim_epochs if sim is not None else setup.epochs
    weights = jnp.ones(n, jnp.float32)
    plain_times, state, sim_start, kept = [], None, None, {}
    sim_step = None if sim is None else jax.jit(sim.step, donate_argnums=0)
    for epoch in range(setup.epochs):
        idx, w = evaluate_train.epoch_batches(
            setup, weights, jax.random.fold_in(order_key, epoch), steps
        )
        if epoch < first_sim:
            start = time.perf_counter()
            params, opt_state = _plain_epoch(setup, params, opt_state, data, idx, w)
            jax.block_until_ready(params)
            plain_times.append(time.perf_counter() - start)
            if epoch + 1 in keep_epochs:
                kept[epoch + 1] = jax.tree.map(jnp.copy, params)
            continue
        if state is None:
            sim_start = time.perf_counter()
            state = sim.init(params, opt_state, n)
        params, opt_state, state = _sim_epoch(
            sim_step, state, params, opt_state, data, idx, w
        )
    sketch = None if sim is None else sim.finalize(state)
    jax.block_until_ready(params)
    sim_s = 0.0 if sim_start is None else time.perf_counter() - sim_start
    per_epoch = float(np.median(plain_times[1:] or plain_times or [0.0]))
    return Trained(params, sketch, per_epoch, sim_s, per_epoch * setup.epochs, kept)


def _sim_epoch(sim_step, state, params, opt_state, data, idx, w):
    idx, w = np.asarray(idx), np.asarray(w)
    for rows, weights in zip(idx, w, strict=True):
        ids = np.where(weights > 0, rows, -1).astype(np.int32)
        batch = (data[0][rows], data[1][rows])
        params, opt_state, state, _ = sim_step(state, params, opt_state, batch, ids)
    return params, opt_state, state


@functools.partial(jax.jit, static_argnums=0)
def _plain_epoch(setup, params, opt_state, data, idx, w):
    def step(carry, inputs):
        p, s = carry
        rows, weights = inputs
        batch = (data[0][rows], data[1][rows])
        grads = jax.grad(_weighted_loss)(p, setup.apply_fn, batch, weights)
        updates, s = setup.optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (params, opt_state), (idx, w))[0]


def _weighted_loss(params, apply_fn, batch, weights):
    logits = jax.vmap(apply_fn, (None, 0))(params, batch[0])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
    return jnp.sum(weights * losses) / jnp.maximum(jnp.sum(weights), 1.0)


# Timing and small helpers ---------------------------------------------------


class Clock:
    """Accumulates wall-clock seconds per named stage, blocking on jax results."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args, **kwargs) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        self.add(name, time.perf_counter() - start)
        return out

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def timed(fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    """``(result, seconds)`` of one call, blocking on jax results."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def take(data: tuple, rows) -> tuple:
    """Rows of an ``(x, y)`` pair."""
    return data[0][rows], data[1][rows]


def margins(task: jaxattr.Task, params, data: tuple) -> np.ndarray:
    """``(n,)`` margins of the examples of ``data``."""
    return np.asarray(_margins(task, params, data))


@functools.partial(jax.jit, static_argnums=0)
def _margins(task, params, data):
    return jax.vmap(task.margin, (None, 0))(params, data)


def accuracy(apply_fn, params, data: tuple) -> float:
    logits = jax.jit(jax.vmap(apply_fn, (None, 0)))(params, data[0])
    return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(data[1])))
