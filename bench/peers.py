"""Peer libraries (traker, dattri) on the benchmark's own weights, in PyTorch on CPU.

The parent side (:func:`run`, in the benchmark's Python) writes the Flax
weights, the data and the report queries to a temporary folder and starts one
subprocess per peer method in a Python that has torch, traker and dattri
(``$JAXATTR_PEERS_PYTHON``, else ``../venv-peers/bin/python``)::

    python -m bench.peers FOLDER METHOD

The child side builds the equivalent torch model, loads the weights, checks
that its logits match jax's, attributes, and writes the scores and its timings
back. jaxattr then computes every metric with the same ground truth. A peer
that cannot run (no such Python, an error, too slow) gets a row saying why.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PEERS_ENV = "JAXATTR_PEERS_PYTHON"
LOGIT_TOL = 1e-4

# Parent side ------------------------------------------------------------------


def peer_python() -> str | None:
    chosen = os.environ.get(PEERS_ENV) or str(REPO.parent / "venv-peers/bin/python")
    return chosen if Path(chosen).exists() else None


def jobs(ctx) -> list:
    """``(method, row name, options)`` of every peer method for this setting."""
    cfg = ctx.config
    damping = ctx.cache.get("cg_damping", 1e-2) * (ctx.lam_max or 1.0)
    k = cfg.full_proj_dim
    linear = len(ctx.params["params"]) == 1
    influence = (
        ("dattri_if_explicit", "dattri IF explicit (Hessian)", {"damping": damping})
        if linear
        else (
            "dattri_if_cg",
            "dattri IF-CG (Hessian)",
            {"damping": damping, "max_iter": min(cfg.cg_iters, 10), "queries": 20},
        )
    )
    return [
        ("traker", f"traker TRAK-1 full model, k={k}, undamped", {"proj_dim": k}),
        (
            "dattri_trak",
            f"dattri TRAK-1 full model, k={cfg.ens_proj_dim}, undamped",
            {"proj_dim": cfg.ens_proj_dim},
        ),
        influence,
    ]


def run(ctx, data, log) -> list:
    """Result rows of the peer methods on ``ctx.params`` (report queries only)."""
    from bench import methods

    python = peer_python()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_inputs(Path(folder), ctx)
        for method, name, options in jobs(ctx):
            start = time.perf_counter()
            if python is None:
                outcome = {"error": f"not run: no peer Python (set ${PEERS_ENV})"}
            else:
                outcome = _call(
                    python, Path(folder), method, options, ctx.config.peer_timeout
                )
            rows.append(_row(methods, ctx, name, options, outcome))
            log(f"peer {method}: {time.perf_counter() - start:.0f} s")
    return rows


def write_inputs(folder: Path, ctx) -> None:
    import jax

    from bench.common import take

    layers = ctx.params["params"]
    arrays = {}
    for i, name in enumerate(sorted(layers, key=lambda s: int(s.split("_")[-1]))):
        arrays[f"w{i}"] = np.asarray(layers[name]["kernel"])
        arrays[f"b{i}"] = np.asarray(layers[name]["bias"])
    queries = take(ctx.queries, ctx.report)
    apply = jax.jit(jax.vmap(ctx.task.outputs, (None, 0)))
    np.savez(
        folder / "inputs.npz",
        x_train=np.asarray(ctx.train[0]),
        y_train=np.asarray(ctx.train[1]),
        x_query=np.asarray(queries[0]),
        y_query=np.asarray(queries[1]),
        logits_query=np.asarray(apply(ctx.params, queries)),
        **arrays,
    )


def _call(python, folder: Path, method: str, options: dict, timeout_s: int) -> dict:
    (folder / f"{method}.options.json").write_text(json.dumps(options))
    command = [python, "-m", "bench.peers", str(folder), method]
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"infeasible: did not finish within {timeout_s} s"}
    result = folder / f"{method}.json"
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"error": f"failed: {' '.join(tail)[:300]}"}
    outcome = json.loads(result.read_text())
    with np.load(folder / f"{method}.npz") as stored:
        outcome["scores"] = stored["scores"]
    return outcome


def _row(methods, ctx, name, options, outcome):
    if "error" in outcome:
        empty = np.zeros((0, 0))
        return methods.Result(
            name, options, empty, np.zeros(0, int), {}, np.nan, 0, note=outcome["error"]
        )
    rows = ctx.report[: len(outcome["scores"])]
    note = f"peer defaults; torch logits match jax to {outcome['logit_diff']:.1e}"
    if len(rows) < len(ctx.report):
        note += f"; scored on the first {len(rows)} report queries only (cost)"
    return methods.Result(
        name=name,
        hparams=options,
        scores=outcome["scores"],
        rows=rows,
        prep={"featurisation": outcome["prep_s"]},
        ms_per_query=1000.0 * outcome["query_s"] / len(rows),
        bytes_per_example=outcome.get("bytes_per_example", 0),
        note=note,
    )


# Child side (runs with torch) -----------------------------------------------------


def torch_model(arrays):
    """``torch.nn.Sequential`` of Linear + ReLU layers holding the Flax weights."""
    import torch

    count = len([k for k in arrays if k.startswith("w")])
    layers = []
    for i in range(count):
        w, b = arrays[f"w{i}"], arrays[f"b{i}"]
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w.T))
            linear.bias.copy_(torch.as_tensor(b))
        layers += [linear, torch.nn.ReLU()] if i < count - 1 else [linear]
    return torch.nn.Sequential(*layers).eval()


def _load(folder: Path):
    import torch

    with np.load(folder / "inputs.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    model = torch_model(arrays)
    tensors = lambda p: (
        torch.as_tensor(arrays[f"x_{p}"]),
        torch.as_tensor(arrays[f"y_{p}"]).long(),
    )
    with torch.no_grad():
        logits = model(tensors("query")[0]).numpy()
    diff = float(np.max(np.abs(logits - arrays["logits_query"])))
    if diff > LOGIT_TOL:
        raise SystemExit(f"torch logits differ from jax by {diff:.2e}")
    return model, tensors("train"), tensors("query"), diff


def _loader(data, batch_size=500):
    import torch

    dataset = torch.utils.data.TensorDataset(*data)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _margin(logits, labels):
    import torch

    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def traker_scores(model, train, queries, options, folder):
    """traker's TRAKer with its CPU projector; returns ``(scores (Q, N), timings)``."""
    import logging

    import torch
    from trak import TRAKer

    n, q = len(train[1]), len(queries[1])
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=n,
        save_dir=str(folder / "traker"),
        device="cpu",
        proj_dim=options["proj_dim"],
        use_half_precision=False,
        logging_level=logging.ERROR,
    )
    start = time.perf_counter()
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for x, y in _loader(train):
        traker.featurize(batch=(x, y), num_samples=len(y))
    traker.finalize_features()
    prep = time.perf_counter() - start
    start = time.perf_counter()
    traker.start_scoring_checkpoint("q", model.state_dict(), model_id=0, num_targets=q)
    for x, y in _loader(queries):
        traker.score(batch=(x, y), num_samples=len(y))
    scores = np.asarray(traker.finalize_scores(exp_name="q")).T
    del torch
    p = sum(x.numel() for x in model.parameters())
    info = {"prep_s": prep, "query_s": time.perf_counter() - start, "num_params": p}
    info["bytes_per_example"] = 4 * options["proj_dim"]
    return scores, info


