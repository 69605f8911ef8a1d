"""mode.truncation end to end, on scripted engines (no Ray, no model): which stage drops a cut text and why, what
keep_without_eos records in the shard, the manifest's cut counts, training without the end-of-turn tokens of a
cut response, old shards without finish reasons, and duplicate prompts resolved in chunk order."""

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.config import ConfigError
from selfalign_ray.data.schema import PAIR_SCHEMA, conform_pairs
from selfalign_ray.data.shards import IterationStore
from selfalign_ray.engines.base import ChoiceScores, Completion, GenerationResult
from selfalign_ray.generation.assemble import PairAssembler
from selfalign_ray.generation.rows import with_status_columns
from selfalign_ray.sao.judge import JudgeConfig
from selfalign_ray.sao.stages import InstructStage, JudgeStage, RespondStage, SamplingConfig
from selfalign_ray.synpo.stages import AnswerStage, ImproveStage, QuestionStage

KEEP = "keep_without_eos"


class FinishEngine:
    """generate(): `script(user message)` -> list of (text, finish_reason), one per sample. score_choices(): a
    judge that prefers whichever response contains "GOOD"."""

    model_path = "scripted"

    def __init__(self, script):
        self.script = script

    def generate(self, chats, spec, seeds=None):
        out = []
        for chat in chats:
            samples = self.script(chat[-1]["content"])
            out.append(GenerationResult(prompt_tokens=5, completions=[
                Completion(text, len(text.split()), finish) for text, finish in samples]))
        return out

    def score_choices(self, chats, choices, answer_prefix=""):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            first_good = "GOOD" in text.split("Response 2:")[0]
            p1 = 0.9 if first_good else 0.1
            out.append(ChoiceScores(prompt_tokens=9, logprobs={"1": math.log(p1), "2": math.log(1 - p1)}))
        return out


def rows(n, **cols):
    df = pd.DataFrame({"source_id": [f"s{i}" for i in range(n)], "source": [f"persona number {i}" for i in range(n)],
                       "iteration": 1, "mode": "sao", "row_id": range(n), "chunk_id": 0, **cols})
    return with_status_columns(df)


def test_instruct_drops_or_keeps_a_cut_prompt():
    engine = FinishEngine(lambda m: [("User prompt: Explain how tides work in detail", "length")]
                          if "number 0" in m else [("User prompt: Plan a picnic for six people.", "stop")])
    dropped = InstructStage(SamplingConfig(max_tokens=8), seed=0)(rows(2), engine)
    assert dropped["reason"].tolist() == ["truncated_prompt", ""]
    assert "max_tokens=8" in dropped.loc[0, "error"] and dropped.loc[0, "raw"].startswith("User prompt:")
    assert dropped[["cut_instruct_completions", "cut_instruct_length"]].sum().tolist() == [2, 1]
    kept = InstructStage(SamplingConfig(max_tokens=8), seed=0, truncation=KEEP)(rows(2), engine)
    assert kept["reason"].tolist() == ["", ""]
    assert kept["prompt_finish_reason"].tolist() == ["length", "stop"]


def test_respond_keeps_only_complete_responses_under_drop():
    script = {"P0": [("GOOD a", "stop"), ("b cut", "length")],
              "P1": [("GOOD a", "stop"), ("b cut", "length"), ("c", "stop")],
              "P2": [("GOOD a", "stop"), ("b", "stop")]}
    engine = FinishEngine(lambda m: script[m])
    df = RespondStage(SamplingConfig(n=3, max_tokens=16), seed=0)(rows(3, prompt_text=["P0", "P1", "P2"]), engine)
    assert df["reason"].tolist() == ["truncated_response", "", ""]
    assert "1 of 2 responses stopped at mode.respond.max_tokens=16" == df.loc[0, "error"]
    assert json.loads(df.loc[1, "responses_json"]) == ["GOOD a", "c"]           # the cut one left out
    assert json.loads(df.loc[1, "response_finish_json"]) == ["stop", "stop"]
    assert df[["cut_respond_completions", "cut_respond_length"]].sum().tolist() == [7, 2]

    kept = RespondStage(SamplingConfig(n=3), seed=0, truncation=KEEP)(rows(3, prompt_text=["P0", "P1", "P2"]), engine)
    assert kept["reason"].tolist() == ["", "", ""]
    assert json.loads(kept.loc[0, "response_finish_json"]) == ["stop", "length"]
    # The judge carries each side's finish reason to the pair.
    judged = JudgeStage(JudgeConfig(), seed=0)(kept, engine)
    assert judged.loc[0, "chosen_text"] == "GOOD a" and judged.loc[0, "rejected_text"] == "b cut"
    assert (judged.loc[0, "chosen_finish_reason"], judged.loc[0, "rejected_finish_reason"]) == ("stop", "length")


