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


def choice_token_ids(tokenizer, context_text: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each choice as it continues that context.

    BPE may merge the last context token with the start of a choice ("...: 1" vs "...:" + " 1"), so
    each choice is tokenised together with the context and its ids are the suffix after the context's
    ids. If the joint tokenisation changes the context's own ids, we fall back to tokenising the choice
    alone, which is what a sampler would emit after the context.
    """
    context_ids = encode(tokenizer, context_text)
    per_choice = []
    for choice in choices:
        joint = encode(tokenizer, context_text + choice)
        if joint[: len(context_ids)] == context_ids and len(joint) > len(context_ids):
            per_choice.append(joint[len(context_ids):])
        else:
            per_choice.append(encode(tokenizer, choice))
        if not per_choice[-1]:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
    return context_ids, per_choice
