"""The ``jaxattr demo`` job: train an MLP with in-training simulation, then attribute.

One training run of a Flax MLP with optax simulates, during its last epochs,
how upweighting each training example moves the parameters; the forward-only
scorer then reads out, for test queries, which training examples helped or
harmed their margins. A plain run of the same training measures the cost.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, NamedTuple, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxattr
from jaxattr._data import Dataset, InputError
from jaxattr._progress import progress

HIDDEN = (128, 64)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (the command-line defaults).

    The defaults fit MNIST with 5,000 training examples in under five minutes
    on two CPU cores: plain training is cheap, while simulating one epoch costs
    about ``horizon * batch_size`` perturbation-steps per step.

    Attributes:
      epochs: training epochs in all.
      sim_epochs: the last ``sim_epochs`` epochs run the simulation.
      horizon: steps each perturbation is carried.
      batch_size: examples per step.
      lr: SGD learning rate.
      momentum: SGD momentum.
      seed: seeds the parameter initialisation and the data order.
      queries: test queries to show with their proponents and opponents.
      top_k: proponents and opponents shown per query.
      readout: ``"jvp"`` or ``"central-difference"``.
      show_progress: draw progress bars on stderr.
      out_png: path of the figure.
      json_path: path of the machine-readable results, or ``None``.
    """

    epochs: int = 50
    sim_epochs: int = 1
    horizon: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    seed: int = 0
    queries: int = 3
    top_k: int = 5
    readout: str = "jvp"
    show_progress: bool = True
    out_png: str = "jaxattr_demo.png"
    json_path: str | None = None


class MLP(nn.Module):
    """A ReLU multilayer perceptron on one flattened example."""

    hidden: tuple = HIDDEN
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class Setup(NamedTuple):
    """Everything both training runs share; the steps are compiled already."""

    apply: Any
    task: jaxattr.Task
    params: Any
    opt_state: Any
    plain_step: Any
    sim: jaxattr.InTraining
    sim_step: Any
    compile_s: float


class Run(NamedTuple):
    """The outcome of one training run."""

    params: Any
    sketch: jaxattr.DenseSketch | None
    seconds: float


# Setup and training -------------------------------------------------------


def build(config: DemoConfig, data: Dataset) -> Setup:
    """Model, optimizer, initial state and both compiled train steps."""
    model = MLP(HIDDEN, data.num_classes)
    params = model.init(jax.random.key(config.seed), jnp.zeros(data.num_features))
    task = jaxattr.classification(model.apply)
    optimizer = optax.sgd(config.lr, momentum=config.momentum)
    sim = jaxattr.in_training(
        task,
        optimizer,
        horizon=config.horizon,
        batch_size=config.batch_size,
        # Propagating all live perturbations at once was faster and leaner on
        # 2 cores than chunks of 128 to 640 (MNIST, horizon 20, batch 64).
        chunk_size=None,
    )
    opt_state = optimizer.init(params)
    start = time.perf_counter()
    plain, sim_step = _compile(
        _plain_step(task, optimizer), sim, params, opt_state, data, config
    )
    seconds = time.perf_counter() - start
    return Setup(model.apply, task, params, opt_state, plain, sim, sim_step, seconds)


def _compile(plain_step, sim, params, opt_state, data: Dataset, config: DemoConfig):
    """Compiles both steps ahead of time, so training times exclude compilation."""
    b, n = config.batch_size, len(data.x_train)
    x = jax.ShapeDtypeStruct((b, data.num_features), jnp.float32)
    ids = jax.ShapeDtypeStruct((b,), jnp.int32)
    batch = (x, jax.ShapeDtypeStruct((b,), jnp.int32))
    plain = jax.jit(plain_step).lower(params, opt_state, batch, ids).compile()
    state = jax.eval_shape(lambda: sim.init(params, opt_state, n))
    # Donating the simulation state lets XLA update its large buffers in place.
    sim_step = jax.jit(sim.step, donate_argnums=0)
    sim_step = sim_step.lower(state, params, opt_state, batch, ids).compile()
    return plain, sim_step