def _assembled(df, tmp_path):
    pairs, rejects, stats = PairAssembler("sao", 1, "m", ("instruct", "respond", "judge"))(df, set())
    store = IterationStore(tmp_path / "iter_1")
    manifest = store.write_manifest({0: store.commit_chunk(0, pairs, rejects, stats)}, {})
    return pairs, rejects, manifest


def test_kept_cut_pair_is_marked_in_the_shard_and_counted_in_the_manifest(tmp_path):
    engine = FinishEngine(lambda m: [("User prompt: Explain tides to a child", "length")] if m.startswith("Guess")
                          else [("GOOD answer", "stop"), ("worse answer cut", "length")])
    df = rows(1)
    for stage in (InstructStage(SamplingConfig(), 0, truncation=KEEP), RespondStage(SamplingConfig(n=2), 0, truncation=KEEP),
                  JudgeStage(JudgeConfig(), 0)):
        df = stage(df, engine)
    pairs, _, manifest = _assembled(df, tmp_path)
    row = pairs.to_pylist()[0]
    assert (row["prompt_finish_reason"], row["chosen_finish_reason"], row["rejected_finish_reason"]) == \
        ("length", "stop", "length")
    assert manifest["cut"] == {"instruct": {"completions": 1, "length": 1, "rate": 1.0},
                               "respond": {"completions": 2, "length": 1, "rate": 0.5}}


def test_dropped_cut_rows_are_rejects_counted_by_reason(tmp_path):
    engine = FinishEngine(lambda m: [("User prompt: Explain tides to a child", "stop")] if m.startswith("Guess")
                          else [("GOOD answer", "stop"), ("worse answer cut", "length")])
    df = rows(2)
    for stage in (InstructStage(SamplingConfig(), 0), RespondStage(SamplingConfig(n=2), 0), JudgeStage(JudgeConfig(), 0)):
        df = stage(df, engine)
    pairs, rejects, manifest = _assembled(df, tmp_path)
    assert pairs.num_rows == 0
    assert rejects.column("reason").to_pylist() == ["truncated_response"] * 2
    assert rejects.column("stage").to_pylist() == ["respond"] * 2
    assert manifest["drops"] == {"truncated_response": 2}
    assert manifest["cut"]["respond"] == {"completions": 4, "length": 2, "rate": 0.5}


