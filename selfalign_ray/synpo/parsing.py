"""Parse the self-prompt generator's output: the text between <question> and </question>.

Returns (question, None) or (None, reason); reasons are short stable strings counted in the manifest
and written next to the raw output in `rejects/`:

- no_question_tag        no <question> tag (with require_tags=False the whole text before any
                         <solution> is taken instead, like SAO's require_prefix=false)
- unterminated_question  the output was cut by max_tokens inside the question (no </question>)
- empty_question         the tags hold nothing
- echoed_template        the model copied the template (its placeholder or its headers)
- too_short              fewer than `min_chars` characters
"""

from __future__ import annotations

import re

_OPEN = re.compile(r"<\s*question\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*question\s*>", re.IGNORECASE)
_SOLUTION = re.compile(r"<\s*/?\s*solution\s*>", re.IGNORECASE)
_HEADER = re.compile(r"=+\s*GENERATED QUESTION & CORRECT SOLUTION\s*=+", re.IGNORECASE)
_ECHOES = ("question content ...", "question content…", "design one question", "## given keywords",
           "## output format")


def parse_question(text: str, stopped_at_close: bool = False, require_tags: bool = True,
                   min_chars: int = 10) -> tuple[str | None, str | None]:
    """The generated question.

    stopped_at_close: generation was stopped by the stop string "</question>", which engines cut
    from the text (vLLM and the hf engine alike), so a missing closing tag is expected then.
    """
    body = _HEADER.sub("", text)
    opening = _OPEN.search(body)
    if opening:
        rest = body[opening.end():]
        closing = _CLOSE.search(rest) or _SOLUTION.search(rest)
        if closing:
            body = rest[:closing.start()]
        elif stopped_at_close:
            body = rest
        else:
            return None, "unterminated_question"
    elif require_tags:
        return None, "no_question_tag"
    else:
        cut = _CLOSE.search(body) or _SOLUTION.search(body)
        body = body[:cut.start()] if cut else body
    body = body.strip().strip('"“”').strip()
    if not body:
        return None, "empty_question"
    lowered = body.lower()
    if any(echo in lowered for echo in _ECHOES):
        return None, "echoed_template"
    if len(body) < min_chars:
        return None, "too_short"
    return body, None
