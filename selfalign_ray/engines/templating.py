"""Chat templating and choice tokenisation shared by both engines, so they feed identical token ids."""

from __future__ import annotations

from typing import Sequence

from selfalign_ray.engines.base import Chat, ChoiceScores


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


def too_long_error(n_tokens: int, max_model_len: int, reserve: int) -> str | None:
    """The per-row error for a prompt that leaves fewer than `reserve` tokens of context."""
    limit = max_model_len - reserve
    if n_tokens > limit:
        return f"prompt_too_long: {n_tokens} tokens > limit {limit} (engine.max_model_len={max_model_len})"
    return None


def plan_choice_scoring(tokenizer, chats: Sequence[Chat], choices: Sequence[str], answer_prefix: str,
                        max_model_len: int):
    """Split scoring requests the way both engines run them.

    Returns (results, single, multi): `results[i]` is the ChoiceScores to fill for chat i (with
    `error` set for rows that do not fit); `single` holds (i, context ids, one token id per choice)
    for rows whose choices are single tokens after one shared context (one forward pass each);
    `multi` holds (i, [(context ids, choice ids) per choice]) for the rest.
    """
    results, single, multi = [], [], []
    for i, chat in enumerate(chats):
        context = render_prompt(tokenizer, chat) + answer_prefix
        split = choice_token_ids(tokenizer, context, choices)
        res = ChoiceScores(prompt_tokens=len(encode(tokenizer, context)))
        results.append(res)
        res.error = too_long_error(max(len(c) + len(t) for c, t in split), max_model_len, reserve=0)
        if res.error:
            continue
        if len({tuple(c) for c, _ in split}) == 1 and all(len(t) == 1 for _, t in split):
            single.append((i, split[0][0], [t[0] for _, t in split]))
        else:
            multi.append((i, split))
    return results, single, multi
