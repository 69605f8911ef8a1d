"""SynPO stages on a scripted engine (no Ray, no model), the pool chain, and the cumulative dataset."""

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.data.schema import PAIR_SCHEMA, assistant_turn, prompt_id, user_turn
from selfalign_ray.engines.base import ChoiceScores, Completion, GenerationResult
from selfalign_ray.engines.factory import EngineConfig
from selfalign_ray.generation.assemble import PairAssembler
from selfalign_ray.generation.rows import with_status_columns
from selfalign_ray.sao.stages import SamplingConfig
from selfalign_ray.synpo.chain import build_chain
from selfalign_ray.synpo.dataset import add_pairs, cumulative_files, earlier_prompt_ids
from selfalign_ray.synpo.pipeline import Models, SkipEarlierPrompts, pair_chain
from selfalign_ray.synpo.stages import (
    AnswerStage,
    ImproveStage,
    PairFilterStage,
    PreferenceStage,
    QuestionStage,
)
from selfalign_ray.synpo.templates import QUESTION_CLOSE


class ScriptedEngine:
    """Answers generate() from a function of the user message; score_choices() from a function of the chat."""

    model_path = "scripted"

    def __init__(self, reply=None, finish="stop", prefers_first=0.8):
        self.reply, self.finish, self.prefers_first = reply, finish, prefers_first
        self.specs, self.chats = [], []

    def generate(self, chats, spec, seeds=None):
        self.specs.append(spec)
        self.chats += chats
        out = []
        for chat in chats:
            text = self.reply(chat[-1]["content"])
            if text is None:
                out.append(GenerationResult(prompt_tokens=5000, error="prompt_too_long: 5000 tokens > limit 2047"))
            else:
                out.append(GenerationResult(prompt_tokens=7, completions=[Completion(text, len(text.split()), self.finish)]))
        return out

    def score_choices(self, chats, choices, answer_prefix=""):
        # Position-biased judge: always likes "1" by `prefers_first`, plus whether "GOOD" is shown first.
        out = []
        self.chats += chats
        for chat in chats:
            text = chat[-1]["content"]
            good_first = text.find("GOOD") >= 0 and (text.find("GOOD") < text.find("Response 2:"))
            p1 = min(0.99, self.prefers_first * (1.0 if good_first else 0.5))
            out.append(ChoiceScores(prompt_tokens=11, logprobs={"1": math.log(p1), "2": math.log(1 - p1)}))
        return out


def rows(**cols):
    n = len(next(iter(cols.values())))
    df = pd.DataFrame({"source_id": [f"s{i}" for i in range(n)], "iteration": 1, "mode": "synpo",
                       "source": "kw", **cols})
    return with_status_columns(df)


def test_question_stage_parses_and_drops():
    replies = {"alpha, beta, gamma": "<question> What links alpha and beta with gamma?",
               "cold, ice, snow": "### Question\nWhy is ice cold?",
               "x, y, z": None}
    engine = ScriptedEngine(reply=lambda msg: next(v for k, v in replies.items() if k in msg))
    df = rows(source=list(replies))
    out = QuestionStage(SamplingConfig(n=1, max_tokens=32), seed=0)(df, engine)
    assert engine.specs[0].stop == (QUESTION_CLOSE,)
    assert out["prompt_text"].tolist() == ["What links alpha and beta with gamma?", "", ""]
    assert out["reason"].tolist() == ["", "no_question_tag", "prompt_too_long"]
    assert out.loc[1, "raw"] == "### Question\nWhy is ice cold?"
    assert "## Given Keywords\nalpha, beta, gamma\n" in engine.chats[0][0]["content"]
    # Cut by max_tokens inside the question: truncated (mode.truncation=drop, the default).
    cut = QuestionStage(SamplingConfig(n=1), seed=0)(rows(source=["alpha, beta, gamma"]),
                                                      ScriptedEngine(lambda m: "<question> What links", finish="length"))
    assert cut.loc[0, "reason"] == "truncated_question"


