"""Tokenisation and batching for preference (SimPO) and prompt-completion (SFT) training.

Prompt: the chat template over the user turn(s) with the assistant generation prompt, exactly what the
model saw when it generated. Response: what the template appends for the assistant turn, found as the
suffix of the template rendered over prompt + response. The suffix carries the model's own end-of-turn
token (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama-3, `<end_of_turn>` for Gemma), so training teaches
the model to stop where its template stops; text + `eos_token` would be wrong for chat models whose EOS is
not their end-of-turn token. Rendered text is tokenised without adding special tokens: the template already
wrote BOS where the model wants one.

A response cut at its max_tokens (kept by mode.truncation=keep_without_eos, marked by the shard's
`chosen_finish_reason` / `rejected_finish_reason` = "length") ends with its text: the end-of-turn suffix is
left out, so training never teaches the model to stop where the text was cut.

Labels are the input ids with prompt and padding positions set to -100: only response tokens count.

A micro-batch of B pairs is one forward pass over 2B sequences (the B chosen, then the B rejected), either
right-padded into a (2B, L) batch, or packed padding-free into a single (1, sum of lengths) row whose
position_ids restart at 0 for every sequence; transformers turns restarting position_ids into a
block-diagonal causal mask (sdpa / eager) or variable-length kernels (flash-attention 2), so packed
sequences never attend to each other and no compute is spent on pad tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

IGNORE = -100
log = logging.getLogger(__name__)


def _messages(value) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


def render_pair_ids(tokenizer, prompt: list[dict], response: list[dict],
                    complete: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the prompt with the generation prompt, then the template's assistant turn.

    complete=False (a response cut at max_tokens, kept by mode.truncation=keep_without_eos): the response
    ends with its text; the template's end-of-turn suffix (`<|im_end|>\\n`, `<|eot_id|>`, ...) is not
    appended, so no loss ever teaches the model to stop where the text was cut. Leaving it out (rather than
    appending it with label -100) keeps the sequence exactly what the model generated and adds no tokens
    that only cost compute.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    content = "".join(m["content"] for m in response)
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text):]
        if not complete:
            response_text = _without_end_of_turn(response_text, content)
    else:
        # A template that renders earlier turns differently once an assistant turn follows (e.g. one that
        # strips reasoning): no clean suffix exists, so fall back to the text + EOS and say so.
        log.warning("chat template of %s does not extend the prompt when the answer is added; "
                    "training on answer text + eos_token instead", getattr(tokenizer, "name_or_path", "?"))
        response_text = content + ((tokenizer.eos_token or "") if complete else "")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode(prompt_text), encode(response_text)


def _without_end_of_turn(response_text: str, content: str) -> str:
    """The assistant turn up to the end of its text: what the template wrote after the text is cut off.

    The text is found as the last occurrence of the (right-stripped) content; a template that rewrote the
    content beyond recognition falls back to the content alone."""
    body = content.rstrip()
    end = response_text.rfind(body) if body else -1
    return response_text[:end + len(body)] if end >= 0 else content


def truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[list[int]]]:
    """SimPO-reference truncation (TRL's DPO tokenize_row, truncation_mode keep_end).

    If prompt + longest response exceeds max_length: keep the last max_prompt_length prompt tokens (the end
    of a prompt holds the question and the generation prompt); if that still does not fit, cut every
    response to max_length - max_prompt_length tokens.
    """
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
    """One training sequence: input ids and labels of equal length (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def build(prompt_ids: list[int], response_ids: list[int]) -> Example:
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids)


def is_complete(row: dict, column: str) -> bool:
    """Whether the response of `column` ended on its own. Only an explicit "length" is a cut response:
    shards written before finish reasons were recorded (no column, or null) read as complete, which is
    how they were trained before."""
    return row.get(column) != "length"


def preference_examples(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> tuple[Example, Example]:
    """(chosen, rejected) sequences of one TRL conversational preference row. `chosen_finish_reason` /
    `rejected_finish_reason` = "length" leave out that response's end-of-turn tokens; other columns are ignored."""
    prompt = _messages(row["prompt"])
    p, c = render_pair_ids(tokenizer, prompt, _messages(row["chosen"]), is_complete(row, "chosen_finish_reason"))
    _, r = render_pair_ids(tokenizer, prompt, _messages(row["rejected"]), is_complete(row, "rejected_finish_reason"))
    p, (c, r) = truncate(p, [c, r], max_length, max_prompt_length)
    return build(p, c), build(p, r)


def sft_example(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> Example:
    """The sequence of one TRL prompt-completion row (conversational `prompt` and `completion`;
    `completion_finish_reason` = "length" leaves out the end-of-turn tokens)."""
    p, c = render_pair_ids(tokenizer, _messages(row["prompt"]), _messages(row["completion"]),
                           is_complete(row, "completion_finish_reason"))
    p, (c,) = truncate(p, [c], max_length, max_prompt_length)
    return build(p, c)


def collate_padded(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into a (N, L) batch: pads get attention 0 and label -100."""
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


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Pack into one (1, T) row; position_ids restart per sequence; sequence_index maps tokens to examples.

    The first label of every sequence is -100: in a packed row the previous sequence's last position would
    otherwise "predict" it (in a padded batch that label is never used either).
    """
    ids, labels, positions, index = [], [], [], []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]
        positions += range(n)
        index += [i] * n
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "sequence_index": torch.tensor(index)}


def collate(examples: list[Example], pad_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
    return collate_packed(examples) if padding_free else collate_padded(examples, pad_id)


def num_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-pad) tokens of a collated batch."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def response_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per sequence, in collate order.

    Position t predicts token t + 1. cross_entropy with ignore_index gives -log p of each target without
    a second vocabulary-sized log-softmax tensor; logits are upcast to fp32 as in the SimPO reference.
    """
    logits, targets = logits[:, :-1, :], batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").view(targets.shape)
    counted = targets != IGNORE
    if "sequence_index" not in batch:  # padded: one sequence per row
        return -nll.sum(-1), counted.sum(-1)
    seq = batch["sequence_index"][1:].to(logits.device)  # the sequence each target token belongs to
    n = int(batch["sequence_index"][-1]) + 1
    sums = torch.zeros(n, dtype=nll.dtype, device=nll.device).index_add(0, seq, -nll[0])
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add(0, seq, counted[0].long())
    return sums, counts
