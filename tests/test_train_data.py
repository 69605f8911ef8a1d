"""Tokenisation for training: chat template, masking, SimPO-style truncation."""

import pytest
import torch

from selfalign_ray.train.data import (
    IGNORE,
    Example,
    collate,
    num_tokens,
    preference_examples,
    render_pair_ids,
    response_logps,
    truncate,
)


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
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([5, 6], [IGNORE, 6])], pad_id=0, padding_free=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 6, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert num_tokens(batch) == 5
    logits = torch.zeros(2, 3, 8)
    logits[0, 0, 6] = logits[0, 1, 7] = logits[1, 0, 6] = 5.0
    sums, counts = response_logps(logits, batch)
    expected = torch.log_softmax(logits[0, 0], -1)[6]
    assert counts.tolist() == [2, 1]
    assert sums[0].item() == pytest.approx(2 * expected.item(), abs=1e-5)
    assert sums[1].item() == pytest.approx(expected.item(), abs=1e-5)


def test_packed_row_restarts_positions_and_masks_each_first_label():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [8, 9])], pad_id=0, padding_free=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of the second sequence must not be "predicted" by the last token of the first.
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["sequence_index"].tolist() == [0, 0, 0, 1, 1]
    assert num_tokens(batch) == 5


def test_packed_and_padded_batches_give_the_same_logps_on_a_real_model(tiny_model_path, tok):
    """The padding-free path is an optimisation only: same per-sequence log-probs as right padding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa").eval()
    rows = [ROW, {"prompt": [{"role": "user", "content": "Say hi to the team, briefly please."}],
                  "chosen": [{"role": "assistant", "content": "Hi team!"}],
                  "rejected": [{"role": "assistant", "content": "Hello everybody, how are you all today?"}]}]
    pairs = [preference_examples(tok, r, max_length=128, max_prompt_length=64) for r in rows]
    examples = [c for c, _ in pairs] + [r for _, r in pairs]
    results = []
    for packed in (False, True):
        batch = collate(examples, pad_id=tok.pad_token_id or 0, padding_free=packed)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        results.append(response_logps(logits, batch))
    (pad_sums, pad_counts), (pack_sums, pack_counts) = results
    assert pad_counts.tolist() == pack_counts.tolist()
    assert torch.allclose(pad_sums, pack_sums, atol=1e-4), (pad_sums, pack_sums)
