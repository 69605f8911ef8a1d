"""Chat templating and choice tokenisation shared by both engines, so they feed identical token ids."""

from __future__ import annotations

from typing import Sequence

from selfalign_ray.engines.base import Chat


def render_prompt(tokenizer, chat: Chat) -> str:
    """The model's own chat template with the assistant generation prompt appended."""
    return tokenizer.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    # The template already holds every special token the model expects (BOS included where the
    # template has one), so the tokenizer must not add its own.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_token_ids(tokenizer, context_text: str, choices: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """For each choice: (context ids, choice ids) such that context + choice == the joint tokenisation.

    BPE may merge the end of the context with the start of a choice ("ranking: " + "1" becomes
    "ranking:" + " 1"). Tokenising each choice jointly with its context and splitting at the longest
    common prefix with the context alone scores exactly the tokens a sampler would emit to write
    the choice after the context.
    """
    context_ids = encode(tokenizer, context_text)
    out = []
    for choice in choices:
        joint = encode(tokenizer, context_text + choice)
        common = 0
        while common < min(len(joint), len(context_ids)) and joint[common] == context_ids[common]:
            common += 1
        if common == len(joint):
            raise ValueError(f"choice {choice!r} adds no tokens after the context")
        out.append((joint[:common], joint[common:]))
    return out
