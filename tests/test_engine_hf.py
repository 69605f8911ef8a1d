"""The hf engine against the Engine contract, on the tiny random model."""

import pytest
import torch

from selfalign_ray.engines import EngineConfig, SamplingSpec, make_engine
from selfalign_ray.engines.templating import encode, render_prompt

CHATS = [[{"role": "user", "content": "Plan a picnic."}],
         [{"role": "user", "content": "Explain gravity to a child in two sentences, please."}]]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return make_engine(tiny_model_path, EngineConfig(kind="hf", max_model_len=256, batch_size=4))


def test_generate_shapes_counts_and_finish(engine):
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=12)
    results = engine.generate(CHATS, spec, seeds=[1, 2])
    assert [len(r.completions) for r in results] == [3, 3]
    for chat, r in zip(CHATS, results):
        assert r.prompt_tokens == len(encode(engine.tokenizer, render_prompt(engine.tokenizer, chat)))
        for c in r.completions:
            assert 1 <= c.num_tokens <= 12
            assert c.finish_reason == ("length" if c.num_tokens == 12 else "stop")
    assert results[0].output_tokens == sum(c.num_tokens for c in results[0].completions)


def test_seeded_rows_do_not_depend_on_batch_mates(engine):
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=16)
    together = engine.generate(CHATS, spec, seeds=[5, 6])
    alone = engine.generate(CHATS[1:], spec, seeds=[6])
    assert [c.text for c in alone[0].completions] == [c.text for c in together[1].completions]
    other = engine.generate(CHATS[1:], spec, seeds=[7])
    assert [c.text for c in other[0].completions] != [c.text for c in alone[0].completions]


def test_ignore_eos_gives_exact_lengths_and_greedy_is_deterministic(engine):
    r = engine.generate(CHATS, SamplingSpec(n=1, temperature=0.0, max_tokens=9, ignore_eos=True))
    assert [c.num_tokens for x in r for c in x.completions] == [9, 9]
    again = engine.generate(CHATS, SamplingSpec(n=1, temperature=0.0, max_tokens=9, ignore_eos=True))
    assert [c.text for x in r for c in x.completions] == [c.text for x in again for c in x.completions]


def test_stop_string_ends_completion_without_the_stop_text(engine):
    free = engine.generate(CHATS[:1], SamplingSpec(temperature=0.0, max_tokens=24, ignore_eos=True))[0].completions[0]
    stop = free.text[3:5]
    assert stop, "greedy sample too short to pick a stop string"
    cut = engine.generate(CHATS[:1], SamplingSpec(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    c = cut[0].completions[0]
    assert c.finish_reason == "stop" and c.text == free.text[: free.text.find(stop)]


def test_too_long_prompt_is_a_row_error_not_a_crash(engine):
    long_chat = [{"role": "user", "content": "word " * 400}]
    results = engine.generate([long_chat, CHATS[0]], SamplingSpec(max_tokens=4), seeds=[0, 0])
    assert results[0].error.startswith("prompt_too_long") and results[0].completions == []
    assert len(results[1].completions) == 1 and results[1].error is None
    scores = engine.score_choices([long_chat], ["1", "2"], answer_prefix="ranking: ")
    assert scores[0].error.startswith("prompt_too_long")


def test_new_tokens_fit_the_context_window(engine):
    # engine.max_model_len=256: a prompt of P tokens leaves 256 - P new tokens, however large max_tokens is,
    # and a completion stopped by that cap is "length". The short prompt in the same call keeps max_tokens.
    long_chat = [{"role": "user", "content": "word " * 60}]
    n_prompt = len(encode(engine.tokenizer, render_prompt(engine.tokenizer, long_chat)))
    room = 256 - n_prompt
    assert 0 < room < 100, n_prompt
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=100, ignore_eos=True)
    cut, short = engine.generate([long_chat, CHATS[0]], spec, seeds=[3, 4])
    assert [(c.num_tokens, c.finish_reason) for c in cut.completions] == [(room, "length")] * 2
    assert [c.num_tokens for c in short.completions] == [100, 100]
    # The same rows generated alone: grouping by cap does not change a seeded row's text.
    alone = engine.generate([long_chat], spec, seeds=[3])[0]
    assert [c.text for c in alone.completions] == [c.text for c in cut.completions]


def _reference_logprob(engine, chat, prefix, choice):
    """Sum of log P(token) over the tokens that the joint tokenisation adds beyond the context."""
    ctx = encode(engine.tokenizer, render_prompt(engine.tokenizer, chat) + prefix)
    full = encode(engine.tokenizer, render_prompt(engine.tokenizer, chat) + prefix + choice)
    common = next(i for i in range(len(full)) if i >= len(ctx) or full[i] != ctx[i])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logp[p - 1, full[p]]) for p in range(common, len(full)))


@pytest.mark.parametrize("choices", [("1", "2"), ("1 > 2", "2 > 1")])
def test_score_choices_match_a_plain_forward_pass(engine, choices):
    # Batched with left padding (two prompts of different lengths) vs each sequence alone.
    scores = engine.score_choices(CHATS, list(choices), answer_prefix="ranking: ")
    for chat, s in zip(CHATS, scores):
        assert s.error is None
        for choice in choices:
            assert s.logprobs[choice] == pytest.approx(_reference_logprob(engine, chat, "ranking: ", choice), abs=1e-4)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)])
def test_sampler_draws_follow_the_tempered_top_p_distribution(temperature, top_p):
    """4000 rows with their own seeds, one step each: token frequencies match
    softmax(logits / T) renormalised over the smallest top-p prefix, and tokens outside it never appear."""
    from selfalign_ray.engines.hf import _PerRowSampler

    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p  # mass before the token is below top_p
    want = torch.zeros_like(probs)
    want[order[keep]] = sorted_probs[keep]
    want /= want.sum()

    rows = 4000
    gens = [torch.Generator().manual_seed(s) for s in range(rows)]
    sampler = _PerRowSampler(gens, temperature, top_p, prompt_width=3, max_new=1, device=torch.device("cpu"))
    out = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1).clone())
    chosen = out.argmax(dim=-1)
    assert torch.isfinite(out).sum() == rows  # exactly one allowed token per row
    freq = torch.bincount(chosen, minlength=len(logits)).double() / rows
    assert (freq[want == 0] == 0).all()
    # Binomial standard error at n=4000 is <= 0.008; allow 4 of them.
    assert torch.allclose(freq, want.double(), atol=0.032), (freq, want)