def test_synpo_stages_name_the_cut_stage():
    def df(**cols):
        return rows(2, prompt_text=["Q0 about rivers?", "Q1 about hills?"], **cols)

    answers = FinishEngine(lambda m: [("A river answer that goes on", "length")] if m.startswith("Q0")
                           else [("A hill answer.", "stop")])
    out = AnswerStage(SamplingConfig(), 0, ("policy", "rejected"))(df(), answers)
    assert out["reason"].tolist() == ["truncated_response", ""]
    assert out.loc[1, "rejected_finish_reason"] == "stop"
    initial = AnswerStage(SamplingConfig(), 0, ("rejected",), name="respond_initial",
                          cut_reason="truncated_initial_response")(df(), answers)
    assert initial["reason"].tolist() == ["truncated_initial_response", ""]
    kept = AnswerStage(SamplingConfig(), 0, ("policy", "rejected"), truncation=KEEP)(df(), answers)
    assert kept["reason"].tolist() == ["", ""] and kept["rejected_finish_reason"].tolist() == ["length", "stop"]

    improver = FinishEngine(lambda m: [("GOOD rewrite that never", "length")] if "rivers" in m
                            else [("GOOD hill rewrite.", "stop")])
    base = df(policy_text=["a", "b"])
    assert ImproveStage(SamplingConfig(), 0)(base.copy(), improver)["reason"].tolist() == ["truncated_refinement", ""]
    kept = ImproveStage(SamplingConfig(), 0, truncation=KEEP)(base.copy(), improver)
    assert kept["chosen_finish_reason"].tolist() == ["length", "stop"]

    generator = FinishEngine(lambda m: [("<question> Why do rivers bend and", "length")] if "kw0" in m
                             else [("<question> Why do hills erode? </question> <solution> Be", "length")])
    keywords = rows(2, source=["kw0, a, b", "kw1, c, d"])
    cut = QuestionStage(SamplingConfig(), 0, stop_at_question_end=False)(keywords.copy(), generator)
    # The second question is whole (its solution was cut): not a truncated prompt.
    assert cut["reason"].tolist() == ["truncated_question", ""]
    assert cut["prompt_finish_reason"].tolist() == ["", "stop"]
    kept = QuestionStage(SamplingConfig(), 0, stop_at_question_end=False, truncation=KEEP)(keywords.copy(), generator)
    assert kept["prompt_text"].tolist() == ["Why do rivers bend and", "Why do hills erode?"]
    assert kept["prompt_finish_reason"].tolist() == ["length", "stop"]


def test_truncation_setting_is_checked():
    with pytest.raises(ConfigError, match="mode.truncation='cut'"):
        RespondStage(SamplingConfig(), 0, truncation="cut")(rows(1, prompt_text=["P"]), FinishEngine(None))
    from selfalign_ray.synpo.config import synpo_config

    with pytest.raises(ConfigError, match="keep_without_eos"):
        synpo_config({"truncation": "keep"})


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


PAIR = {"prompt": [{"role": "user", "content": "Name a prime."}],
        "chosen": [{"role": "assistant", "content": "Seven."}],
        "rejected": [{"role": "assistant", "content": "Nine, I think, because it is"}]}


def test_cut_response_is_trained_without_end_of_turn(tok):
    from selfalign_ray.train.data import IGNORE, preference_examples, sft_example

    old = preference_examples(tok, PAIR, 128, 64)  # no finish columns (older shards): both complete
    marked = preference_examples(tok, {**PAIR, "chosen_finish_reason": "stop", "rejected_finish_reason": "length"},
                                 128, 64)
    assert marked[0] == old[0]
    chosen_labels = [t for t in marked[0].labels if t != IGNORE]
    rejected_labels = [t for t in marked[1].labels if t != IGNORE]
    assert tok.decode(chosen_labels) == "Seven.<|im_end|>\n"
    assert tok.decode(rejected_labels) == "Nine, I think, because it is"
    assert tok.convert_tokens_to_ids("<|im_end|>") not in marked[1].input_ids[-3:]
    # A null finish reason (a shard column written before a stage recorded one) reads as complete.
    assert preference_examples(tok, {**PAIR, "chosen_finish_reason": None, "rejected_finish_reason": None},
                               128, 64) == old
    sft = {"prompt": PAIR["prompt"], "completion": PAIR["rejected"], "completion_finish_reason": "length"}
    assert tok.decode([t for t in sft_example(tok, sft, 128, 64).labels if t != IGNORE]) == "Nine, I think, because it is"


def _old_shard(path, n=2):
    """A pair shard written before the finish-reason columns existed."""
    old_schema = pa.schema([f for f in PAIR_SCHEMA if not f.name.endswith("finish_reason")])
    rows_ = [{"prompt_id": f"id{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
              "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}],
              "mode": "synpo", "iteration": 1, "source": "s", "generator_model": "m", "judge_confidence": 0.7,
              "chosen_tokens": 1, "rejected_tokens": 1} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows_, schema=old_schema), path)
    return str(path)


