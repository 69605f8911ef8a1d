"""Strict parsers for model outputs: the instruct stage's "User prompt:" and the judge's ranking.

Each parser returns (value, None) or (None, reason); reasons are short stable strings that end up
counted in the manifest and written next to the raw output in `rejects/`.
"""

from __future__ import annotations

import re

from selfalign_ray.sao.templates import PROMPT_PREFIX

# "User prompt:" as models decorate it: `**User prompt:**`, `*User prompt*:`, `User prompt: "`. After the colon
# only markdown emphasis and whitespace belong to the prefix, never `\W*`: a prompt's own first characters
# ("-5 + 3 = ?", "(a) ...", "$x$ ...", a code fence) are punctuation too.
_LABEL = re.escape(PROMPT_PREFIX.rstrip(":")).replace(r"\ ", r"\s*") + r"[*_]*\s*:[*_]*\s*"
_PREFIX_RE = re.compile(r"^[\W_]*?" + _LABEL, re.IGNORECASE)
_ANYWHERE_RE = re.compile(_LABEL, re.IGNORECASE)
_TEMPLATE_ECHO = "guess a prompt that the following persona"
# Separators are one class ([\s*]*, spaces and markdown stars in any mix), never `\s*\**\s*`: adjacent
# optional runs made a long run of spaces backtrack polynomially (8,000 spaces after "ranking:" took 15 s).
# Markdown emphasis (`*`, `_`) may wrap the word "ranking" too (`**ranking**: 2 > 1`, `_Ranking:_ 1 > 2`); the
# word, the colon, the two numbers and ">" must all be there, so nothing is guessed.
_RANKING_RE = re.compile(r"ranking[*_]*\s*[:：][\s*_]*(?:response\s*)?(\d+)[\s*_]*>[\s*_]*(?:response\s*)?(\d+)",
                         re.IGNORECASE)


def strip_prompt_prefix(text: str, require_prefix: bool = True, min_chars: int = 10) -> tuple[str | None, str | None]:
    """The user prompt written by the instruct stage, without its "User prompt:" prefix.

    Accepts the prefix at the start (after quotes / markdown such as `**User prompt:**`). With
    `require_prefix=False`, a prefix later in the text is also accepted, and text without any prefix
    is taken whole (small models often skip it).
    """
    body = text.strip()
    match = _PREFIX_RE.match(body)
    if match:
        body = body[match.end():]
    elif require_prefix:
        return None, "missing_prefix"
    else:
        later = _ANYWHERE_RE.search(body)
        if later:
            body = body[later.end():]
    body = body.strip().strip('"“”').strip()
    if not body:
        return None, "empty_prompt"
    if _TEMPLATE_ECHO in body.lower():
        return None, "echoed_template"
    if len(body) < min_chars:
        return None, "too_short"
    return body, None


def parse_ranking(text: str) -> tuple[tuple[int, int] | None, str | None]:
    """Parse `ranking: X > Y` with {X, Y} = {1, 2}. Never guesses.

    Reasons: no_ranking (no such line), invalid_option (a number other than 1/2), repeated_option
    (X == Y), conflicting_rankings (two different rankings in one answer).
    """
    found = _RANKING_RE.findall(text)
    if not found:
        return None, "no_ranking"
    rankings = {(int(a), int(b)) for a, b in found}
    if len(rankings) > 1:
        return None, "conflicting_rankings"
    first, second = rankings.pop()
    if first not in (1, 2) or second not in (1, 2):
        return None, "invalid_option"
    if first == second:
        return None, "repeated_option"
    return (first, second), None
