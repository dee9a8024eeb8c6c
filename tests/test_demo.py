"""End-to-end tests of ``jaxattr demo`` and of its argument and data checks."""

import contextlib
import json
import os
import pathlib
import re
from decimal import Decimal

import numpy as np
import pytest

from jaxattr import _data, _demo
from jaxattr._cli import main

SMALL = [
    "--epochs", "2", "--sim-epochs", "1", "--horizon", "3", "--batch-size", "32",
    "--queries", "2", "--top-k", "3", "--no-progress",
]  # fmt: skip


def _numbers(text):
    """Every number written in ``text``, as Decimal strings (commas removed)."""
    return [
        t.replace(",", "")
        for t in re.findall(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", text)
    ]


def _json_numbers(value):
    """All numbers of a JSON value, including those written inside its strings."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _json_numbers(v)]
    if isinstance(value, str):
        return [float(t) for t in _numbers(value)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [abs(float(value))]
    return []


def _printed_number_in(token, values):
    """True if some value rounds to ``token`` at the precision it was printed with."""
    ulp = float(Decimal(1).scaleb(Decimal(token).as_tuple().exponent))
    return any(abs(v - float(token)) <= ulp for v in values)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One small digits run through the command line: (stdout, report, png path)."""
    folder = tmp_path_factory.mktemp("demo")
    png, js = str(folder / "demo.png"), str(folder / "demo.json")
    capture = folder / "stdout.txt"
    argv = ["demo", "--num-train", "200", "--num-test", "40", *SMALL]
    with open(capture, "w") as out:
        with contextlib.redirect_stdout(out):
            assert main([*argv, "--out-png", png, "--json", js]) == 0
    with open(js) as f:
        report = json.load(f)
    return capture.read_text(), report, png


def test_demo_writes_png_and_json(digits_run):
    _, report, png = digits_run
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report["outputs"]["png"] == png
    assert report["data"]["num_train"] == 200 and report["data"]["num_test"] == 40
    assert report["scores_shape"] == [40, 200]
    assert report["settings"]["horizon"] == 3
    assert report["settings"]["simulated_steps"] == 7  # ceil(200 / 32)


def test_demo_numbers_are_sane(digits_run):
    _, report, _ = digits_run
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert 0.0 <= report["train_accuracy"] <= 1.0
    t = report["timing"]
    assert all(np.isfinite(v) and v > 0 for v in t.values())
    assert t["sim_to_plain_ratio"] == pytest.approx(
        t["sim_train_s"] / t["plain_train_s"]
    )
    assert t["ms_per_query"] == pytest.approx(1000 * t["scoring_s"] / 40)
    # Simulation must not change the training itself.
    assert report["param_diff_vs_plain"] <= 1e-5


def test_demo_attributions_are_consistent(digits_run):
    _, report, _ = digits_run
    digits = _data.load_digits(200, 40)
    assert len(report["queries"]) == 2
    for q in report["queries"]:
        assert q["label"] == digits.y_test[q["index"]]
        pro = [e["score"] for e in q["proponents"]]
        con = [e["score"] for e in q["opponents"]]
        assert len(pro) == len(con) == 3
        assert pro == sorted(pro, reverse=True) and con == sorted(con)
        assert pro[0] >= con[0]
        for e in q["proponents"] + q["opponents"]:
            assert 0 <= e["index"] < 200
            assert e["label"] == digits.y_train[e["index"]]
    ranked = report["self_influence"]
    assert [r["rank"] for r in ranked] == list(range(1, 11))
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True)
    assert len({r["index"] for r in ranked}) == 10


def test_every_printed_number_is_in_the_json(digits_run):
    stdout, report, _ = digits_run
    values = _json_numbers(report)
    missing = [t for t in _numbers(stdout) if not _printed_number_in(t, values)]
    assert not missing, f"printed but not in the JSON: {missing}"
    assert f"{report['test_accuracy']:.4f}" in stdout


def test_demo_reads_npz_with_central_differences(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(90, 5, 5), dtype=np.uint8)
    y = (x.reshape(90, -1).mean(axis=1) > 127).astype(np.int64)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x[:60], y_train=y[:60], x_test=x[60:], y_test=y[60:])
    js = tmp_path / "tiny.json"
    args = ["demo", "--data", str(path), *SMALL, "--readout", "central-difference"]
    out = ["--out-png", str(tmp_path / "t.png"), "--json", str(js)]
    assert main([*args, *out]) == 0
    report = json.loads(js.read_text())
    assert report["data"]["num_features"] == 25
    assert report["data"]["num_classes"] == 2
    assert report["scores_shape"] == [30, 60]
    assert "test accuracy" in capsys.readouterr().out


def test_schedule_covers_each_example_once_per_epoch():
    config = _demo.DemoConfig(epochs=3, batch_size=4)
    steps = list(_demo._schedule(config, 10))
    assert len(steps) == 3 * _demo.steps_per_epoch(config, 10) == 9
    for epoch in range(3):
        ids = np.concatenate([i for e, _, i in steps if e == epoch])
        assert sorted(ids[ids >= 0]) == list(range(10))
        assert np.sum(ids == -1) == 2
    assert all(np.array_equal(r, np.maximum(i, 0)) for _, r, i in steps)


