"""The two prompts of the SynPO method, as published, and the SFT targets built from them.

Source: Dong et al., "Self-Boosting Large Language Models with Synthetic Preference Data",
arXiv:2410.06961v1 — QUESTION_TEMPLATE is Figure 3 ("Question Generation Prompt", the self-prompt
generator), IMPROVER_TEMPLATE is Figure 7 (Appendix B, "Self-Improver Prompt", the response improver).
The wording is the paper's, copied from the paper's text as stored in the public code index used by
this project (found with find_string "GENERATED QUESTION & CORRECT SOLUTION", a text extraction of
arXiv 2410.06961; Figure 3 and Appendix B, Figure 7), not recalled; only the line breaks, lost in the
extraction, are restored from the figures' section headers. The PDF text shows the solution's
opening tag as "</solution>", an extraction slip: the format is <question>…</question> <solution>…</solution>.
"""

from __future__ import annotations

QUESTION_TEMPLATE = """## Background
Design ONE question/instruction (and its solution) with given keywords.
### Requirements
The question/instruction should try to contain the keywords in '## Given Keywords'. The solution MUST BE CORRECT, including detailed reasoning steps and dense knowledge.
## Given Keywords
{keywords}
## Output Format
== GENERATED QUESTION & CORRECT SOLUTION ==
<question> question content ... </question>
<solution> correct solution ... </solution>
## Output
== GENERATED QUESTION & CORRECT SOLUTION =="""

IMPROVER_TEMPLATE = """You are a smart AI assistant. For a given question-answer pair, improve the answer by correcting errors, bolstering informativeness, aligning with the question, and providing comprehensive detail.

Given Question: {question}
Original Answer: {answer}
Rewritten Answer:"""

QUESTION_OPEN, QUESTION_CLOSE = "<question>", "</question>"
SOLUTION_OPEN, SOLUTION_CLOSE = "<solution>", "</solution>"


def generator_prompt(keywords: str) -> str:
    """The user turn of the self-prompt generator for a keyword list written as "kw1, kw2, kw3"."""
    return QUESTION_TEMPLATE.format(keywords=keywords)


def generator_target(question: str, solution: str) -> str:
    """The assistant turn the generator is trained to write: a seed prompt and its answer in the output format."""
    return f"{QUESTION_OPEN} {question.strip()} {QUESTION_CLOSE}\n{SOLUTION_OPEN} {solution.strip()} {SOLUTION_CLOSE}"


def improver_prompt(question: str, answer: str) -> str:
    """The user turn of the response improver: a question and the answer to rewrite."""
    return IMPROVER_TEMPLATE.format(question=question.strip(), answer=answer.strip())
