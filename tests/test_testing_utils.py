"""The comparison helpers themselves: they must reject what they are meant to catch."""

import math

import pytest
import torch
from testing_utils import assert_error_budget, assert_scores_close, assert_topk_equal

INF = math.inf


def topk(ids, scores):
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(scores, dtype=torch.float32)


REF = topk([[4, 9, 2, -1]], [[3.0, 2.0, 1.0, -INF]])


def test_topk_accepts_equal():
    assert_topk_equal(*REF, *REF)


def test_topk_accepts_near_tie_swap():
    ref = topk([[4, 9, 2]], [[3.0, 2.0, 2.0 - 1e-7]])
    assert_topk_equal(*topk([[4, 2, 9]], [[3.0, 2.0 - 1e-7, 2.0 - 1e-7]]), *ref)


def test_topk_accepts_other_near_tie_at_the_cut():
    """The last run may hold another candidate tied with the reference's last pick."""
    ref = topk([[4, 9]], [[3.0, 2.0]])
    candidates = topk([[4, 9, 7]], [[3.0, 2.0, 2.0 - 1e-7]])
    assert_topk_equal(*topk([[4, 7]], [[3.0, 2.0 - 1e-7]]), *ref, candidates=candidates)


@pytest.mark.parametrize(
    "ids, scores, why",
    [
        ([[9, 4, 2, -1]], [[3.0, 2.0, 1.0, -INF]], "well-separated ids swapped"),
        ([[4, 9, 5, -1]], [[3.0, 2.0, 1.0, -INF]], "wrong id"),
        ([[4, 9, 2, 7]], [[3.0, 2.0, 1.0, 0.5]], "padding count"),
        ([[4, 9, -1, -1]], [[3.0, 2.0, -INF, -INF]], "padding count"),
        ([[4, 9, 2, -1]], [[3.0, 2.0, 1.0, 0.0]], "padding score not -inf"),
        ([[4, -1, 9, 2]], [[3.0, -INF, 2.0, 1.0]], "padding in the middle"),
        ([[4, 9, 2, -1]], [[3.0, 2.0, 1.1, -INF]], "score off"),
        ([[4, 9, 9, -1]], [[3.0, 2.0, 2.0, -INF]], "duplicate id"),
        ([[4, 9, 2, -(2**63)]], [[3.0, 2.0, 1.0, -INF]], "poisoned id"),
        ([[4, 9, 2, -1]], [[3.0, 2.0, math.nan, -INF]], "NaN score"),
    ],
)
def test_topk_rejects(ids, scores, why):
    with pytest.raises(AssertionError):
        assert_topk_equal(*topk(ids, scores), *REF)


def test_topk_rejects_unsorted_and_bad_tie_order():
    ref = topk([[1, 2, 3]], [[2.0, 2.0, 1.0]])
    with pytest.raises(AssertionError, match="sorted"):
        assert_topk_equal(*topk([[1, 3, 2]], [[2.0, 1.0, 2.0]]), *ref, atol=2, rtol=0)
    with pytest.raises(AssertionError, match="smaller id first"):
        assert_topk_equal(*topk([[2, 1, 3]], [[2.0, 2.0, 1.0]]), *ref)


def test_topk_rejects_wrong_candidate_scores():
    ref = topk([[4, 9]], [[3.0, 2.0]])
    candidates = topk([[4, 9, 7]], [[3.0, 2.0, 0.5]])
    with pytest.raises(AssertionError):
        assert_topk_equal(*topk([[4, 7]], [[3.0, 2.0]]), *ref, candidates=candidates)
    with pytest.raises(AssertionError, match="not a candidate"):
        assert_topk_equal(*topk([[4, 8]], [[3.0, 2.0]]), *ref, candidates=candidates)


def test_scores_close_places_of_nan_and_inf():
    a = torch.tensor([1.0, -INF, math.nan])
    assert_scores_close(a, a.clone(), atol=0, rtol=0)
    with pytest.raises(AssertionError):
        assert_scores_close(a, torch.tensor([1.0, -INF, -INF]), atol=0, rtol=0)
    with pytest.raises(AssertionError):
        assert_scores_close(a, torch.tensor([1.0, 0.0, math.nan]), atol=0, rtol=0)


def test_error_budget():
    exact = torch.linspace(-3, 3, 101, dtype=torch.float64)
    low = exact.to(torch.float16)
    assert_error_budget(low.clone(), low, exact)
    with pytest.raises(AssertionError, match="budget"):
        assert_error_budget((exact * 1.01).to(torch.float16), low, exact)
