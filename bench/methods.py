"""The attribution methods of the LDS benchmark, each tuned then run on shared weights.

Every method gets a :class:`Context` (the trained model, the data, the query
split and the ground truth of the tuning queries) and returns one or more
:class:`Result` rows: scores of the report queries against every training
example, the chosen hyperparameters with the tuning grid, and its costs.

Scores are for the margin measurement. For the -loss target the benchmark
reuses them: ``grad(-CE) = sigmoid(-margin) grad(margin)`` for softmax
classification, so for a single model every method's -loss attribution is its
margin attribution times a positive per-query factor, which neither LDS
(Spearman per query) nor LOO (Pearson per query) sees.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import jaxattr
from bench.common import Clock, take, timed
from jaxattr import baselines, evaluate

# Context and results --------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every method sees.

    Attributes:
      task: ``jaxattr.classification(apply)``.
      params: the trained weights every method attributes.
      train: ``(x, y)`` training examples.
      queries: ``(x, y)`` all queries; ``tune`` and ``report`` index them.
      weights: ``(num_subsets, num_train)`` LDS subsets.
      truth: :class:`jaxattr.evaluate.Measurements` of the LDS subsets.
      key: root key of the methods' randomness.
      config: the benchmark configuration (a ``bench.lds.Config``).
      trained: the ``bench.common.Trained`` run behind ``params``.
      ensemble: list of half-data models for TRAK-M, with their training time.
      lam_max: top eigenvalue of the margin Gauss-Newton curvature (set by the
        post-hoc method; scales the influence-function damping grids).
      cache: results shared between methods (featurised TRAK models, the
        damping IF-CG chose).
    """

    task: jaxattr.Task
    params: Any
    train: tuple
    queries: tuple
    tune: np.ndarray
    report: np.ndarray
    weights: np.ndarray
    truth: evaluate.Measurements
    key: jax.Array
    config: Any
    trained: Any = None
    ensemble: tuple = ((), 0.0)
    lam_max: float | None = None
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train[1])

    def tune_lds(self, scores) -> float:
        """LDS (margin, seed-averaged) of tuning-query scores ``(num_tune, n)``."""
        actual = self.truth.margin[:, :, self.tune]
        return float(evaluate.lds(np.asarray(scores), self.weights, actual).mean)


@dataclasses.dataclass
class Result:
    """One row of the benchmark table.

    Attributes:
      name: the method, as printed.
      hparams: the hyperparameters used.
      scores: ``(num_rows, num_train)`` margin scores of report queries
        ``rows`` (indices into ``Context.queries``).
      rows: which report queries were scored (all, unless a method is too slow).
      prep: seconds of ``simulation``, ``featurisation`` and ``training``.
      ms_per_query: wall-clock milliseconds to score one query against all
        training examples, amortised over the report queries.
      bytes_per_example: bytes stored per training example.
      grid: ``[(hparams, tuning LDS), ...]``.
      note: anything a reader of the table must know.
      self_influence: how to get ``(num_train,)`` self-influence on another
        context (the noisy-label run), or None when infeasible.
    """

    name: str
    hparams: dict
    scores: np.ndarray
    rows: np.ndarray
    prep: dict
    ms_per_query: float
    bytes_per_example: int
    grid: list = dataclasses.field(default_factory=list)
    note: str = ""
    self_influence: Any = None
    extra: dict = dataclasses.field(default_factory=dict)


def pick(grid: list) -> dict:
    """The hyperparameters with the best tuning LDS (the first among ties)."""
    return max(grid, key=lambda item: item[1])[0]


def time_scores(score_fn, queries: tuple, warm: bool = True) -> tuple:
    """``(scores, ms_per_query)`` of ``score_fn(queries)``.

    With ``warm`` a first, untimed call compiles every kernel (and the slicing
    and padding of query chunks) that the timed call then reuses.
    """
    if warm:
        jax.block_until_ready(score_fn(queries))
    scores, seconds = timed(score_fn, queries)
    return np.asarray(scores), 1000.0 * seconds / len(queries[1])


def sketch_bytes(sketch) -> int:
    return int(sketch.bytes_per_example())