def test_old_shards_still_load_for_training(tmp_path):
    from selfalign_ray.synpo.dataset import add_pairs
    from selfalign_ray.train.trainer import COLUMNS, _columns

    old = _old_shard(tmp_path / "old.parquet")
    table = conform_pairs(pq.read_table(old))
    assert table.schema == PAIR_SCHEMA and table.column("chosen_finish_reason").to_pylist() == [None, None]
    added = add_pairs(tmp_path, {"shards": [{"file": old, "rows": 2}]}, None, 0, 1)
    assert added["rows"] == 2
    assert _columns("simpo", [old]) == COLUMNS["simpo"]
    new = tmp_path / "new.parquet"
    pq.write_table(table, new)
    assert _columns("simpo", [str(new)]) == COLUMNS["simpo"] + ["chosen_finish_reason", "rejected_finish_reason"]
    assert _columns("simpo", [str(new), old]) == COLUMNS["simpo"]  # mixed: read as complete, with a warning


class _Stream:
    """Stands in for generation/pool.PoolStream: hands back the pending blocks in a given finishing order."""

    def __init__(self, blocks, order):
        self.blocks, self.order = blocks, order

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def batches(self, ds, pools, **watchdog):  # stall_timeout_s, describe: no deadline needed here
        return (self.blocks[i] for i in self.order)


@pytest.mark.parametrize("finish_order", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_duplicate_prompts_resolve_by_chunk_order_whatever_finishes_first(tmp_path, monkeypatch, finish_order):
    import ray.data

    from selfalign_ray.generation import runner
    from selfalign_ray.generation.pool import PoolSpec

    inputs = runner.assign_chunks(pd.DataFrame({"source_id": [f"s{i}" for i in range(6)], "source": "p",
                                                "iteration": 1, "mode": "sao"}), shard_size=2)
    # Rows 1, 3 and 4 (chunks 0, 1, 2) all produce the same prompt.
    done = with_status_columns(inputs.copy())
    done["prompt_text"] = ["A", "dup", "B", "dup", "dup", "C"]
    for col, value in (("chosen_text", "x"), ("rejected_text", "y"), ("chosen_tokens", 1), ("rejected_tokens", 1),
                       ("judge_confidence", 0.9)):
        done[col] = value
    blocks = [done.iloc[i:i + 2] for i in range(0, 6, 2)]
    monkeypatch.setattr(ray.data, "from_pandas", lambda _: None)
    monkeypatch.setattr(runner, "PoolStream", lambda what: _Stream(blocks, finish_order))
    monkeypatch.setattr(runner, "PairMetrics", lambda: type("M", (), {"record": lambda *a: None})())
    store = IterationStore(tmp_path / "iter_1")
    pool = PoolSpec("sao", "m", type("E", (), {"batch_size": 2, "stall_timeout_s": 0})(), [])
    manifest = runner.run_generation(store, inputs, [pool], PairAssembler("sao", 1, "m", ()), {})
    kept = [p["prompt"][0]["content"] for s in manifest["shards"] for p in pq.read_table(s["file"]).to_pylist()]
    assert kept == ["A", "dup", "B", "C"]  # the copy of chunk 0 survives
    dups = pq.read_table(store.rejects_dir / "part-00001.parquet").to_pylist() + \
        pq.read_table(store.rejects_dir / "part-00002.parquet").to_pylist()
    assert sorted((d["row_id"], d["reason"]) for d in dups) == [(3, "duplicate_prompt"), (4, "duplicate_prompt")]


def test_empty_synpo_iteration_names_the_cut_texts_and_the_remedy():
    from selfalign_ray.synpo.loop import empty_dataset_message

    drops = {"truncated_response": 9, "truncated_refinement": 3, "tie": 1}
    message = empty_dataset_message(1, drops, "drop")
    assert "12 of the drops are texts cut at their max_tokens" in message
    assert "mode.truncation=keep_without_eos" in message
    # Nothing was cut, or cut texts were kept: no advice about truncation.
    assert "keep_without_eos" not in empty_dataset_message(1, {"tie": 4}, "drop")
    assert "keep_without_eos" not in empty_dataset_message(1, drops, "keep_without_eos")
