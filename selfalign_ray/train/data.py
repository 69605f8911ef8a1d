"""Tokenisation for preference (SimPO) and prompt-completion (SFT) training.

The prompt is the chat template applied to the user turn(s) with the assistant generation prompt;
a response is what the template appends for the assistant turn (its text plus the model's own
end-of-turn token, e.g. `<|im_end|>`), found as the suffix of the template over prompt + response.
Prompt and padding positions get label -100, so only response tokens count in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def _messages(value) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


def render_pair_ids(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) where response ids are the template's assistant turn."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text):]
    else:  # a template that rewrites earlier turns: fall back to the text + EOS
        response_text = "".join(m["content"] for m in response) + (tokenizer.eos_token or "")
    enc = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return enc(prompt_text), enc(response_text)


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int):
    """SimPO-reference truncation: if prompt + longest response is too long, keep the END of the
    prompt (max_prompt_length tokens), then cut responses to max_length - max_prompt_length."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longest > max_length:
        responses = [r[: max_length - max_prompt_length] for r in responses]
    return prompt_ids, responses


@dataclass
class Example:
    """One training sequence: input ids and labels of equal length."""

    input_ids: list[int]
    labels: list[int]


def build(prompt_ids: list[int], response_ids: list[int]) -> Example:
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)


def preference_examples(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> tuple[Example, Example]:
    prompt = _messages(row["prompt"])
    p, c = render_pair_ids(tokenizer, prompt, _messages(row["chosen"]))
    _, r = render_pair_ids(tokenizer, prompt, _messages(row["rejected"]))
    p, (c, r) = truncate(p, [c, r], max_length, max_prompt_length)
    return build(p, c), build(p, r)


def sft_example(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> Example:
    p, c = render_pair_ids(tokenizer, _messages(row["prompt"]), _messages(row["completion"]))
    p, (c,) = truncate(p, [c], max_length, max_prompt_length)
    return build(p, c)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into one batch (pads: label -100, attention 0)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per row.

    Position t predicts token t+1. cross_entropy with ignore_index avoids materialising a second
    vocabulary-sized log-softmax tensor.
    """
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(-1)
    return -nll.sum(-1), counts