def test_answer_improve_filter_and_judge_stages():
    df = rows(prompt_text=["Q1 about rivers?", "Q2 about hills?", "Q3 about lakes?", "Q4 about seas?"])
    answers = {"Q1": "A river answer.", "Q2": "A hill answer.", "Q3": "", "Q4": "A sea answer."}
    policy = ScriptedEngine(lambda m: answers[m[:2]])
    df = AnswerStage(SamplingConfig(n=1), 0, ("policy", "rejected"))(df, policy)
    assert df["reason"].tolist() == ["", "", "empty_response", ""]
    assert (df.loc[[0, 1, 3], "policy_text"] == df.loc[[0, 1, 3], "rejected_text"]).all()
    assert df["tok_respond_prompt"].tolist() == [7, 7, 7, 7]

    rewrites = {"A river answer.": "Rewritten Answer: GOOD river answer with detail.",
                "A hill answer.": "A hill  answer.",  # only whitespace changed: nothing learned
                "A sea answer.": " ".join(["GOOD sea answer again."] * 6)}
    improver = ScriptedEngine(lambda m: next(v for k, v in rewrites.items() if f"Original Answer: {k}" in m))
    df = ImproveStage(SamplingConfig(n=1), 0)(df, improver)
    assert "Given Question: Q1 about rivers?\nOriginal Answer: A river answer.\nRewritten Answer:" in improver.chats[0][0]["content"]
    assert df.loc[0, "chosen_text"] == "GOOD river answer with detail."  # echoed label stripped
    assert df.loc[1, "reason"] == "unchanged_refinement"

    df = PairFilterStage(max_repetition=0.5)(df)
    assert df.loc[3, "reason"] == "repetitive_chosen" and df.loc[3, "chosen_repetition"] > 0.5
    assert df.loc[0, "status"] == "ok" and df.loc[0, "chosen_repetition"] == 0.0

    judge = ScriptedEngine(prefers_first=0.8)
    df = PreferenceStage(min_gap=0.0)(df, judge)
    # Both orders were judged (2 chats) and averaged: GOOD first 0.8, GOOD second 1 - 0.4 -> P = 0.7.
    assert len(judge.chats) == 2
    assert df.loc[0, "judge_confidence"] == pytest.approx(0.7)
    assert df.loc[0, "score_gap"] == pytest.approx(0.4) and df.loc[0, "judge_agreement"] == "yes"
    assert df["status"].tolist() == ["ok", "drop", "drop", "drop"]  # every input is still a row


def test_score_gap_filter_drops_pairs_the_judge_does_not_prefer():
    df = rows(prompt_text=["Q?", "Q?"], chosen_text=["plain answer", "GOOD answer"],
              rejected_text=["GOOD other", "plain other"])
    out = PreferenceStage(min_gap=0.1)(df, ScriptedEngine(prefers_first=0.8))
    assert out["reason"].tolist() == ["below_score_gap", ""]
    assert out.loc[0, "score_gap"] == pytest.approx(-0.4)
    # Without a threshold it only measures.
    out = PreferenceStage(min_gap=None)(rows(prompt_text=["Q?"], chosen_text=["a"], rejected_text=["GOOD"]),
                                        ScriptedEngine())
    assert out.loc[0, "status"] == "ok" and out.loc[0, "judge_confidence"] < 0.5


def test_pair_filter_drops_identical_and_repetitive_rejected():
    df = rows(chosen_text=["Same text here.", "Fine answer."], rejected_text=["Same  text here.", "no " * 30])
    out = PairFilterStage()(df)
    assert out["reason"].tolist() == ["identical_responses", "repetitive_rejected"]


