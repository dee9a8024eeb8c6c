"""What bench.sources and bench.sketches share: model, eigenbasis, truth, timing.

Both attribute the full-data model of bench.lds (same data, keys and recipe,
trained without the in-training simulation, which leaves the weights as they
are), simulate from one eigen-decomposition of the default curvature, read the
LDS ground truth from bench.lds's retraining cache (same subsets, keys and
cache entry), tune on the first 10% of the queries and report on the rest.
"""

import argparse
import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxattr
from bench import common, lds, methods
from jaxattr import evaluate

log = lds.log

# Forward-evaluation accounting, printed under every table that counts them.
ACCOUNTING = (
    "Counts per query. A forward evaluation is one pass of the model on one "
    "query, about P multiply-adds (P parameters). jaxattr: central differences "
    "cost 2 forward evaluations per readout, jvp 1 jvp (about 1.5-2 forward "
    "evaluations) per readout. TRAK: 1 backward pass per model, counted as 3 "
    "forward evaluations (forward + backward), plus the P x k projection of "
    "the gradient, P*k multiply-adds = k forward-evaluation equivalents; "
    "unprojected TRAK has no projection. 'product' is the final product with "
    "the stored rows (rows x width multiply-adds), in forward-evaluation "
    "equivalents (divided by P); it is not a forward evaluation."
)
BACKWARD_FORWARDS = 3


@dataclasses.dataclass
class Prepared:
    """The trained model and data every method of an issue-4 benchmark attributes.

    Attributes:
      config: the ``bench.lds.Config`` whose sizes and keys are used.
      setting: the ``bench.common.Setting``.
      task: ``jaxattr.classification`` of the setting's model.
      train, queries: ``(x, y)`` device arrays.
      params: the full-data model (bench.lds's main model).
      basis: eigenbasis of the default curvature, computed once.
      keys: ``bench.lds.keys(config)``.
      tune, report: query indices (first 10% / the rest).
      seconds: ``training`` and ``eigenbasis`` wall-clock seconds.
    """

    config: lds.Config
    setting: common.Setting
    task: jaxattr.Task
    train: tuple
    queries: tuple
    params: Any
    basis: jaxattr.Eigenbasis
    keys: dict
    tune: np.ndarray
    report: np.ndarray
    seconds: dict

    @property
    def num_train(self) -> int:
        return int(self.train[1].shape[0])

    @property
    def num_params(self) -> int:
        return common.num_params(self.params)

    def queries_at(self, rows) -> tuple:
        return common.take(self.queries, rows)

    def simulate(self, sketch=None, **kwargs):
        """``jaxattr.simulate`` with its defaults, on the shared eigenbasis."""
        return jaxattr.simulate(
            self.task,
            self.params,
            self.train,
            key=self.keys["methods"],
            curvature=self.basis,
            sketch=sketch,
            **kwargs,
        )

    def describe(self) -> dict:
        return {
            "setting": self.setting.describe(),
            "num_train": self.num_train,
            "num_queries": int(self.queries[1].shape[0]),
            "tune_queries": int(len(self.tune)),
            "report_queries": int(len(self.report)),
            "num_params": self.num_params,
            "basis_rank": int(self.basis.values.shape[0]),
            "test_accuracy": common.accuracy(
                self.setting.model.apply, self.params, self.queries
            ),
            "prep_s": dict(self.seconds),
        }


def setting_of(config: lds.Config) -> common.Setting:
    setting = common.SETTINGS[config.setting]
    if config.epochs is not None:
        setting = dataclasses.replace(setting, epochs=config.epochs)
    return setting


def load(config: lds.Config, data_path=None) -> tuple:
    """``(train, queries)`` as device arrays; exits when MNIST is missing."""
    path = common.mnist_path(data_path)
    if path is None:
        raise SystemExit(f"MNIST not found: pass --data or set ${common.MNIST_ENV}.")
    train, queries = common.load_mnist(path, config.num_train, config.num_test)
    as_jax = lambda d: (jnp.asarray(d[0]), jnp.asarray(d[1]))
    return as_jax(train), as_jax(queries)


def prepare(config: lds.Config, data_path=None) -> Prepared:
    """Loads the data, trains the full-data model and decomposes its curvature."""
    setting = setting_of(config)
    train, queries = load(config, data_path)
    keys = lds.keys(config)
    task = jaxattr.classification(setting.model.apply)
    trained, train_s = common.timed(
        common.train_full,
        setting.train_setup("fixed"),
        train,
        jax.random.fold_in(keys["loo"], 0),  # bench.lds's main model
        None,
        0,
    )
    log(f"full-data model trained in {train_s:.0f} s")
    curvature = jaxattr.default_curvature(task, len(train[1]))
    basis, basis_s = common.timed(
        jaxattr.eigenbasis, curvature, trained.params, train, keys["methods"]
    )
    log(f"eigenbasis of rank {basis.values.shape[0]} in {basis_s:.0f} s")
    tune = lds.rows_tuned(config)
    return Prepared(
        config,
        setting,
        task,
        train,
        queries,
        trained.params,
        basis,
        keys,
        np.arange(tune),
        np.arange(tune, config.num_test),
        {"training": train_s, "eigenbasis": basis_s},
    )


# Ground truth ------------------------------------------------------------------


