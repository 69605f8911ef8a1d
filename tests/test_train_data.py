"""Tokenisation for training: chat template, masking, SimPO-style truncation."""

import pytest
import torch

from selfalign_ray.train.data import IGNORE, collate, preference_examples, render_pair_ids, sequence_logps, truncate


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


ROW = {"prompt": [{"role": "user", "content": "Name a prime."}],
       "chosen": [{"role": "assistant", "content": "Seven."}],
       "rejected": [{"role": "assistant", "content": "Nine, I think."}]}


def test_response_is_the_templates_assistant_turn_with_end_of_turn(tok):
    p, r = render_pair_ids(tok, ROW["prompt"], ROW["chosen"])
    assert tok.decode(p) == "<|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(r) == "Seven.<|im_end|>\n"


def test_prompt_is_masked_and_response_is_labelled(tok):
    chosen, rejected = preference_examples(tok, ROW, max_length=128, max_prompt_length=64)
    p, c = render_pair_ids(tok, ROW["prompt"], ROW["chosen"])
    assert chosen.input_ids == p + c
    assert chosen.labels == [IGNORE] * len(p) + c
    assert rejected.input_ids[: len(p)] == p and rejected.labels[: len(p)] == [IGNORE] * len(p)


def test_truncation_keeps_prompt_end_then_cuts_responses():
    prompt = list(range(100, 130))          # 30 tokens
    responses = [list(range(10)), list(range(20, 45))]  # 10 and 25 tokens
    p, (a, b) = truncate(prompt, responses, max_length=40, max_prompt_length=16)
    assert p == list(range(114, 130))        # the last 16 prompt tokens
    assert a == list(range(10))               # 16 + 10 <= 40: kept whole
    assert b == list(range(20, 44))           # cut to 40 - 16 = 24 tokens
    # Fits already: nothing is cut.
    assert truncate(prompt[:5], [[1, 2]], 40, 16) == (prompt[:5], [[1, 2]])
    with pytest.raises(ValueError, match="must be < max_length"):
        truncate(prompt, responses, max_length=16, max_prompt_length=16)


def test_collate_pads_with_ignored_labels_and_logps_count_response_tokens_only():
    from selfalign_ray.train.data import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([5, 6], [IGNORE, 6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 6, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    logits = torch.zeros(2, 3, 8)
    logits[0, 0, 6] = logits[0, 1, 7] = logits[1, 0, 6] = 5.0
    sums, counts = sequence_logps(logits, batch["labels"])
    expected = torch.log_softmax(logits[0, 0], -1)[6]
    assert counts.tolist() == [2, 1]
    assert sums[0].item() == pytest.approx(2 * expected.item(), abs=1e-5)
    assert sums[1].item() == pytest.approx(expected.item(), abs=1e-5)