def feature_bytes(scorer: baselines.FeatureScorer) -> int:
    feats = scorer.train_features
    return int(
        feats.shape[1] * feats.dtype.itemsize + scorer.train_scale.dtype.itemsize
    )


# jaxattr post-hoc ----------------------------------------------------------

POSTHOC_DEFAULT = {"horizon": 300, "damping": 1e-3}


def posthoc(ctx: Context) -> list:
    """jaxattr post-hoc simulation: documented defaults and the tuned setting.

    The eigen-decomposition of the default curvature is computed once; the grid
    is scored through its closed form (:class:`_ClosedForm`, checked against
    ``jaxattr.simulate``), and the reported rows come from ``jaxattr.simulate``
    and ``jaxattr.scorer`` themselves.
    """
    clock = Clock()
    basis = clock("eigenbasis", _basis, ctx.task, ctx.params, ctx.train, ctx.key)
    ctx.lam_max = float(basis.values[0])
    closed = clock("tuning", _ClosedForm, ctx, basis)
    grid = [(hp, ctx.tune_lds(closed.scores(hp))) for hp in posthoc_grid(ctx.config)]
    best = pick(grid)
    rows = []
    for label, hp in (("defaults", POSTHOC_DEFAULT), ("tuned", best)):
        row = _posthoc_row(ctx, basis, hp, clock.seconds["eigenbasis"])
        row.name, row.grid = f"jaxattr post-hoc ({label})", grid
        row.extra["closed_form_vs_simulate"] = _agreement(ctx, closed, hp, row)
        rows.append(row)
    return rows


def posthoc_grid(config) -> list:
    return [
        {"horizon": h, "damping": d}
        for h in config.posthoc_horizons
        for d in config.posthoc_dampings
    ]


def _basis(task, params, train, key):
    curvature = jaxattr.default_curvature(task, len(train[1]))
    return jaxattr.eigenbasis(curvature, params, train, key)


def _simulate(ctx: Context, curvature, hp: dict, params=None, train=None):
    return jaxattr.simulate(
        ctx.task,
        ctx.params if params is None else params,
        ctx.train if train is None else train,
        key=ctx.key,
        horizon=hp["horizon"],
        damping=jaxattr.Relative(hp["damping"]),
        curvature=curvature,
    )


def _posthoc_row(ctx: Context, basis, hp: dict, basis_s: float) -> Result:
    sketch, sim_s = timed(_simulate, ctx, basis, hp)
    sc = jaxattr.scorer(ctx.task.margin, ctx.params, sketch)
    scores, ms = time_scores(sc, take(ctx.queries, ctx.report))
    return Result(
        name="",
        hparams=dict(hp, curvature="lowrank margin-GGN, all training examples"),
        scores=scores,
        rows=ctx.report,
        prep={"simulation": basis_s + sim_s},
        ms_per_query=ms,
        bytes_per_example=sketch_bytes(sketch),
        note="readout: jvp, dense sketch",
        self_influence=_posthoc_self,
    )


def _posthoc_self(ctx: Context, hp: dict) -> np.ndarray:
    basis = _basis(ctx.task, ctx.params, ctx.train, ctx.key)
    sketch = _simulate(ctx, basis, hp)
    sc = jaxattr.scorer(ctx.task.margin, ctx.params, sketch)
    return np.asarray(sc.self_influence(ctx.train))


def _agreement(ctx: Context, closed, hp: dict, row: Result) -> float:
    """Pearson correlation of closed-form and simulated scores on 8 report queries."""
    mine = closed.scores(hp, take(ctx.queries, ctx.report[:8]))
    return float(np.corrcoef(np.ravel(mine), np.ravel(row.scores[:8]))[0, 1])


