"""Pairwise win rate of model A against model B, with a confidence interval.

Per prompt the judge sees both presentation orders (A first, then B first). Following MT-Bench's pairwise
protocol (Zheng et al., 2023), A *wins* only if both orders prefer A, *loses* only if both prefer B, and
everything else (the orders disagree, or only one order gave a verdict) is a *tie*: a judge whose answer
flips with the order has shown position bias, not a preference. Prompts where no order gave a verdict are
*unjudged* and left out. An answer that is missing (empty, or the prompt did not fit) loses to a present
one without judging; two missing answers tie.

win rate = (wins + ties / 2) / (wins + ties + losses)

Confidence interval (level 0.95 by default):
- `wilson` (default): the Wilson score interval on the win rate with ties as half a win. Closed form, good at
  small n and near 0 or 1. Ties vary less than a coin flip, so with many ties it is conservative (too wide).
- `bootstrap`: percentile bootstrap over prompts (outcomes 1 / 0.5 / 0 resampled with replacement, seeded):
  follows the actual spread of the outcomes, ties included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

WIN, TIE, LOSS = 1.0, 0.5, 0.0
CI_METHODS = ("wilson", "bootstrap")


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int
    unjudged: int
    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    ci_method: str
    level: float

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    def to_json(self) -> dict:
        return {**asdict(self), "judged": self.judged}


def outcome(p_a: float | None, orders_agree: bool | None) -> float | None:
    """One prompt's outcome for A from a debiased verdict (sao/judge.py): 1 win, 0.5 tie, 0 loss, None unjudged."""
    if p_a is None:
        return None
    if orders_agree is True and p_a != 0.5:
        return WIN if p_a > 0.5 else LOSS
    return TIE


def wilson(score: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `score` observed over `n` trials."""
    if n <= 0:
        raise ValueError("wilson interval needs n > 0")
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    denom = 1 + z * z / n
    center = (score + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap(outcomes: list[float], level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean outcome."""
    import numpy as np

    x = np.asarray(outcomes, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(outcomes: list[float | None], method: str = "wilson", level: float = 0.95,
             samples: int = 2000, seed: int = 0) -> WinRate:
    if method not in CI_METHODS:
        raise ValueError(f"ci method {method!r}: use one of {', '.join(CI_METHODS)}")
    if not 0 < level < 1:
        raise ValueError(f"ci level must be in (0, 1), got {level}")
    judged = [o for o in outcomes if o is not None]
    wins, ties = judged.count(WIN), judged.count(TIE)
    losses = len(judged) - wins - ties
    rate = low = high = None
    if judged:
        rate = (wins + ties / 2) / len(judged)
        low, high = wilson(rate, len(judged), level) if method == "wilson" else bootstrap(judged, level, samples, seed)
    return WinRate(wins=wins, ties=ties, losses=losses, unjudged=len(outcomes) - len(judged), win_rate=rate,
                   ci_low=low, ci_high=high, ci_method=method, level=level)
