"""SAO templates and the strict parsers of model outputs."""

import pytest

from selfalign_ray.sao.parsing import parse_ranking, strip_prompt_prefix
from selfalign_ray.sao.templates import RANKING_ANSWER_PREFIX, instruction_prompt, ranking_prompt


def test_instruction_template_renders_persona_hub_wording():
    text = instruction_prompt("A beekeeper in Wales.")
    assert text.startswith("Guess a prompt that the following persona may ask you to do:\n\nA beekeeper in Wales.\n\nNote:")
    assert text.endswith('2. Your output should start with "User prompt:"')


def test_ranking_template_places_responses_and_demands_format():
    text = ranking_prompt("Fix my bike", "Use a wrench.", "No idea.")
    assert "Prompt: Fix my bike" in text
    assert "Response 1: <Response 1> Use a wrench. </Response 1>" in text
    assert "Response 2: <Response 2> No idea. </Response 2>" in text
    assert "ranking: X > Y" in text and text.rstrip().endswith("provide your ranking:")
    assert RANKING_ANSWER_PREFIX == "ranking: "


@pytest.mark.parametrize("raw, require, expected, reason", [
    ('User prompt: Plan a 3-day trip to Kyoto on a budget.', True, "Plan a 3-day trip to Kyoto on a budget.", None),
    ('**User prompt:** "Write a haiku about tax season."', True, "Write a haiku about tax season.", None),
    ('user prompt:Explain compound interest with an example.', True, "Explain compound interest with an example.", None),
    ('Sure! User prompt: Summarise the causes of WW1.', True, None, "missing_prefix"),
    ('Sure! User prompt: Summarise the causes of WW1.', False, "Summarise the causes of WW1.", None),
    ('Explain how vaccines train the immune system.', False, "Explain how vaccines train the immune system.", None),
    ('Explain how vaccines train the immune system.', True, None, "missing_prefix"),
    ('User prompt:   ', True, None, "empty_prompt"),
    ('', False, None, "empty_prompt"),
    ('User prompt: Hi', True, None, "too_short"),
    ('User prompt: Guess a prompt that the following persona may ask you to do: a nurse', True, None, "echoed_template"),
    # The prompt's own leading characters are not part of the prefix (markdown around the label is).
    ('**User prompt:** -5 + 3 = ?', True, "-5 + 3 = ?", None),
    ('User prompt: (a) Prove that 2 + 2 = 4.', True, "(a) Prove that 2 + 2 = 4.", None),
    ('User prompt: $x^2$ - what is its derivative?', True, "$x^2$ - what is its derivative?", None),
    ('User prompt:\n```python\nprint(1)\n```\nWhy does this print 1?', True,
     "```python\nprint(1)\n```\nWhy does this print 1?", None),
    ('*User prompt*: -1 times -1 is what?', True, "-1 times -1 is what?", None),
    ('Sure! **User prompt:** -5 + 3 = ?', False, "-5 + 3 = ?", None),
])
def test_strip_prompt_prefix(raw, require, expected, reason):
    assert strip_prompt_prefix(raw, require_prefix=require, min_chars=10) == (expected, reason)


@pytest.mark.parametrize("answer, expected, reason", [
    ("ranking: 1 > 2", (1, 2), None),
    ("ranking: 2 > 1", (2, 1), None),
    ("Ranking: 2>1\nResponse 2 is more specific.", (2, 1), None),
    ("After reading both, ranking: **1** > **2**", (1, 2), None),
    ("ranking: Response 2 > Response 1", (2, 1), None),
    ("Both are good answers.", None, "no_ranking"),
    ("Response 1 is better.", None, "no_ranking"),
    ("ranking: 1 > 1", None, "repeated_option"),
    ("ranking: 3 > 1", None, "invalid_option"),
    ("ranking: 1 > 2 ... actually ranking: 2 > 1", None, "conflicting_rankings"),
    ("ranking: X > Y", None, "no_ranking"),
    ("1 > 2", None, "no_ranking"),
    # Markdown around the label; still strict: label, colon, two numbers and ">" are all required.
    ("**ranking**: 2 > 1", (2, 1), None),
    ("**Ranking:** 1 > 2", (1, 2), None),
    ("_ranking_: __2__ > __1__", (2, 1), None),
    ("*ranking*: Response 1 > Response 2", (1, 2), None),
    ("**ranking** 2 > 1", None, "no_ranking"),
    ("**ranking**: 2 is better", None, "no_ranking"),
])
def test_parse_ranking_table(answer, expected, reason):
    assert parse_ranking(answer) == (expected, reason)