class _ClosedForm:
    """Scores of the post-hoc recursion on an eigenbasis, for any horizon and damping.

    With eigenpairs ``(V, s)`` the response is ``r_b = -(phi0 g_b + V^T (phi(s) -
    phi0) V g_b)`` (``phi`` the horizon filter of ``jaxattr.simulate``), so a
    query's scores need only ``V grad m_q``, ``V g_b`` and ``grad m_q . g_b``;
    they are computed once and every grid point costs a product.
    """

    def __init__(self, ctx: Context, basis):
        self.ctx, self.basis = ctx, basis
        vq = self._query_grads(take(ctx.queries, ctx.tune))
        coef_b, dots = [], []
        for g in self._train_grads():
            coef_b.append(g @ basis.vectors.T)
            dots.append(vq @ g.T)
        self.coef_b = jnp.concatenate(coef_b)
        self._tune = (vq @ basis.vectors.T, jnp.concatenate(dots, axis=1))

    def _query_grads(self, queries):
        return _flat_grads(self.ctx.task.margin, self.ctx.params, queries)

    def _train_grads(self, chunk: int = 500):
        for start in range(0, self.ctx.num_train, chunk):
            rows = take(self.ctx.train, slice(start, start + chunk))
            yield _flat_grads(self.ctx.task.loss, self.ctx.params, rows)

    def _parts(self, queries):
        vq = self._query_grads(queries)
        dots = jnp.concatenate([vq @ g.T for g in self._train_grads()], axis=1)
        return vq @ self.basis.vectors.T, dots

    def scores(self, hp: dict, queries=None) -> np.ndarray:
        """``(num_queries, n)`` scores; the tuning queries when ``queries`` is None."""
        coef_q, dots = self._tune if queries is None else self._parts(queries)
        lam_max = float(self.basis.values[0])
        damping = hp["damping"] * lam_max
        step = 1.0 / (lam_max + damping + 1e-30)
        phi = _filter(self.basis.values, hp["horizon"], damping, step)
        phi0 = _filter(jnp.zeros(()), hp["horizon"], damping, step)
        return np.asarray(-(phi0 * dots + (coef_q * (phi - phi0)) @ self.coef_b.T))


def _filter(values, horizon, damping, step):
    from jaxattr._lowrank import horizon_filter  # the filter simulate uses

    return horizon_filter(values, horizon, damping, step)


@functools.partial(jax.jit, static_argnums=0)
def _flat_grads(fn, params, data):
    one = lambda z: ravel_pytree(jax.grad(fn)(params, z))[0]
    return jax.lax.map(one, data, batch_size=100)


# jaxattr in-training ---------------------------------------------------------


def in_training(ctx: Context) -> list:
    """jaxattr in-training simulation, from the run that trained ``ctx.params``."""
    run, cfg = ctx.trained, ctx.config
    sc = jaxattr.scorer(ctx.task.margin, ctx.params, run.sketch)
    scores, ms = time_scores(sc, take(ctx.queries, ctx.report))
    overhead = run.sim_s - cfg.sim_epochs * run.plain_epoch_s
    hp = {"horizon": cfg.sim_horizon, "sim_epochs": cfg.sim_epochs}
    tune_scores = np.asarray(sc(take(ctx.queries, ctx.tune)))
    return [
        Result(
            name="jaxattr in-training",
            hparams=hp,
            scores=scores,
            rows=ctx.report,
            prep={"simulation": overhead},
            ms_per_query=ms,
            bytes_per_example=sketch_bytes(run.sketch),
            grid=[(hp, ctx.tune_lds(tune_scores))],
            note=(
                "not tuned (each horizon is a training run); readout jvp; "
                f"simulated epochs took {run.sim_s:.0f} s vs "
                f"{run.plain_epoch_s * cfg.sim_epochs:.2g} s plain"
            ),
            self_influence=_in_training_self,
        )
    ]


def _in_training_self(ctx: Context, hp: dict) -> np.ndarray:
    del hp
    sc = jaxattr.scorer(ctx.task.margin, ctx.params, ctx.trained.sketch)
    return np.asarray(sc.self_influence(ctx.train))


# TRAK, featurising each model once -------------------------------------------


