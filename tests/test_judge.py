"""Position-debiased judging: combining the two presentation orders."""

import math

import pytest

from selfalign_ray.sao.judge import JudgeConfig, decide, generative_verdict, logprob_verdict


def lp(p_one: float) -> dict:
    """Log-probs whose normalised P("1") is p_one."""
    return {"1": math.log(p_one), "2": math.log(1 - p_one)}


def test_logprob_swap_cancels_constant_position_bias():
    # A judge that says "1" with 0.7 whatever comes first has no preference: P(a) = (0.7 + 0.3) / 2.
    v = logprob_verdict(lp(0.7), lp(0.7))
    assert v.p_a == pytest.approx(0.5)
    assert v.orders_agree is False
    assert decide(v, JudgeConfig(min_confidence=0.5)) == (None, "orders_disagree")


def test_logprob_both_orders_prefer_a():
    # a shown first: P(1)=0.8 -> P(a)=0.8; a shown second: P(1)=0.4 -> P(a)=0.6. Mean 0.7.
    v = logprob_verdict(lp(0.8), lp(0.4))
    assert v.p_a == pytest.approx(0.7)
    assert v.confidence == pytest.approx(0.7)
    assert v.orders_agree is True
    assert decide(v, JudgeConfig(min_confidence=0.6)) == (True, None)
    assert decide(v, JudgeConfig(min_confidence=0.75)) == (None, "below_confidence")


def test_logprob_prefers_b_and_agreement_policy():
    # First order mildly prefers b (P(a)=0.45), second strongly (P(1)=0.9 -> P(a)=0.1); orders agree.
    v = logprob_verdict(lp(0.45), lp(0.9))
    assert v.p_a == pytest.approx(0.275)
    assert decide(v, JudgeConfig(min_confidence=0.5, require_agreement=True)) == (False, None)
    # Disagreeing orders are kept or dropped by config.
    w = logprob_verdict(lp(0.9), lp(0.55))  # P(a) = (0.9 + 0.45) / 2 = 0.675, orders disagree
    assert w.orders_agree is False
    assert decide(w, JudgeConfig(min_confidence=0.5, require_agreement=False)) == (True, None)
    assert decide(w, JudgeConfig(min_confidence=0.5, require_agreement=True)) == (None, "orders_disagree")


def test_generative_votes_map_back_through_the_swap():
    # Order 1 (a, b): "1 > 2" votes a. Order 2 (b, a): "2 > 1" also votes a.
    v = generative_verdict("ranking: 1 > 2", "ranking: 2 > 1")
    assert (v.p_a, v.confidence, v.orders_agree) == (1.0, 1.0, True)
    assert decide(v, JudgeConfig(kind="generative", min_confidence=1.0, require_agreement=True)) == (True, None)
    # Position-biased judge: always "1 > 2" -> one vote each -> disagreement.
    w = generative_verdict("ranking: 1 > 2", "ranking: 1 > 2")
    assert (w.p_a, w.orders_agree) == (0.5, False)
    assert decide(w, JudgeConfig(kind="generative", min_confidence=1.0))[1] == "orders_disagree"


def test_generative_unparsable_is_counted_never_guessed():
    v = generative_verdict("I like both.", "Response 1 is better")
    assert decide(v, JudgeConfig(kind="generative")) == (None, "unparsable_judge:no_ranking")
    half = generative_verdict("ranking: 2 > 1", "no idea")
    assert half.p_a == 0.0 and half.confidence == 0.5 and half.orders_agree is None
    assert decide(half, JudgeConfig(kind="generative", min_confidence=1.0, require_agreement=False))[1] == "below_confidence"
    assert decide(half, JudgeConfig(kind="generative", min_confidence=0.5, require_agreement=False)) == (False, None)


def test_one_unparsable_order_is_not_a_disagreement():
    # With require_agreement a pair judged by one order only cannot agree; the reason says why (the failing
    # order's parse error), not orders_disagree.
    half = generative_verdict("ranking: 2 > 1", "no idea")
    strict = JudgeConfig(kind="generative", min_confidence=0.5, require_agreement=True)
    assert decide(half, strict) == (None, "one_order_unparsable:no_ranking")
    other = generative_verdict("ranking: 1 > 1", "ranking: 1 > 2")
    assert decide(other, strict) == (None, "one_order_unparsable:repeated_option")
    # Two parsed, opposite votes still are a disagreement.
    assert decide(generative_verdict("ranking: 1 > 2", "ranking: 1 > 2"), strict)[1] == "orders_disagree"


def test_require_agreement_needs_both_orders():
    from selfalign_ray.config import ConfigError

    with pytest.raises(ConfigError, match="both_orders"):
        JudgeConfig(require_agreement=True, both_orders=False)