# Errors: a clear message on stderr, a non-zero exit, never a traceback -----


def _fails(argv, capsys, *phrases):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error" in err
    for phrase in phrases:
        assert phrase in err, err
    return err


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--num-train", "0"], "--num-train"),
        (["--num-train", "abc"], "positive integer"),
        (["--num-test", "-3"], "--num-test"),
        (["--epochs", "0"], "--epochs"),
        (["--horizon", "1.5"], "--horizon"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "finite"),
        (["--momentum", "1"], "--momentum"),
        (["--seed", "-1"], "--seed"),
        (["--readout", "magic"], "--readout"),
        (["--bogus"], "unrecognized"),
        (["--num-train", "5000"], "between 1 and 1500"),
        (["--num-test", "1000"], "between 1 and 297"),
        (["--epochs", "2", "--sim-epochs", "3"], "--sim-epochs 3 exceeds"),
        (["--num-test", "4", "--queries", "5"], "--queries 5 exceeds"),
        (["--num-train", "5", "--top-k", "6"], "--top-k 6 exceeds"),
        (["--out-png", "/no/such/folder/x.png"], "does not exist"),
        (["--out-png="], "empty path"),
        (["--json", "/proc/jaxattr.json"], "is not writable"),
    ],
)
def test_bad_arguments(extra, phrase, capsys):
    _fails(["demo", "--no-progress", *extra], capsys, phrase)


def test_no_subcommand(capsys):
    _fails([], capsys, "required")


def test_json_path_is_a_directory(tmp_path, capsys):
    _fails(["demo", "--json", str(tmp_path)], capsys, "is a directory")


def _npz(tmp_path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(20, 4, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 3, size=20),
        "x_test": rng.integers(0, 256, size=(6, 4, 4), dtype=np.uint8),
        "y_test": rng.integers(0, 3, size=6),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        ({"y_test": None}, "lacks the array(s) y_test"),
        ({"x_train": np.zeros(20)}, "expected (num_examples, ...)"),
        ({"x_train": np.zeros((0, 4, 4))}, "at least one example"),
        ({"y_train": np.zeros(19, int)}, "19 labels but there are 20 images"),
        ({"y_train": np.zeros((20, 1), int)}, "1-D array"),
        ({"x_test": np.array([["a"] * 16] * 6)}, "images must be numbers"),
        ({"y_train": np.array(["cat"] * 20)}, "integer class indices"),
        ({"y_train": np.full(20, 0.5)}, "non-integer labels"),
        ({"y_train": -np.ones(20, int)}, "class indices"),
        ({"x_train": np.full((20, 4, 4), np.nan)}, "NaN"),
        ({"x_train": np.full((20, 4, 4), 300)}, "0..255"),
        ({"x_train": np.full((20, 4, 4), 255.0)}, "Divide them by 255"),
        ({"x_test": np.zeros((6, 5, 5), np.uint8)}, "same shape"),
        ({"x_train": np.array([None] * 20, dtype=object)}, "Could not read"),
    ],
)
def test_malformed_npz(overrides, phrase, tmp_path, capsys):
    path = _npz(tmp_path, **overrides)
    _fails(["demo", "--data", path], capsys, path, phrase)


def test_npz_count_out_of_range(tmp_path, capsys):
    path = _npz(tmp_path)
    _fails(["demo", "--data", path, "--num-train", "21"], capsys, "between 1 and 20")


def test_missing_and_unreadable_files(tmp_path, capsys):
    _fails(["demo", "--data", str(tmp_path / "none.npz")], capsys, "does not exist")
    _fails(["demo", "--data", str(tmp_path)], capsys, "is a directory")
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    _fails(["demo", "--data", str(text)], capsys, "Could not read")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    _fails(["demo", "--data", str(single)], capsys, "single array")


# $JAXATTR_MNIST, else ../shared/data/mnist.npz beside the repository (as bench/).
MNIST = os.environ.get("JAXATTR_MNIST") or str(
    pathlib.Path(__file__).resolve().parents[2] / "shared/data/mnist.npz"
)


@pytest.mark.skipif(not os.path.exists(MNIST), reason="MNIST .npz not available")
def test_mnist_loads_normalised():
    data = _data.load_npz(MNIST, num_train=1000, num_test=100)
    assert data.x_train.shape == (1000, 784) and data.x_test.shape == (100, 784)
    assert data.image_shape == (28, 28) and data.num_classes == 10
    assert abs(data.x_train.mean()) < 0.1 and abs(data.x_train.std() - 1) < 0.1


def test_divergence_is_reported_without_traceback(tmp_path, capsys):
    args = ["demo", "--lr", "1000", "--epochs", "2", "--horizon", "1", "--no-progress"]
    more = ["--num-train", "64", "--num-test", "8", "--batch-size", "32"]
    _fails([*args, *more, "--out-png", str(tmp_path / "d.png")], capsys, "--lr")


def test_progress_into_a_log_file_draws_about_ten_lines(capsys):
    from jaxattr._progress import progress

    assert list(progress(range(1200), 1200, "steps", True)) == list(range(1200))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert lines[-1].startswith("steps: [########################] 1200/1200")