@dataclasses.dataclass
class TrakModel:
    """One model of a TRAK ensemble, in its kernel's eigenbasis.

    With projected margin gradients ``Phi`` ``(n, d)``, the kernel inverse is
    applied through one eigen-decomposition, so any damping costs a product:
    ``tau(b, q) = sum_j train[b, j] query[q, j] / (s_j + lam)`` (times ``n /
    M`` and the ensemble's mean ``1 - p_b``). For ``d <= n`` the decomposition is
    ``Phi^T Phi = U diag(s) U^T``, ``train = Phi U`` and ``query = phi_q U``;
    for ``d > n`` it is ``Phi Phi^T = W diag(s) W^T``, ``train = W`` and
    ``query = W^T Phi phi_q``. This is :func:`jaxattr.baselines.trak`'s formula
    (same projections, from ``fold_in(key, m)``), rearranged.

    Attributes:
      train: ``(n, d')``.
      self_coef: ``(n, d')`` the query side of each training example.
      values: ``(d',)`` kernel eigenvalues ``s``.
      queries: ``(num_queries, d')`` query side of all queries.
      one_minus_p: ``(n,)``.
      query_s: seconds to featurise all queries (grads, projection, basis).
    """

    train: jax.Array
    self_coef: jax.Array
    values: jax.Array
    queries: jax.Array
    one_minus_p: jax.Array
    query_s: float


def featurise(task, params, train, queries, key, dim, clock: Clock) -> TrakModel:
    """Featurises one model for TRAK; projection ``fold_in``-keyed like baselines."""
    flat = ravel_pytree(params)[0]
    proj = None
    if dim is not None:
        proj = clock("featurisation", _projection, key, flat.size, dim, flat.dtype)
    phi = clock("featurisation", _project_grads, task.margin, params, train, proj)
    _project_grads(task.margin, params, queries, proj)  # compiles
    vq, query_s = timed(_project_grads, task.margin, params, queries, proj)
    n, d = phi.shape
    if d <= n:
        values, u = clock("featurisation", _eigh, phi.T @ phi)
        tr = phi @ u
        model = (tr, tr, values, vq @ u)
    else:
        values, w = clock("featurisation", _eigh, phi @ phi.T)
        qcoef, q2 = timed(lambda: (vq @ phi.T) @ w)
        query_s += q2
        model = (w, w * values, values, qcoef)
    omp = 1.0 - jax.nn.sigmoid(_margins_of(task, params, train))
    return TrakModel(*model, omp, query_s)


def _projection(key, num_params, dim, dtype):
    return baselines.projection_matrix(key, num_params, dim, dtype)


@functools.partial(jax.jit, static_argnums=0)
def _project_grads(fn, params, data, proj):
    def one_chunk(rows):
        g = jax.vmap(lambda z: ravel_pytree(jax.grad(fn)(params, z))[0])(rows)
        return g if proj is None else g @ proj

    n = len(data[1])
    chunk = min(250, n)
    count = -(-n // chunk)
    pad = count * chunk - n
    padded = jax.tree.map(
        lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), data
    )
    rows = jax.tree.map(lambda a: a.reshape((count, chunk) + a.shape[1:]), padded)
    out = jax.lax.map(one_chunk, rows)
    return out.reshape(count * chunk, -1)[:n]


@jax.jit
def _eigh(matrix):
    values, vectors = jnp.linalg.eigh(matrix)
    return jnp.maximum(values[::-1], 0.0), vectors[:, ::-1]


@functools.partial(jax.jit, static_argnums=0)
def _margins_of(task, params, data):
    return jax.vmap(task.margin, (None, 0))(params, data)


def inverse_values(values, damping: float):
    """``1 / (s + lam)``, ``lam = damping * s_max``; damping 0 is a pseudo-inverse."""
    top = values[0]
    if damping > 0:
        return 1.0 / (values + damping * top)
    tol = 10 * values.shape[0] * jnp.finfo(values.dtype).eps * top
    return jnp.where(values > tol, 1.0 / jnp.where(values > tol, values, 1.0), 0.0)


def trak_scores(models: list, damping: float, rows) -> np.ndarray:
    """TRAK scores ``(len(rows), n)`` of queries ``rows`` from featurised models."""
    n = models[0].train.shape[0]
    total = 0.0
    for m in models:
        total = (
            total + (m.queries[rows] * inverse_values(m.values, damping)) @ m.train.T
        )
    reweight = jnp.mean(jnp.stack([m.one_minus_p for m in models]), 0)
    return np.asarray(total * reweight * (n / len(models)))


def trak_self(models: list, damping: float) -> np.ndarray:
    n = models[0].train.shape[0]
    total = 0.0
    for m in models:
        inv = inverse_values(m.values, damping)
        total = total + jnp.sum(m.train * m.self_coef * inv, axis=1)
    reweight = jnp.mean(jnp.stack([m.one_minus_p for m in models]), 0)
    return np.asarray(total * reweight * (n / len(models)))