def _plain_step(task: jaxattr.Task, optimizer):
    """The train step ``in_training`` takes: mean loss over the non-padding rows."""

    def step(params, opt_state, batch, ids):
        weights = (ids >= 0).astype(jnp.float32)

        def mean_loss(p):
            losses = jax.vmap(task.loss, (None, 0))(p, batch)
            return jnp.sum(weights * losses) / jnp.maximum(weights.sum(), 1.0)

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _schedule(config: DemoConfig, num_train: int):
    """Yields ``(epoch, rows, ids)`` per step; a short last batch is padded, id -1."""
    rng = np.random.default_rng(config.seed)
    pad = -num_train % config.batch_size
    for epoch in range(config.epochs):
        order = np.concatenate([rng.permutation(num_train), np.full(pad, -1)])
        for ids in order.astype(np.int32).reshape(-1, config.batch_size):
            yield epoch, np.maximum(ids, 0), ids


def steps_per_epoch(config: DemoConfig, num_train: int) -> int:
    return -(-num_train // config.batch_size)


def train(setup: Setup, config: DemoConfig, data: Dataset, simulate: bool) -> Run:
    """One training run, simulating during the last ``sim_epochs`` if ``simulate``."""
    n = len(data.x_train)
    first_sim = config.epochs - config.sim_epochs if simulate else config.epochs
    total = config.epochs * steps_per_epoch(config, n)
    desc = "training + simulation" if simulate else "plain training"
    steps = progress(_schedule(config, n), total, desc, config.show_progress)
    carry = (setup.params, setup.opt_state, None)
    start = time.perf_counter()
    for epoch, rows, ids in steps:
        batch = (data.x_train[rows], data.y_train[rows])
        carry = _step(setup, carry, batch, ids, epoch >= first_sim, n)
    params, _, state = carry
    sketch = _finalize(setup.sim, state) if simulate else None
    jax.block_until_ready(params)
    return Run(params, sketch, time.perf_counter() - start)


def _step(setup: Setup, carry: tuple, batch, ids, simulate: bool, n: int) -> tuple:
    """One train step, ``(params, opt_state, sim_state)`` in and out."""
    params, opt_state, state = carry
    if not simulate:
        params, opt_state, _ = setup.plain_step(params, opt_state, batch, ids)
        return params, opt_state, state
    if state is None:
        state = setup.sim.init(params, opt_state, n)
    params, opt_state, state, loss = setup.sim_step(
        state, params, opt_state, batch, ids
    )
    loss.block_until_ready()  # keeps the progress bar honest
    return params, opt_state, state


def _finalize(sim: jaxattr.InTraining, state) -> jaxattr.DenseSketch:
    try:
        return sim.finalize(state)
    except ValueError as err:
        raise InputError(
            f"The simulation failed: {err} Training probably diverged; try a smaller "
            "--lr."
        ) from None


# Checks before the long work ---------------------------------------------


def check_config(config: DemoConfig, data: Dataset) -> None:
    """Raises InputError for settings that do not fit the data or this machine."""
    n, q = len(data.x_train), len(data.x_test)
    if config.sim_epochs > config.epochs:
        raise InputError(
            f"--sim-epochs {config.sim_epochs} exceeds --epochs {config.epochs}; "
            "the simulated epochs are the last epochs of training."
        )
    if config.queries > q:
        raise InputError(
            f"--queries {config.queries} exceeds the {q} test examples; pass "
            f"--queries between 1 and {q}."
        )
    if config.top_k > n:
        raise InputError(
            f"--top-k {config.top_k} exceeds the {n} training examples; pass "
            f"--top-k between 1 and {n}."
        )
    _check_memory(config, data)


def num_params(data: Dataset) -> int:
    widths = (data.num_features, *HIDDEN, data.num_classes)
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _check_memory(config: DemoConfig, data: Dataset) -> None:
    """Refuses runs whose dense sketch and score matrix would not fit in memory."""
    n, q, p = len(data.x_train), len(data.x_test), num_params(data)
    slots = config.horizon * config.batch_size
    need = 4 * (n * p + 3 * slots * p + q * n)
    have = _physical_memory()
    if have is not None and need > 0.6 * have:
        raise InputError(
            f"This run needs about {need / 2**30:.1f} GiB (the dense sketch stores "
            f"{n} x {p} floats, the simulation {slots} live perturbations) but the "
            f"machine has {have / 2**30:.1f} GiB. Lower --num-train, --num-test, "
            "--horizon or --batch-size."
        )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Measurements ------------------------------------------------------------


def accuracy(apply, params, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of rows of ``x`` whose largest logit is the label."""
    logits = jax.jit(jax.vmap(apply, (None, 0)))(params, x)
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def max_difference(a, b) -> float:
    """Largest absolute difference between two parameter pytrees."""
    diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
    return float(max(jax.tree.leaves(diffs)))


def make_scorer(setup: Setup, config: DemoConfig, run: Run) -> jaxattr.Scorer:
    readout = (
        jaxattr.CentralDifference()
        if config.readout == "central-difference"
        else jaxattr.JVP()
    )
    return jaxattr.scorer(setup.task.margin, run.params, run.sketch, readout=readout)


def time_scoring(sc: jaxattr.Scorer, queries: tuple) -> tuple:
    """Scores every training example for every query; returns ``(scores, seconds)``.

    A first call on one query chunk compiles the kernel outside the timing.
    """
    warm = min(sc.query_chunk, len(queries[0]))
    jax.block_until_ready(sc((queries[0][:warm], queries[1][:warm])))
    start = time.perf_counter()
    scores = jax.block_until_ready(sc(queries))
    return np.asarray(scores), time.perf_counter() - start


def query_table(sc, setup, run, config, data) -> list:
    """The shown queries with their top proponents and opponents."""
    q = config.queries
    queries = (data.x_test[:q], data.y_test[:q])
    top = sc.top_k(queries, k=config.top_k)
    logits = jax.vmap(setup.apply, (None, 0))(run.params, queries[0])
    margins = jax.vmap(setup.task.margin, (None, 0))(run.params, queries)
    rows = []
    for i in range(q):
        rows.append(
            {
                "index": i,
                "label": int(data.y_test[i]),
                "predicted": int(np.argmax(logits[i])),
                "margin": float(margins[i]),
                "proponents": _entries(
                    top.proponents[i], top.proponent_scores[i], data
                ),
                "opponents": _entries(top.opponents[i], top.opponent_scores[i], data),
            }
        )
    return rows


def _entries(ids, scores, data: Dataset) -> list:
    return [
        {"index": int(i), "label": int(data.y_train[int(i)]), "score": float(s)}
        for i, s in zip(np.asarray(ids), np.asarray(scores), strict=True)
    ]


def self_influence_table(sc: jaxattr.Scorer, data: Dataset, top: int = 10) -> tuple:
    """The ``top`` training examples by self-influence, and the seconds it took."""
    start = time.perf_counter()
    values = np.asarray(sc.self_influence((data.x_train, data.y_train)))
    seconds = time.perf_counter() - start
    order = np.argsort(-values, kind="stable")[:top]
    rows = [
        {
            "rank": r + 1,
            "index": int(i),
            "label": int(data.y_train[i]),
            "score": float(values[i]),
        }
        for r, i in enumerate(order)
    ]
    return rows, seconds


# The job -----------------------------------------------------------------


def describe(config: DemoConfig, data: Dataset) -> dict:
    """The data and settings of a run, as reported before training starts."""
    n = len(data.x_train)
    widths = "-".join(str(w) for w in (data.num_features, *HIDDEN, data.num_classes))
    return {
        "data": {
            "name": data.name,
            "num_train": n,
            "num_test": len(data.x_test),
            "num_features": data.num_features,
            "num_classes": data.num_classes,
            "normalisation": data.normalisation,
        },
        "settings": {
            "model": f"MLP {widths} ReLU",
            "num_params": num_params(data),
            "optimizer": f"SGD lr {config.lr} momentum {config.momentum}",
            "epochs": config.epochs,
            "sim_epochs": config.sim_epochs,
            "first_sim_epoch": config.epochs - config.sim_epochs + 1,
            "horizon": config.horizon,
            "batch_size": config.batch_size,
            "steps_per_epoch": steps_per_epoch(config, n),
            "simulated_steps": config.sim_epochs * steps_per_epoch(config, n),
            "seed": config.seed,
            "readout": config.readout,
        },
    }


def run_demo(config: DemoConfig, data: Dataset, out: TextIO | None = None) -> dict:
    """Runs the whole demo, prints its report to ``out`` and returns it as a dict.

    Args:
      config: the settings.
      data: the dataset.
      out: stream for the report (default ``sys.stdout``; progress bars go to
        stderr).

    Returns:
      Every printed number, nested as in the JSON file.

    Raises:
      InputError: the settings do not fit the data, or training diverged.
    """
    start = time.perf_counter()
    out = sys.stdout if out is None else out
    check_config(config, data)
    report = describe(config, data)
    print(format_header(report), file=out, flush=True)
    setup = build(config, data)
    plain = train(setup, config, data, simulate=False)
    simulated = train(setup, config, data, simulate=True)
    report.update(measure(setup, config, data, plain, simulated))
    draw_figure(report, data, config.out_png)
    report["outputs"] = {"png": config.out_png, "json": config.json_path}
    report["wall_s"] = time.perf_counter() - start
    print(format_results(report), file=out, flush=True)
    if config.json_path is not None:
        write_json(report, config.json_path)
    return report


def measure(setup, config, data, plain: Run, simulated: Run) -> dict:
    """Accuracy, costs, proponents/opponents and self-influence of a finished run."""
    _check_finite(simulated.params)
    sc = make_scorer(setup, config, simulated)
    scores, seconds = time_scoring(sc, (data.x_test, data.y_test))
    self_rows, self_seconds = self_influence_table(sc, data)
    return {
        "test_accuracy": accuracy(
            setup.apply, simulated.params, data.x_test, data.y_test
        ),
        "train_accuracy": accuracy(
            setup.apply, simulated.params, data.x_train, data.y_train
        ),
        "param_diff_vs_plain": max_difference(plain.params, simulated.params),
        "timing": {
            "compile_s": setup.compile_s,
            "plain_train_s": plain.seconds,
            "sim_train_s": simulated.seconds,
            "sim_to_plain_ratio": simulated.seconds / plain.seconds,
            "scoring_s": seconds,
            "ms_per_query": 1000.0 * seconds / len(data.x_test),
            "self_influence_s": self_seconds,
        },
        "scores_shape": list(scores.shape),
        "sketch_bytes_per_example": simulated.sketch.bytes_per_example(),
        "queries": query_table(sc, setup, simulated, config, data),
        "self_influence": self_rows,
    }


def _check_finite(params) -> None:
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params)):
        raise InputError(
            "Training diverged: the parameters contain NaN or inf. Try a smaller --lr."
        )


# Output --------------------------------------------------------------------


def format_header(report: dict) -> str:
    d, s = report["data"], report["settings"]
    return "\n".join(
        [
            f"jaxattr demo: {d['name']}, {d['num_train']} training / {d['num_test']} "
            f"test examples, {d['num_features']} features, {d['num_classes']} classes",
            f"  normalisation: {d['normalisation']}",
            f"  model: {s['model']} ({s['num_params']:,} parameters), "
            f"{s['optimizer']}, batch {s['batch_size']}, {s['epochs']} epochs, "
            f"seed {s['seed']}",
            f"  simulation: epochs {s['first_sim_epoch']}-{s['epochs']} "
            f"(last {s['sim_epochs']}, {s['simulated_steps']} steps), horizon "
            f"{s['horizon']}; readout {s['readout']}",
        ]
    )


def format_results(report: dict) -> str:
    t = report["timing"]
    lines = [
        f"test accuracy: {report['test_accuracy']:.4f} (train "
        f"{report['train_accuracy']:.4f})",
        f"plain training: {t['plain_train_s']:.1f} s; training with simulation: "
        f"{t['sim_train_s']:.1f} s = {t['sim_to_plain_ratio']:.1f}x plain "
        f"(parameters differ from the plain run by at most "
        f"{report['param_diff_vs_plain']:.2g}); compiling both steps took "
        f"{t['compile_s']:.1f} s",
        f"scoring: {report['scores_shape'][0]} queries x {report['scores_shape'][1]} "
        f"training examples in {t['scoring_s']:.2f} s = {t['ms_per_query']:.2f} "
        f"ms/query; self-influence of all training examples "
        f"{t['self_influence_s']:.2f} s (with compilation)",
        f"sketch: {report['sketch_bytes_per_example']:,} bytes per training example",
    ]
    for row in report["queries"]:
        lines += _format_query(row)
    lines.append("highest self-influence (rank: index label score):")
    lines += [
        f"  {r['rank']:2d}: #{r['index']} label {r['label']} score {r['score']:.4g}"
        for r in report["self_influence"]
    ]
    lines.append(f"figure: {report['outputs']['png']}")
    lines.append(f"total wall time: {report['wall_s']:.1f} s")
    return "\n".join(lines)


def _format_query(row: dict) -> list:
    fmt = lambda e: f"#{e['index']} (label {e['label']}, {e['score']:+.4g})"
    return [
        f"query test #{row['index']}: label {row['label']}, predicted "
        f"{row['predicted']}, margin {row['margin']:.3f}",
        "  proponents: " + ", ".join(fmt(e) for e in row["proponents"]),
        "  opponents:  " + ", ".join(fmt(e) for e in row["opponents"]),
    ]


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def draw_figure(report: dict, data: Dataset, path: str) -> None:
    """Each shown query beside its top proponents and opponents, as images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["queries"]
    k = len(rows[0]["proponents"])
    fig = Figure(figsize=(1.25 * (2 * k + 1.6), 1.55 * len(rows) + 0.6))
    FigureCanvasAgg(fig)
    ratios = [1, 0.3] + [1] * k + [0.25] + [1] * k
    grid = fig.add_gridspec(len(rows), 2 * k + 3, width_ratios=ratios)
    for r, row in enumerate(rows):
        title = f"query #{row['index']}\nlabel {row['label']}, pred {row['predicted']}"
        _draw(fig.add_subplot(grid[r, 0]), data.x_test[row["index"]], data, title)
        for j, e in enumerate(row["proponents"] + row["opponents"]):
            ax = fig.add_subplot(grid[r, 2 + j + (j >= k)])
            title = f"#{e['index']} label {e['label']}\n{e['score']:+.3g}"
            _draw(ax, data.x_train[e["index"]], data, title, j < k)
    fig.suptitle(
        f"jaxattr demo ({data.name}): test queries, their top {k} proponents "
        "(green: raise the query's margin) and opponents (red: lower it)",
        fontsize=9,
    )
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


def _draw(
    ax, row: np.ndarray, data: Dataset, title: str, helps: bool | None = None
) -> None:
    """One example as an image; green title for a proponent, red for an opponent."""
    colour = "black" if helps is None else ("tab:green" if helps else "tab:red")
    image = row.reshape(data.image_shape)
    lo, hi = float(image.min()), float(image.max())
    ax.imshow(
        (image - lo) / max(hi - lo, 1e-12),
        cmap="gray_r",
        vmin=0,
        vmax=1,
        aspect="equal" if image.shape[0] > 1 else "auto",
    )
    ax.set_title(title, fontsize=7, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