def dattri_trak_scores(model, train, queries, options, folder):
    import torch
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def margin(params, data):
        logits = torch.func.functional_call(model, params, data[0].unsqueeze(0))
        return _margin(logits, data[1].unsqueeze(0)).squeeze(0)

    def probability(params, data):
        logits = torch.func.functional_call(model, params, data[0].unsqueeze(0))
        return torch.softmax(logits, -1)[0, data[1]]

    task = AttributionTask(
        loss_func=margin, model=model, checkpoints=model.state_dict()
    )
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=probability,
        device="cpu",
        projector_kwargs={"proj_dim": options["proj_dim"], "device": "cpu"},
    )
    start = time.perf_counter()
    attributor.cache(_loader(train))
    prep = time.perf_counter() - start
    start = time.perf_counter()
    scores = attributor.attribute(_loader(queries)).detach().numpy().T
    info = {"prep_s": prep, "query_s": time.perf_counter() - start}
    info["bytes_per_example"] = 4 * options["proj_dim"]
    return scores, info


def _loss_task(model):
    import torch
    from dattri.task import AttributionTask

    def loss(params, data):
        logits = torch.func.functional_call(model, params, data[0])
        return torch.nn.functional.cross_entropy(logits, data[1])

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def dattri_if_scores(model, train, queries, options, folder, cg: bool):
    from dattri.algorithm.influence_function import (
        IFAttributorCG,
        IFAttributorExplicit,
    )

    task = _loss_task(model)
    if cg:
        attributor = IFAttributorCG(
            task=task,
            device="cpu",
            regularization=options["damping"],
            max_iter=options["max_iter"],
        )
        limit = options.get("queries") or len(queries[1])
        queries = (queries[0][:limit], queries[1][:limit])
    else:
        attributor = IFAttributorExplicit(
            task=task, device="cpu", regularization=options["damping"]
        )
    start = time.perf_counter()
    attributor.cache(_loader(train))
    prep = time.perf_counter() - start
    start = time.perf_counter()
    scores = attributor.attribute(_loader(train), _loader(queries)).detach().numpy().T
    info = {"prep_s": prep, "query_s": time.perf_counter() - start}
    p = sum(x.numel() for x in model.parameters())
    info["bytes_per_example"] = 4 * p
    return scores, info


CHILD = {
    "traker": traker_scores,
    "dattri_trak": dattri_trak_scores,
    "dattri_if_explicit": lambda *a: dattri_if_scores(*a, cg=False),
    "dattri_if_cg": lambda *a: dattri_if_scores(*a, cg=True),
}


def child(folder: Path, method: str) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    options = json.loads((folder / f"{method}.options.json").read_text())
    model, train, queries, diff = _load(folder)
    scores, info = CHILD[method](model, train, queries, options, folder)
    np.savez(folder / f"{method}.npz", scores=np.asarray(scores, np.float64))
    info["logit_diff"] = diff
    (folder / f"{method}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    child(Path(sys.argv[1]), sys.argv[2])