def _trak_rows(ctx, models, name, dim, prep, dampings, note="") -> list:
    """An undamped row and a damping-tuned row for one TRAK ensemble."""
    grid = [
        ({"damping": d}, ctx.tune_lds(trak_scores(models, d, ctx.tune)))
        for d in dampings
    ]
    rows = []
    for label, hp in (("undamped", {"damping": 0.0}), ("damped, tuned", pick(grid))):
        trak_scores(models, hp["damping"], ctx.report)  # compiles
        scores, product_s = timed(trak_scores, models, hp["damping"], ctx.report)
        query_s = sum(m.query_s for m in models) * len(ctx.report) / len(ctx.queries[1])
        width = models[0].train.shape[1] * len(models)
        rows.append(
            Result(
                name=f"{name}, {label}",
                hparams=dict(hp, proj_dim=dim, models=len(models)),
                scores=scores,
                rows=ctx.report,
                prep=dict(prep),
                ms_per_query=1000.0 * (query_s + product_s) / len(ctx.report),
                bytes_per_example=4 * width + 4,
                grid=grid,
                note=note,
                self_influence=functools.partial(
                    _trak_self_on, name=name, dim=dim, size=len(models)
                ),
            )
        )
    return rows


def trak_full(ctx: Context) -> list:
    """TRAK-1 on the full-data model, projected (k) and unprojected."""
    rows = []
    for dim in (ctx.config.full_proj_dim, None):
        clock = Clock()
        model = featurise(
            ctx.task,
            ctx.params,
            ctx.train,
            ctx.queries,
            jax.random.fold_in(ctx.key, 0),
            dim,
            clock,
        )
        label = "unprojected" if dim is None else f"k={dim}"
        rows += _trak_rows(
            ctx,
            [model],
            f"TRAK-1 full model, {label}",
            dim,
            {"featurisation": clock.seconds["featurisation"]},
            ctx.config.trak_dampings,
        )
    return rows


def trak_ensembles(ctx: Context) -> list:
    """TRAK-M for each M, on the first M half-data models (dattri's protocol)."""
    models_params, train_s = ctx.ensemble
    dim, sizes = ctx.config.ens_proj_dim, ctx.config.ensembles
    clock, models = Clock(), []
    for m, params in enumerate(models_params[: max(sizes)]):
        key = jax.random.fold_in(ctx.key, m)
        models.append(
            featurise(ctx.task, params, ctx.train, ctx.queries, key, dim, clock)
        )
    per_model = clock.seconds["featurisation"] / len(models)
    rows = []
    for size in sizes:
        prep = {
            "featurisation": per_model * size,
            "training": train_s * size / len(models_params),
        }
        rows += _trak_rows(
            ctx,
            models[:size],
            ensemble_name(size, dim),
            dim,
            prep,
            ctx.config.trak_dampings,
        )
    return rows


def ensemble_name(size: int, dim) -> str:
    """Row name of TRAK-``size`` on half-data models (without the damping)."""
    return f"TRAK-{size} half models, k={dim}"


def _trak_self_on(ctx: Context, hp: dict, name: str, dim, size: int) -> np.ndarray:
    """Self-influence of a TRAK ensemble rebuilt on another context's models."""
    full = name.startswith("TRAK-1 full model")
    params_list = [ctx.params] if full else list(ctx.ensemble[0][:size])
    models = []
    for m, params in enumerate(params_list):
        slot = ("full" if full else "half", m, dim)
        if slot not in ctx.cache:
            ctx.cache[slot] = featurise(
                ctx.task,
                params,
                ctx.train,
                take(ctx.queries, slice(0, 1)),
                jax.random.fold_in(ctx.key, m),
                dim,
                Clock(),
            )
        models.append(ctx.cache[slot])
    return trak_self(models, hp["damping"])


# Gradient dot product and influence functions ---------------------------------