def lds_weights(prep: Prepared) -> np.ndarray:
    """bench.lds's half subsets (its TRAK-M models train on the first M)."""
    cfg = prep.config
    return evaluate.random_subsets(prep.keys["subsets"], cfg.subsets, prep.num_train)


def lds_truth(prep: Prepared, cache_dir) -> lds.Truth:
    """bench.lds's LDS ground truth, read from (or written to) its cache."""
    cfg = prep.config
    measured, seconds = common.timed(
        evaluate.retrain,
        prep.setting.train_setup(),
        prep.train,
        prep.queries,
        lds_weights(prep),
        prep.keys["lds"],
        num_seeds=cfg.seeds,
        models_per_chunk=cfg.models_per_chunk,
        cache_dir=cache_dir,
        progress=cfg.progress,
    )
    log(
        f"LDS ground truth ({cfg.subsets} subsets x {cfg.seeds} seeds): {seconds:.0f} s"
    )
    return lds.Truth(lds_weights(prep), measured, None, None, {"lds_s": seconds})


def lds_of(scores, weights, measured: evaluate.Measurements, rows) -> float:
    """Margin LDS of ``scores`` ``(len(rows), num_columns)`` against retraining."""
    actual = measured.margin[:, :, np.asarray(rows)]
    return float(evaluate.lds(np.asarray(scores), weights, actual).mean)


# TRAK --------------------------------------------------------------------------


def trak_models(prep: Prepared, models: list, dim) -> tuple:
    """``bench.methods.featurise`` of each model: ``(featurised, seconds)``.

    Model ``m`` is projected with ``fold_in(keys["methods"], m)`` as in
    bench.lds, so TRAK here is the same TRAK as there.
    """
    clock = common.Clock()
    out = [
        methods.featurise(
            prep.task,
            params,
            prep.train,
            prep.queries,
            jax.random.fold_in(prep.keys["methods"], m),
            dim,
            clock,
        )
        for m, params in enumerate(models)
    ]
    return out, clock.seconds.get("featurisation", 0.0)


def trak_query_forwards(dim, num_models: int = 1) -> int:
    """Query-side forward-evaluation equivalents of TRAK-M (see ACCOUNTING)."""
    return num_models * (BACKWARD_FORWARDS + (dim or 0))


# Timing and fronts -------------------------------------------------------------


def ms_per_query(fn: Callable, queries: tuple, warm: int | None = 128) -> tuple:
    """``(result, ms per query)`` of ``fn(queries)`` after a compiling call.

    The warm-up call sees the first ``warm`` queries (all when None), which
    compiles the kernels of a query chunk; the timed call then runs on all.
    """
    first = queries if warm is None else common.take(queries, slice(0, warm))
    jax.block_until_ready(fn(first))
    out, seconds = common.timed(fn, queries)
    return out, 1000.0 * seconds / len(queries[1])


def pareto(cost, value) -> np.ndarray:
    """Mask of the points no other point beats: cost <= and value >=, one strictly."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    better = (cost[None, :] <= cost[:, None]) & (value[None, :] >= value[:, None])
    strictly = (cost[None, :] < cost[:, None]) | (value[None, :] > value[:, None])
    return ~np.any(better & strictly, axis=1)


def recall(found, exact) -> float:
    """Mean over queries of the share of ``exact`` ids that ``found`` holds."""
    found, exact = np.asarray(found), np.asarray(exact)
    hits = [
        len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits))


# Command line and output -------------------------------------------------------


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every issue-4 benchmark takes (sizes as in bench.lds)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--setting", choices=sorted(common.SETTINGS), default="mnist-mlp")
    p.add_argument("--quick", action="store_true", help="bench.lds --quick sizes")
    p.add_argument("--data", help="mnist.npz (default $JAXATTR_MNIST or ../shared)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--cache-dir", default=str(common.REPO / "bench/.cache"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    for name in ("num_train", "num_test", "epochs", "subsets", "seeds", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    return p


def base_config(args) -> lds.Config:
    """The bench.lds configuration these sizes give (its cache keys follow)."""
    values = dict(lds.QUICK) if args.quick else {}
    for name in ("num_train", "num_test", "epochs", "subsets", "seeds", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return lds.Config(setting=args.setting, progress=args.progress, **values)


def ints(text: str) -> tuple:
    """``"64,256"`` -> ``(64, 256)``; ``none`` stands for None (unprojected)."""
    return tuple(None if v.lower() == "none" else int(v) for v in text.split(","))


def cache_dir(args) -> str | None:
    return None if args.no_cache else args.cache_dir


def write(report: dict, path: str | None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=_plain)
        f.write("\n")


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(head: list, rows: list) -> str:
    """A fixed-width text table: ``head`` is ``[(name, width), ...]``."""
    cells = lambda values: " ".join(
        str(v).rjust(w) if i else str(v).ljust(w)
        for i, (v, (_, w)) in enumerate(zip(values, head, strict=True))
    )
    line = cells([name for name, _ in head])
    return "\n".join([line, "-" * len(line)] + [cells(r) for r in rows])


def main_of(name: str, config, opts, args, run: Callable, text: Callable) -> int:
    """The shared command-line body: prepare, run, print the tables, write JSON."""
    log(f"{name}: {config}; {opts}")
    p = prepare(config, args.data)
    report = run(p, opts, cache_dir(args))
    print(text(report))
    write(report, args.out)
    return 0
