"""Position-debiased pairwise judging: combine the verdicts of both presentation orders.

For responses a and b the judge sees (a as 1, b as 2) and (b as 1, a as 2).
- logprob judge: from each order, P(a better) = softmax over the log-probs of "1" and "2" (read
  after "ranking: "); the two orders are averaged, which cancels a constant bias toward one
  position. Confidence = max(P, 1 - P).
- generative judge: each parsed order casts one vote; confidence = votes for the winner / 2, so
  1.0 means both orders agree, 0.5 a split or a single parsable order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from selfalign_ray.sao.parsing import parse_ranking


@dataclass
class JudgeConfig:
    """Mirrors conf/judge/*.yaml."""

    kind: str = "logprob"            # logprob | generative
    both_orders: bool = True         # judge (a, b) and (b, a); one order alone is position-biased
    require_agreement: bool = False  # drop pairs whose two orders prefer different responses
    min_confidence: float = 0.5      # drop pairs whose confidence is below this (strictly > 0.5 wins)
    max_tokens: int = 32             # generative judge only
    temperature: float = 0.0         # generative judge only (greedy: a verdict, not a sample)

    def __post_init__(self):
        # On the driver, before any actor has loaded a model and generated for the judge to fail on.
        from selfalign_ray.config import ConfigError

        if self.kind not in ("logprob", "generative"):
            raise ConfigError(f"judge.kind={self.kind!r} is not one of: logprob, generative")
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"judge.min_confidence must lie in [0, 1], got {self.min_confidence}")
        if self.require_agreement and not self.both_orders:
            raise ConfigError("judge.require_agreement=true needs judge.both_orders=true: agreement is between the two "
                              "presentation orders")
        if self.kind == "generative" and (self.max_tokens < 1 or self.temperature < 0):
            raise ConfigError(f"judge.max_tokens must be >= 1 and judge.temperature >= 0, got {self.max_tokens} "
                              f"and {self.temperature}")


@dataclass
class Verdict:
    """How strongly response a beats response b, or why there is no verdict."""

    p_a: float | None = None         # P(a better); 0.5 = no preference
    confidence: float | None = None
    orders_agree: bool | None = None
    reason: str | None = None
    raw: str = ""
    # Generative judge, both orders asked: why the one order without a verdict was unparsable (the pair then
    # rests on a single vote and the orders cannot be compared).
    one_order_unparsable: str | None = None


def _p_first(logprobs: dict[str, float]) -> float | None:
    """P("1") normalised over {"1", "2"}; None when the scores are missing or not numbers (NaN, both -inf)."""
    try:
        l1, l2 = float(logprobs["1"]), float(logprobs["2"])
    except (KeyError, TypeError, ValueError):
        return None
    d = l2 - l1
    if math.isnan(d):
        return None
    # Overflow-safe logistic: math.exp(d) raises OverflowError once d > ~709.
    return 1.0 / (1.0 + math.exp(d)) if d <= 0 else math.exp(-d) / (1.0 + math.exp(-d))


def logprob_verdict(ab: dict[str, float], ba: dict[str, float] | None) -> Verdict:
    p_ab = _p_first(ab)
    if p_ab is None or (ba is not None and _p_first(ba) is None):
        # Counted like an unparsable generative verdict; never a pair with a NaN preference.
        return Verdict(reason="unparsable_judge:invalid_logprobs", raw=f"logprobs={ab}; swapped={ba}")
    raw = f"P(1)={p_ab:.4f}"
    if ba is None:
        return Verdict(p_a=p_ab, confidence=max(p_ab, 1 - p_ab), orders_agree=None, raw=raw)
    p_ba = 1.0 - _p_first(ba)  # in the swapped order a is response 2
    p = (p_ab + p_ba) / 2
    agree = (p_ab > 0.5) == (p_ba > 0.5) and p_ab != 0.5 and p_ba != 0.5
    return Verdict(p_a=p, confidence=max(p, 1 - p), orders_agree=agree,
                   raw=f"{raw}; swapped P(1)={1 - p_ba:.4f}")


def generative_verdict(ab_text: str, ba_text: str | None) -> Verdict:
    votes_a = votes_b = 0
    reasons = []
    for text, a_is_first in ((ab_text, True), (ba_text, False)):
        if text is None:
            continue
        ranking, reason = parse_ranking(text)
        if ranking is None:
            reasons.append(reason)
            continue
        first_wins = ranking[0] == 1
        if first_wins == a_is_first:
            votes_a += 1
        else:
            votes_b += 1
    raw = ab_text if ba_text is None else f"{ab_text}\n---swapped---\n{ba_text}"
    if votes_a + votes_b == 0:
        return Verdict(reason=f"unparsable_judge:{reasons[0]}", raw=raw)
    orders = 2 if ba_text is not None else 1
    p_a = votes_a / (votes_a + votes_b)
    agree = None if (votes_a + votes_b) < orders else (votes_a == 0 or votes_b == 0)
    confidence = max(votes_a, votes_b) / orders
    return Verdict(p_a=p_a, confidence=confidence, orders_agree=agree, raw=raw,
                   one_order_unparsable=reasons[0] if reasons else None)


def decide(v: Verdict, cfg: JudgeConfig) -> tuple[bool | None, str | None]:
    """(a_wins, None) if the pair is kept, else (None, reason)."""
    if v.reason:
        return None, v.reason
    if v.p_a == 0.5:
        return None, "orders_disagree" if v.orders_agree is False else "tie"
    if cfg.require_agreement and v.orders_agree is not True:
        # Disagreement needs two verdicts; a pair with one unparsable order says so instead.
        if v.orders_agree is None and v.one_order_unparsable:
            return None, f"one_order_unparsable:{v.one_order_unparsable}"
        return None, "orders_disagree" if v.orders_agree is False else "single_order"
    if v.confidence < cfg.min_confidence:
        return None, "below_confidence"
    return v.p_a > 0.5, None
