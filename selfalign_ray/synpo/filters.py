"""Text measures used to filter synthetic pairs.

The paper drops "all the data that contain over 50% repetition patterns to avoid model collapse on
synthetic data" (App. C.3) without defining the measure. Here:

    repetition(text, n) = 1 - distinct word n-grams / all word n-grams

i.e. the share of n-gram occurrences that repeat an earlier one. Words are lower-cased runs of letters
and digits (punctuation ignored), n = 3 by default: a sentence said twice scores about 0.5, a loop of one
phrase approaches 1.0, ordinary prose stays near 0. A text shorter than n words scores 0 (nothing can
repeat). Word n-grams, not characters, so that long words or code identifiers do not count as repetition.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def repetition_rate(text: str, n: int = 3) -> float:
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