def test_chain_merges_pools_and_splits_resources():
    engine = EngineConfig(num_cpus_per_actor=1.0)
    m = Models(base="theta0", generator="gen", policy="theta0", improver="imp1", judge="theta0")
    from selfalign_ray.synpo.config import SynpoConfig

    pools = pair_chain(SynpoConfig(), m, engine, seed=0)
    # Iteration 1: generator -> policy (= π_0, answers serve as rejected) -> improver (+ filter) -> judge (π_0).
    assert [(p.name, p.model_path) for p in pools] == [("generator", "gen"), ("policy", "theta0"),
                                                       ("improver", "imp1"), ("judge", "theta0")]
    assert [type(s).__name__ for s in pools[2].stages] == ["ImproveStage", "PairFilterStage"]
    assert pools[1].stages[0].targets == ("policy", "rejected")
    assert all(p.engine.num_cpus_per_actor == 0.25 for p in pools)

    later = Models(base="theta0", generator="gen", policy="iter1", improver="imp2", judge="theta0")
    pools = pair_chain(SynpoConfig(), later, engine, seed=0)
    # Later iterations: π_0 writes the rejected answers and judges in the same pool.
    assert [(p.name, p.model_path) for p in pools] == [("generator", "gen"), ("policy", "iter1"),
                                                       ("improver", "imp2"), ("initial+judge", "theta0")]
    assert [type(s).__name__ for s in pools[3].stages] == ["AnswerStage", "PairFilterStage", "PreferenceStage"]
    full = build_chain([("a", "m1", [ImproveStage(SamplingConfig(), 0)]), ("b", "m2", [ImproveStage(SamplingConfig(), 0)])],
                       engine, "full")
    assert [p.engine.num_cpus_per_actor for p in full] == [1.0, 1.0]
    with pytest.raises(ValueError, match="no engine stage"):
        build_chain([("f", "m", [PairFilterStage()])], engine)


# ------------------------------------------------------------------------------------ cumulative dataset
def _pair(prompt, iteration):
    return {"prompt_id": prompt_id(prompt), "prompt": user_turn(prompt), "chosen": assistant_turn("good"),
            "rejected": assistant_turn("bad"), "mode": "synpo", "iteration": iteration, "source": "a, b, c",
            "generator_model": "m", "judge_confidence": 0.7, "chosen_tokens": 1, "rejected_tokens": 1}


def _iteration(out, k, prompts):
    """An iteration directory as generation leaves it: one shard and a manifest listing it."""
    d = out / f"iter_{k}"
    (d / "shards").mkdir(parents=True)
    shard = d / "shards" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist([_pair(p, k) for p in prompts], schema=PAIR_SCHEMA), shard)
    manifest = {"shards": [{"file": str(shard), "rows": len(prompts)}]}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def test_cumulative_dataset_grows_without_duplicate_prompts(tmp_path):
    d1, m1 = _iteration(tmp_path, 1, [f"prompt {i}" for i in range(5)])
    a1 = add_pairs(d1, m1, limit=3, seed=0, iteration=1)
    assert a1["rows"] == 3 and a1["valid_pairs"] == 5
    assert add_pairs(d1, m1, limit=3, seed=0, iteration=1) == a1  # deterministic: safe to redo on resume
    files, total = cumulative_files(tmp_path, 1)
    assert total == 3 and files == [a1["file"]]

    earlier = earlier_prompt_ids(tmp_path, 2)
    assert earlier == {prompt_id(f"prompt {i}") for i in range(5)}  # every valid pair, added or not

    # Iteration 2 generates "prompt 1" again: the assembler rejects it before it becomes a pair.
    chunk = with_status_columns(pd.DataFrame({
        "row_id": [0, 1], "source_id": ["p", "q"], "source": ["a, b, c"] * 2, "iteration": 2, "mode": "synpo",
        "prompt_text": ["prompt 1", "prompt 9"], "chosen_text": ["good"] * 2, "rejected_text": ["bad"] * 2,
        "chosen_tokens": 1, "rejected_tokens": 1}, index=[0, 0]))  # two batches: overlapping index labels
    assembler = SkipEarlierPrompts(PairAssembler("synpo", 2, "m", ()), frozenset(earlier))
    pairs, rejects, stats = assembler(chunk, set())
    assert pairs.column("prompt_id").to_pylist() == [prompt_id("prompt 9")]
    assert rejects.column("reason").to_pylist() == ["duplicate_prompt_earlier_iteration"]

    d2, m2 = _iteration(tmp_path, 2, ["prompt 9", "prompt 10"])
    add_pairs(d2, m2, limit=None, seed=0, iteration=2)
    files, total = cumulative_files(tmp_path, 2)
    assert total == 5 and len(files) == 2  # 3 from iteration 1 + 2 from iteration 2

    # A repeated prompt id across iterations is refused before training.
    d3, m3 = _iteration(tmp_path, 3, ["prompt 9"])
    add_pairs(d3, m3, limit=None, seed=0, iteration=3)
    with pytest.raises(RuntimeError, match="twice"):
        cumulative_files(tmp_path, 3)