def grad_dot(ctx: Context) -> list:
    sc = baselines.grad_dot(ctx.task, ctx.params, ctx.train)
    scores, ms = time_scores(sc, take(ctx.queries, ctx.report))
    tune = ctx.tune_lds(sc(take(ctx.queries, ctx.tune)))
    return [
        Result(
            name="gradient dot",
            hparams={},
            scores=scores,
            rows=ctx.report,
            prep={"featurisation": sum(sc.build_seconds.values())},
            ms_per_query=ms,
            bytes_per_example=feature_bytes(sc),
            grid=[({}, tune)],
            self_influence=_grad_dot_self,
        )
    ]


def _grad_dot_self(ctx: Context, hp: dict) -> np.ndarray:
    del hp
    sc = baselines.grad_dot(ctx.task, ctx.params, ctx.train)
    return np.asarray(sc.self_influence(ctx.train))


def influence_cg(ctx: Context) -> list:
    """Influence by conjugate gradient; damping tuned as a fraction of ``lam_max``."""
    cfg = ctx.config
    build = lambda d: baselines.influence_cg(
        ctx.task,
        ctx.params,
        ctx.train,
        damping=d * ctx.lam_max,
        max_iters=cfg.cg_iters,
        query_chunk=len(ctx.tune),
    )
    grid = [
        ({"damping": d}, ctx.tune_lds(build(d)(take(ctx.queries, ctx.tune))))
        for d in cfg.if_dampings
    ]
    hp = pick(grid)
    ctx.cache["cg_damping"] = hp["damping"]
    sc = build(hp["damping"])
    rows = ctx.report[: cfg.cg_queries] if cfg.cg_queries else ctx.report
    scores, ms = time_scores(sc, take(ctx.queries, rows), warm=False)
    note = f"CG {cfg.cg_iters} iterations on the damped GGN of all training examples"
    if len(rows) < len(ctx.report):
        note += f"; scored on the first {len(rows)} report queries only (cost)"
    return [
        Result(
            name="IF-CG",
            hparams=dict(hp, max_iters=cfg.cg_iters, lam_max=ctx.lam_max),
            scores=scores,
            rows=rows,
            prep={"featurisation": sum(sc.build_seconds.values())},
            ms_per_query=ms,
            bytes_per_example=feature_bytes(sc),
            grid=grid,
            note=note,
            self_influence=_cg_self if cfg.cg_self else None,
        )
    ]


def _cg_self(ctx: Context, hp: dict) -> np.ndarray:
    sc = baselines.influence_cg(
        ctx.task,
        ctx.params,
        ctx.train,
        damping=hp["damping"] * hp["lam_max"],
        max_iters=hp["max_iters"],
        query_chunk=256,
    )
    return np.asarray(sc.self_influence(ctx.train))


def influence_explicit(ctx: Context) -> list:
    """Influence by the explicit damped inverse of the Gauss-Newton matrix.

    It solves the same damped system as IF-CG, so it takes IF-CG's tuned
    damping rather than building the matrix once per grid point.
    """
    hp = dict(damping=ctx.cache["cg_damping"], lam_max=ctx.lam_max)
    sc = baselines.influence_explicit(
        ctx.task,
        ctx.params,
        ctx.train,
        damping=hp["damping"] * ctx.lam_max,
        curvature="ggn",
    )
    scores, ms = time_scores(sc, take(ctx.queries, ctx.report))
    tune = ctx.tune_lds(sc(take(ctx.queries, ctx.tune)))
    return [
        Result(
            name="IF explicit (GGN)",
            hparams=hp,
            scores=scores,
            rows=ctx.report,
            prep={"featurisation": sum(sc.build_seconds.values())},
            ms_per_query=ms,
            bytes_per_example=feature_bytes(sc),
            grid=[(hp, tune)],
            note="damping from IF-CG's tuning (the same damped system)",
            self_influence=_explicit_self,
        )
    ]


def _explicit_self(ctx: Context, hp: dict) -> np.ndarray:
    sc = baselines.influence_explicit(
        ctx.task,
        ctx.params,
        ctx.train,
        damping=hp["damping"] * hp["lam_max"],
        curvature="ggn",
    )
    return np.asarray(sc.self_influence(ctx.train))


def explicit_feasible(num_params: int) -> bool:
    """Whether a ``num_params^2`` float32 matrix fits comfortably (under 2 GiB)."""
    return 4 * num_params**2 < 2 * 2**30 and math.isfinite(num_params)
