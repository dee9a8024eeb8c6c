"""Attribution metrics against ground truth: LDS, leave-one-out and AUC.

Everything here runs in float64 numpy on host arrays; no scipy.
"""

import dataclasses
from typing import Any

import numpy as np

from jaxattr._types import ArrayLike
from jaxattr.evaluate._retrain import Measurements, Target


@dataclasses.dataclass(frozen=True)
class Correlation:
    """A correlation per query and its mean over the queries where it is defined.

    Attributes:
      mean: mean of ``per_query`` over the queries not skipped (NaN if none).
      per_query: ``(num_queries,)`` correlations, NaN where skipped.
      num_skipped: queries whose predicted or actual values were constant or not
        finite, so that no correlation exists.
    """

    mean: float
    per_query: np.ndarray
    num_skipped: int


def rankdata(a: ArrayLike) -> np.ndarray:
    """Ranks ``1..n`` along the last axis, ties sharing their average rank.

    Args:
      a: array ``(..., n)``.

    Returns:
      float64 ranks of the same shape (as ``scipy.stats.rankdata(a, axis=-1)``).
    """
    a = np.asarray(a, np.float64)
    order = np.argsort(a, axis=-1, kind="stable")
    ranks = np.empty_like(a)
    for row_index in np.ndindex(a.shape[:-1]):
        ranks[row_index] = _rank_row(a[row_index], order[row_index])
    return ranks


def _rank_row(row: np.ndarray, order: np.ndarray) -> np.ndarray:
    sorted_row = row[order]
    starts = np.flatnonzero(np.r_[True, sorted_row[1:] != sorted_row[:-1]])
    ends = np.r_[starts[1:], len(row)]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(row))
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def pearson_rows(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pearson correlation of matching rows of ``a`` and ``b``.

    Args:
      a, b: ``(num_rows, n)`` arrays.

    Returns:
      ``(num_rows,)`` correlations; NaN for a row that is constant or holds a
      non-finite value in either input.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.all(np.isfinite(a), -1) & np.all(np.isfinite(b), -1)
    ok &= _varies(a) & _varies(b)
    a = np.where(ok[:, None], a, 0.0)
    b = np.where(ok[:, None], b, 0.0)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    ok &= norms > 0
    r = np.sum(a * b, -1) / np.where(ok, norms, 1.0)
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def _varies(a: np.ndarray) -> np.ndarray:
    return np.any(a != a[..., :1], axis=-1)


def _summarise(per_query: np.ndarray) -> Correlation:
    skipped = int(np.sum(np.isnan(per_query)))
    mean = float(np.nanmean(per_query)) if skipped < len(per_query) else float("nan")
    return Correlation(mean, per_query, skipped)


def _seed_mean(actual: Any, target: str) -> np.ndarray:
    if isinstance(actual, Measurements):
        actual = actual.target(target)
    actual = np.asarray(actual, np.float64)
    if actual.ndim == 3:
        return actual.mean(axis=1)
    if actual.ndim != 2:
        raise ValueError(
            "actual must be Measurements, (num_subsets, num_seeds, num_queries) or "
            f"(num_subsets, num_queries), got shape {actual.shape}."
        )
    return actual


def _check_scores(scores: ArrayLike, num_queries: int) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != num_queries:
        raise ValueError(
            f"scores must be (num_queries={num_queries}, num_train), got shape "
            f"{scores.shape}."
        )
    return scores


def lds(
    scores: ArrayLike, weights: ArrayLike, actual: Any, target: Target = "margin"
) -> Correlation:
    """Linear datamodeling score: Spearman per query, averaged over queries.

    The prediction for subset ``s`` and query ``q`` is the subset sum
    ``sum_b weights[s, b] * scores[q, b]``; it is rank-correlated over subsets
    with the actual measurement averaged over seeds.

    Args:
      scores: ``(num_queries, num_train)`` attribution scores.
      weights: ``(num_subsets, num_train)`` 0/1 subset weights, as retrained.
      actual: the :class:`Measurements` of :func:`retrain`, an array
        ``(num_subsets, num_seeds, num_queries)`` or a seed-averaged
        ``(num_subsets, num_queries)``.
      target: ``"margin"`` or ``"neg_loss"``, read from ``Measurements``.

    Returns:
      A :class:`Correlation`; queries whose predictions or actual values are
      constant over subsets are skipped and counted.

    Raises:
      ValueError: shapes that do not fit together.
    """
    actual = _seed_mean(actual, target)
    weights = np.asarray(weights, np.float64)
    scores = _check_scores(scores, actual.shape[1])
    if weights.shape != (actual.shape[0], scores.shape[1]):
        raise ValueError(
            f"weights must be (num_subsets={actual.shape[0]}, "
            f"num_train={scores.shape[1]}), got {weights.shape}."
        )
    predicted = scores @ weights.T  # (num_queries, num_subsets)
    return _summarise(pearson_rows(rankdata(predicted), rankdata(actual.T)))


def loo(
    scores: ArrayLike, removed: ArrayLike, actual: Any, target: Target = "margin"
) -> Correlation:
    """Leave-one-out correlation: Pearson per query, averaged over queries.

    Sign: a score ``tau(b, q)`` is the derivative for upweighting ``b``, so
    removing ``b`` from a mean-loss training set of size ``n`` changes the
    measurement by about ``-tau(b, q) / n``. The scores of the removed examples
    are therefore correlated with ``-(measure without b - measure with all)``;
    a perfect attribution gets +1.

    Args:
      scores: ``(num_queries, num_train)`` attribution scores.
      removed: ``(num_removed,)`` row indices, as passed to :func:`loo_weights`.
      actual: the :class:`Measurements` of :func:`retrain` with
        ``loo_weights(num_train, removed)`` (row 0 the full set), an array
        ``(1 + num_removed, num_seeds, num_queries)`` or a seed-averaged
        ``(1 + num_removed, num_queries)``.
      target: ``"margin"`` or ``"neg_loss"``, read from ``Measurements``.

    Returns:
      A :class:`Correlation` over queries.

    Raises:
      ValueError: shapes that do not fit together.
    """
    actual = _seed_mean(actual, target)
    removed = np.asarray(removed)
    scores = _check_scores(scores, actual.shape[1])
    if removed.ndim != 1 or actual.shape[0] != 1 + len(removed):
        raise ValueError(
            f"actual has {actual.shape[0]} rows; expected 1 + len(removed) = "
            f"{1 + removed.size} (row 0 the full training set)."
        )
    change = actual[1:] - actual[0]  # (num_removed, num_queries)
    return _summarise(pearson_rows(scores[:, removed], -change.T))


def auc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positives``.

    The probability that a random positive outscores a random negative, ties
    counting one half (the Mann-Whitney statistic). For noisy-label detection
    pass self-influence as ``scores`` and the ``flipped`` mask of
    :func:`flip_labels`.

    Args:
      scores: ``(n,)`` finite scores, higher meaning more likely positive.
      positives: ``(n,)`` bool.

    Returns:
      The AUC in ``[0, 1]``.

    Raises:
      ValueError: mismatched shapes, non-finite scores, or no positives or no
        negatives.
    """
    s = np.asarray(scores, np.float64)
    p = np.asarray(positives, bool)
    if s.ndim != 1 or s.shape != p.shape:
        raise ValueError(
            f"scores and positives must both be (n,), got {s.shape} and {p.shape}."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf; AUC needs finite scores.")
    num_pos, num_neg = int(p.sum()), int((~p).sum())
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"AUC needs positives and negatives, got {num_pos} and {num_neg}."
        )
    rank_sum = rankdata(s)[p].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
