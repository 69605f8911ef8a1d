"""Bad input, table-driven: every case ends in a clear error naming the file / row / setting, or in a counted
drop — never a crash deep inside an actor, a guess, or lost work.

    1. record files (SAO personas and SynPO seeds, one table for both loaders)
    2. configs (validated before Ray starts and before anything is written)
    3. runtime: judge outputs of every malformed shape, prompts longer than the context window,
       a NaN loss in training, a full disk while a shard is written

tests/test_inputs.py and tests/test_synpo_seeds.py hold the loaders' finer cases (chat-message records,
Parquet nulls, id fields); the kill / resume / corruption faults are in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from selfalign_ray.cli import compose
from selfalign_ray.config import ConfigError
from selfalign_ray.data.inputs import InputFileError
from selfalign_ray.data.personas import PersonaConfig, load_personas
from selfalign_ray.engines.base import ChoiceScores, Completion, GenerationResult
from selfalign_ray.generation.rows import with_status_columns
from selfalign_ray.models.resolve import ModelNotFoundError
from selfalign_ray.synpo.seeds import SeedConfig, load_seeds

pytestmark = pytest.mark.timeout(120)

# --------------------------------------------------------------------------------------------------------------
# 1. Record files: one table, run against both loaders.
# --------------------------------------------------------------------------------------------------------------

TEXTS = ["A beekeeper in Wales who sells honey at farmers markets.",
         "A bus driver in Nairobi learning Python in the evenings."]


def record(kind: str, text, **extra) -> dict:
    """A well-formed record of `kind` whose text field is `text` (any JSON value)."""
    base = {"persona": text} if kind == "personas" else {"prompt": text, "response": "A helpful gold answer."}
    return {**base, **extra}


def line(kind: str, text, **extra) -> bytes:
    return json.dumps(record(kind, text, **extra)).encode() + b"\n"


def good(kind: str, i: int) -> bytes:
    return line(kind, TEXTS[i], id=f"g{i}")


def load(kind: str, path: Path, on_error: str = "skip"):
    if kind == "personas":
        items, report = load_personas(PersonaConfig(path=str(path), on_error=on_error))
        return [p.text for p in items], report
    items, report = load_seeds(SeedConfig(path=str(path), on_error=on_error))
    return [s.prompt for s in items], report


# (case, file name, content(kind) -> bytes, expected). expected: ("drop", reason, line) = the bad record is
# skipped, counted and named while both good ones load; ("error", regex) = the file is refused as a whole.
FILE_CASES = [
    ("empty_file", "in.jsonl", lambda k: b"", ("error", r"in\.jsonl: no usable .*file is empty")),
    ("only_blank_lines", "in.jsonl", lambda k: b"\n  \n\t\n", ("error", r"in\.jsonl: no usable .*file is empty")),
    ("wrong_extension", "in.csv", lambda k: b"persona\nA potter.\n", ("error", r"in\.csv: unsupported file type \.csv")),
    ("no_extension", "personas", lambda k: good(k, 0), ("error", r"personas: unsupported file type \(none\)")),
    ("parquet_that_is_not_parquet", "in.parquet", lambda k: good(k, 0), ("error", r"in\.parquet: not a readable Parquet")),
    ("jsonl_that_is_binary", "in.jsonl", lambda k: bytes(range(256)) * 4,
     ("error", r"in\.jsonl(: no usable .*(not_utf8|invalid_json)|:1: invalid_json)")),  # skip | raise
    ("json_array_unterminated", "in.json", lambda k: b"[" + json.dumps(record(k, TEXTS[0])).encode() + b",\n",
     ("error", r"in\.json:\d+: invalid JSON array")),
    ("invalid_json_line", "in.jsonl", lambda k: good(k, 0) + b"{broken\n" + good(k, 1), ("drop", "invalid_json", 2)),
    ("json_not_an_object", "in.jsonl", lambda k: good(k, 0) + good(k, 1) + b'["a", "list"]\n', ("drop", "not_an_object", 3)),
    ("missing_field", "in.jsonl", lambda k: good(k, 0) + b'{"id": "x", "text": "no such field"}\n' + good(k, 1),
     ("drop", "missing_field", 2)),
    ("wrong_type_number", "in.jsonl", lambda k: good(k, 0) + line(k, 42) + good(k, 1), ("drop", "wrong_type", 2)),
    ("wrong_type_null", "in.jsonl", lambda k: good(k, 0) + line(k, None) + good(k, 1), ("drop", "wrong_type", 2)),
    ("wrong_type_list", "in.jsonl", lambda k: good(k, 0) + line(k, ["a"]) + good(k, 1), ("drop", "wrong_type", 2)),
    ("empty_string", "in.jsonl", lambda k: good(k, 0) + line(k, "") + good(k, 1), ("drop", "empty_field", 2)),
    ("whitespace_string", "in.jsonl", lambda k: good(k, 0) + line(k, " \t\n ") + good(k, 1), ("drop", "empty_field", 2)),
    ("non_utf8_bytes", "in.jsonl", lambda k: good(k, 0) + b'{"persona": "caf\xe9", "prompt": "caf\xe9"}\n' + good(k, 1),
     ("drop", "not_utf8", 2)),
    ("one_megabyte_line", "in.jsonl", lambda k: good(k, 0) + line(k, "x" * 1_000_000) + good(k, 1), ("drop", "too_long", 2)),
    ("duplicate_row", "in.jsonl", lambda k: good(k, 0) + good(k, 1) + good(k, 0), ("drop", "duplicate", 3)),
    ("duplicate_up_to_case_and_spaces", "in.jsonl",
     lambda k: good(k, 0) + good(k, 1) + line(k, "  " + TEXTS[0].upper().replace(" ", "   ")), ("drop", "duplicate", 3)),
    # Accepted as they are: a UTF-8 byte-order mark, CRLF line ends, a .json file holding one JSON array.
    ("utf8_bom_and_crlf", "in.jsonl", lambda k: b"\xef\xbb\xbf" + (good(k, 0) + good(k, 1)).replace(b"\n", b"\r\n"),
     ("ok",)),
    ("json_array_file", "in.json", lambda k: json.dumps([record(k, t) for t in TEXTS], indent=2).encode(), ("ok",)),
]


@pytest.mark.parametrize("kind", ["personas", "seeds"])
@pytest.mark.parametrize("case, name, content, expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_record_files(tmp_path, kind, case, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content(kind))
    if expected[0] == "error":
        for policy in ("skip", "raise"):
            with pytest.raises(InputFileError, match=expected[1]) as err:
                load(kind, path, policy)
            assert str(path) in str(err.value)
        return
    texts, report = load(kind, path)
    assert texts == TEXTS  # the good records load, in order, whatever sits between them
    if expected[0] == "ok":
        assert report.errors == []
        return
    _, reason, lineno = expected
    assert [(e.file, e.line, e.reason) for e in report.errors] == [(str(path), lineno, reason)]
    assert report.to_json()["by_reason"] == {reason: 1}
    assert report.to_json()["first"][0].startswith(f"{path}:{lineno}: {reason}: ")
    if reason == "duplicate":
        assert f"repeats {path}:1" in report.errors[0].detail  # both lines named
    with pytest.raises(InputFileError, match=rf"in\.jsonl:{lineno}: {reason}"):
        load(kind, path, "raise")


def test_seed_file_specifics(tmp_path):
    """Seeds need a prompt and a response: a text file is refused, a missing response is a counted drop."""
    txt = tmp_path / "seeds.txt"
    txt.write_text("How do tides work?\n")
    with pytest.raises(InputFileError, match=r"seeds\.txt: seed data needs a prompt and a response"):
        load_seeds(SeedConfig(path=str(txt)))
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(good("seeds", 0) + json.dumps({"prompt": "No answer here?"}).encode() + b"\n" + good("seeds", 1))
    seeds, report = load_seeds(SeedConfig(path=str(path)))
    assert [s.prompt for s in seeds] == TEXTS
    assert [(e.line, e.reason) for e in report.errors] == [(2, "missing_field")] and "'response'" in report.errors[0].detail


# --------------------------------------------------------------------------------------------------------------
# 2. Configs: refused before Ray starts and before anything is written.
# --------------------------------------------------------------------------------------------------------------

def _model_dirs(tmp_path: Path) -> dict[str, Path]:
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "weights.txt").write_text("x")
    empty_config = tmp_path / "empty_config"
    empty_config.mkdir()
    (empty_config / "config.json").write_text("{}")
    broken_config = tmp_path / "broken_config"
    broken_config.mkdir()
    (broken_config / "config.json").write_text('{"model_type": "llama",')
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 16)
    return {"no_config": no_config, "empty_config": empty_config, "broken_config": broken_config,
            "no_weights": no_weights, "a_file": a_file}


# (case, overrides (with {personas} / {<model dir>} placeholders), exception type, message regex)
CONFIG_CASES = [
    ("dataset_size_zero", ["dataset_size=0"], ConfigError, r"dataset_size must be a positive integer, got 0"),
    ("dataset_size_negative", ["dataset_size=-5"], ConfigError, r"dataset_size must be a positive integer, got -5"),
    ("iterations_zero", ["iterations=0"], ConfigError, r"iterations must be a positive integer, got 0"),
    ("dataset_larger_than_persona_pool", ["dataset_size=9"], ValueError,
     r"dataset_size=9 is larger than the persona pool \(8 personas\)"),
    ("shard_size_zero", ["mode.shard_size=0"], ConfigError, r"mode\.shard_size must be a positive integer, got 0"),
    ("respond_n_one", ["mode.respond.n=1"], ValueError, r"mode\.respond\.n must be >= 2"),
    ("respond_max_tokens_zero", ["mode.respond.max_tokens=0"], ConfigError, r"mode\.respond: .*max_tokens must be >= 1"),
    ("instruct_top_p_zero", ["mode.instruct.top_p=0"], ConfigError, r"mode\.instruct: .*top_p must be in \(0, 1\]"),
    ("engine_batch_size_zero", ["engine.batch_size=0"], ConfigError, r"engine\.batch_size must be a positive integer"),
    ("engine_num_actors_zero", ["engine.num_actors=0"], ConfigError, r"engine\.num_actors must be a positive integer"),
    ("engine_max_model_len_negative", ["engine.max_model_len=-1"], ConfigError, r"engine\.max_model_len must be a positive"),
    ("engine_unknown_key", ["+engine.batchsize=3"], ConfigError, r"engine: unknown key\(s\) \['batchsize'\]"),
    ("judge_unknown_kind", ["judge.kind=vibes"], ConfigError, r"judge\.kind='vibes' is not one of"),
    ("judge_confidence_above_one", ["judge.min_confidence=1.5"], ConfigError, r"judge\.min_confidence must lie in \[0, 1\]"),
    ("train_global_batch_zero", ["train.global_batch_size=0"], ConfigError, r"train\.global_batch_size must be a positive"),
    ("train_max_prompt_length_not_below_max_length", ["train.max_prompt_length=512", "train.max_length=512"], ConfigError,
     r"train\.max_prompt_length \(512\) must be < train\.max_length \(512\)"),
    ("train_negative_learning_rate", ["train.learning_rate=-1e-6"], ConfigError, r"train\.learning_rate"),
    ("train_nan_beta", ["train.beta=nan"], ConfigError, r"train\.beta must be a finite number, got nan"),
    ("train_inf_sft_weight", ["train.sft_weight=inf"], ConfigError, r"train\.sft_weight must be a finite number"),
    ("deepspeed_contradicts_train", ["deepspeed.train_batch_size=16"], ConfigError, r"contradicts the train settings"),
    ("personas_missing_file", ["personas.path={missing}"], InputFileError, r"nope\.jsonl: file not found"),
    ("personas_bad_policy", ["personas.on_error=ignore"], ValueError, r"personas\.on_error='ignore' must be 'skip' or 'raise'"),
    ("model_path_missing", ["model.path=/nonexistent/model/dir"], ModelNotFoundError, r"model\.path=/nonexistent/model/dir does not exist"),
    ("model_path_is_a_file", ["model.path={a_file}"], ModelNotFoundError, r"is a file, not a Hugging Face model directory"),
    ("model_dir_without_config", ["model.path={no_config}"], ModelNotFoundError, r"not a Hugging Face model \(no config\.json\)"),
    ("model_config_without_model_type", ["model.path={empty_config}"], ModelNotFoundError, r"config\.json has no model_type"),
    ("model_config_not_json", ["model.path={broken_config}"], ModelNotFoundError, r"config\.json is not readable JSON"),
    ("model_without_weights", ["model.path={no_weights}"], ModelNotFoundError, r"has a config\.json but no weight files"),
    ("model_hub_id_offline", ["model.path=someorg/somemodel"], ModelNotFoundError, r"hub id but HF_HUB_OFFLINE=1"),
]


def _replace_run_generation(monkeypatch, replacement):
    """Patch run_generation where it is *used*. The pipelines bind it with `from ... import` when first imported;
    patching only the runner module while a pipeline was first imported left the replacement bound in that
    pipeline for the rest of the session (every later test then 'started Ray' through it)."""
    import selfalign_ray.generation.runner as runner
    import selfalign_ray.sao.pipeline as sao_pipeline
    import selfalign_ray.synpo.pipeline as synpo_pipeline

    for module in (runner, sao_pipeline, synpo_pipeline):
        monkeypatch.setattr(module, "run_generation", replacement)


@pytest.mark.parametrize("case, overrides, exc, match", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_configs_fail_before_ray_and_before_any_output(tmp_path, persona_file, monkeypatch, case, overrides, exc,
                                                           match):
    import selfalign_ray.loop as loop

    def no_ray(*_):
        raise AssertionError("the bad setting got past validation: Ray was started")

    monkeypatch.setattr(loop, "init_ray", lambda cluster: None)  # generation validates before using Ray
    monkeypatch.setattr(loop, "preflight", lambda cfg: None)  # (it asks Ray for the cluster's resources)
    _replace_run_generation(monkeypatch, no_ray)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    places = {"missing": tmp_path / "nope.jsonl", **_model_dirs(tmp_path)}
    out = tmp_path / "run"
    cfg = compose(["model=tiny_random", f"personas.path={persona_file}", f"output_dir={out}", "dataset_size=4",
                   *[o.format(**places) for o in overrides]])
    with pytest.raises(exc, match=match):
        loop.run(cfg)
    # Nothing written: in particular no run.json binding the bad value, so the corrected command is not refused.
    assert [p for p in out.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("overrides, match", [
    (["model=nonexistent"], r"Could not find 'model/nonexistent'"),
    (["engine=nonexistent"], r"Could not find 'engine/nonexistent'"),
    (["engine.batchsize=3"], r"Could not override 'engine\.batchsize'\.\nTo append to your config use \+engine"),
])
def test_unknown_presets_and_keys_are_refused_at_composition(overrides, match):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException), match=match):
        compose(overrides)


def test_a_refused_setting_does_not_poison_the_output_dir(tmp_path, persona_file, monkeypatch):
    """mode.shard_size=0 used to be written into run.json before it was checked; the corrected command was then
    refused as 'different settings (shard_size)'."""
    import selfalign_ray.loop as loop

    class Reached(Exception):
        pass

    def reached(*_):
        raise Reached

    monkeypatch.setattr(loop, "init_ray", lambda cluster: None)
    monkeypatch.setattr(loop, "preflight", lambda cfg: None)
    _replace_run_generation(monkeypatch, reached)
    base = ["model=tiny_random", f"personas.path={persona_file}", f"output_dir={tmp_path / 'run'}", "dataset_size=4",
            "train.enabled=false"]
    with pytest.raises(ConfigError, match="shard_size"):
        loop.run(compose([*base, "mode.shard_size=0"]))
    with pytest.raises(Reached):  # the corrected command gets as far as generating
        loop.run(compose([*base, "mode.shard_size=2"]))


# --------------------------------------------------------------------------------------------------------------
# 3a. Judge outputs of every malformed shape -> a counted drop with the raw output kept, never a guess or a crash.
# --------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def lp(p1: float) -> dict:
    return {"1": math.log(p1), "2": math.log(1 - p1)}


# case -> (output for order (alpha, beta), output for order (beta, alpha)), expected: "alpha"/"beta" = kept with
# that response chosen, otherwise the drop reason. Logprob outputs are dicts (or an engine error string).
LOGPROB_CASES = {
    "clear_preference": (lp(0.9), lp(0.1), "alpha"),
    "nan_score": ({"1": NAN, "2": -1.0}, lp(0.1), "unparsable_judge:invalid_logprobs"),
    "both_minus_inf": ({"1": -INF, "2": -INF}, lp(0.1), "unparsable_judge:invalid_logprobs"),
    "missing_choice": ({"1": -0.1}, lp(0.1), "unparsable_judge:invalid_logprobs"),
    "no_scores": ({}, {}, "unparsable_judge:invalid_logprobs"),
    "string_score": ({"1": "high", "2": -1.0}, lp(0.1), "unparsable_judge:invalid_logprobs"),
    "one_minus_inf": ({"1": 0.0, "2": -INF}, {"1": -INF, "2": 0.0}, "alpha"),
    "overflowing_gap": ({"1": -1000.0, "2": 0.0}, {"1": 0.0, "2": -1000.0}, "beta"),  # math.exp(1000) overflowed
    "position_bias_only": (lp(0.7), lp(0.7), "orders_disagree"),
    "weak_preference": (lp(0.52), lp(0.5), "below_confidence"),
    "judge_prompt_too_long": ("prompt_too_long: 3000 tokens > limit 2047 (engine.max_model_len=2048)", lp(0.1),
                              "prompt_too_long"),
}
GENERATIVE_CASES = {
    "agreeing_orders": ("ranking: 1 > 2", "ranking: 2 > 1", "alpha"),
    "markdown_and_response_words": ("**Ranking:** **Response 2** > **Response 1**", "ranking: Response 1 > Response 2",
                                    "beta"),
    "empty_output": ("", "", "unparsable_judge:no_ranking"),
    "no_completion_at_all": (None, None, "unparsable_judge:no_ranking"),
    "prose_only": ("Response 1 is clearly better.", "I prefer the first.", "unparsable_judge:no_ranking"),
    "truncated": ("ranking: 1 >", "ranking: 2", "unparsable_judge:no_ranking"),
    "invalid_option": ("ranking: 3 > 1", "ranking: 0 > 2", "unparsable_judge:invalid_option"),
    "repeated_option": ("ranking: 2 > 2", "ranking: 1 > 1", "unparsable_judge:repeated_option"),
    "conflicting_rankings": ("ranking: 1 > 2, no wait, ranking: 2 > 1", "ranking: X > Y", "unparsable_judge:conflicting_rankings"),
    "control_bytes": ("\x00\x1b[31m\ufffd", "\ud7ff\x7f", "unparsable_judge:no_ranking"),
    "many_spaces": ("ranking:" + " " * 20000 + "x", "ranking:" + " " * 20000, "unparsable_judge:no_ranking"),
    # preset: both orders must agree; one order without a ranking cannot agree, and the reason says so
    "one_order_unparsable": ("ranking: 1 > 2", "no idea", "one_order_unparsable:no_ranking"),
    "position_bias_only": ("ranking: 1 > 2", "ranking: 1 > 2", "orders_disagree"),
    "judge_prompt_too_long": ("prompt_too_long: 3000 tokens > limit 2047 (engine.max_model_len=2048)", "ranking: 2 > 1",
                              "prompt_too_long"),
}


class TableJudge:
    """Answers the judge's chats from a table keyed by the case named in the ranking prompt."""

    def __init__(self, table: dict):
        self.table = table

    def _lookup(self, chat):
        text = chat[-1]["content"]
        case = text.split("Prompt: case-", 1)[1].split()[0]
        alpha_first = text.index("alpha-answer") < text.index("beta-answer")
        return self.table[case][0 if alpha_first else 1]

    def score_choices(self, chats, choices, answer_prefix=""):
        out = []
        for chat in chats:
            v = self._lookup(chat)
            out.append(ChoiceScores(prompt_tokens=9, error=v) if isinstance(v, str) else ChoiceScores(9, logprobs=v))
        return out

    def generate(self, chats, spec, seeds=None):
        out = []
        for chat in chats:
            v = self._lookup(chat)
            if isinstance(v, str) and v.startswith("prompt_too_long"):
                out.append(GenerationResult(prompt_tokens=3000, error=v))
            else:
                out.append(GenerationResult(prompt_tokens=9, completions=[] if v is None else [Completion(v, 5, "stop")]))
        return out


@pytest.mark.parametrize("preset, table", [("logprob", LOGPROB_CASES), ("generative", GENERATIVE_CASES)])
def test_malformed_judge_outputs_are_counted_drops(preset, table):
    from selfalign_ray.config import typed
    from selfalign_ray.generation.assemble import PairAssembler
    from selfalign_ray.sao.judge import JudgeConfig
    from selfalign_ray.sao.stages import JudgeStage

    # logprob: keep pairs whose averaged preference reaches 0.6; generative preset: both orders must agree.
    cfg = typed(JudgeConfig, compose([f"judge={preset}", "model=tiny_random", "judge.min_confidence=0.6"]
                                     if preset == "logprob" else [f"judge={preset}"]).judge, "judge")
    names = list(table)
    df = with_status_columns(pd.DataFrame({
        "row_id": range(len(names)), "source_id": names, "source": names, "iteration": 1, "mode": "sao",
        "prompt_text": [f"case-{n} please" for n in names],
        "responses_json": json.dumps(["alpha-answer", "beta-answer"]), "response_tokens_json": json.dumps([3, 4]),
    }))
    started = time.perf_counter()
    out = JudgeStage(cfg, seed=0)(df, TableJudge(table))
    assert time.perf_counter() - started < 5  # no pathological parsing (20,000 spaces took minutes before)
    for name, row in zip(names, out.itertuples()):
        expected = table[name][2]
        if expected in ("alpha", "beta"):
            assert (row.status, row.chosen_text) == ("ok", f"{expected}-answer"), name
            assert math.isfinite(row.judge_confidence), name
        else:
            assert (row.status, row.stage, row.reason) == ("drop", "judge", expected), name
            assert row.raw or row.error, f"{name}: the judge's output is kept next to the drop"
    # Every row ends in exactly one place, and every drop is counted by reason.
    pairs, rejects, stats = PairAssembler("sao", 1, "m", ("judge",))(out, set())
    kept = [n for n in names if table[n][2] in ("alpha", "beta")]
    assert pairs.num_rows == len(kept) and pairs.num_rows + rejects.num_rows == len(names)
    expected_drops = {}
    for n in names:
        if n not in kept:
            expected_drops[table[n][2]] = expected_drops.get(table[n][2], 0) + 1
    assert dict(stats.drops) == expected_drops
    assert all(c is None or math.isfinite(c) for c in pairs.column("judge_confidence").to_pylist())


# --------------------------------------------------------------------------------------------------------------
# 3b. A prompt longer than the context window: a row error, counted; the other rows go on.
# --------------------------------------------------------------------------------------------------------------

def test_prompt_longer_than_the_context_window_is_a_counted_row_drop(tiny_model_path):
    from selfalign_ray.engines.factory import EngineConfig, make_engine
    from selfalign_ray.generation.assemble import PairAssembler
    from selfalign_ray.sao.judge import JudgeConfig
    from selfalign_ray.sao.stages import InstructStage, JudgeStage, RespondStage, SamplingConfig

    huge = "A lighthouse keeper who " + "keeps very detailed logs of every passing ship and storm, " * 50
    assert len(huge) < PersonaConfig().max_chars  # the file loader accepts it; the context window does not
    engine = make_engine(tiny_model_path, EngineConfig(kind="hf", max_model_len=512, batch_size=4))
    df = with_status_columns(pd.DataFrame({
        "row_id": [0, 1, 2], "source_id": ["a", "huge", "b"], "source": [TEXTS[0], huge, TEXTS[1]],
        "iteration": 1, "mode": "sao"}))
    stages = [InstructStage(SamplingConfig(max_tokens=12), 0, require_prefix=False, min_prompt_chars=1),
              RespondStage(SamplingConfig(n=2, max_tokens=8), 0), JudgeStage(JudgeConfig(), 0)]
    for stage in stages:
        df = stage(df, engine)
    pairs, rejects, stats = PairAssembler("sao", 1, "tiny", tuple(s.name for s in stages))(df, set())
    assert pairs.num_rows + rejects.num_rows == 3
    row = [r for r in rejects.to_pylist() if r["source_id"] == "huge"]
    assert len(row) == 1 and (row[0]["stage"], row[0]["reason"]) == ("instruct", "prompt_too_long")
    assert re.search(r"\d+ tokens > limit 511 \(engine\.max_model_len=512\)", row[0]["error"])
    assert stats.drops["prompt_too_long"] >= 1 and sum(stats.drops.values()) == rejects.num_rows
    assert stats.tokens["instruct"]["prompt"] > 0


# --------------------------------------------------------------------------------------------------------------
# 3c. A NaN loss: training stops naming the step and micro-batch; the last good checkpoint is kept.
# --------------------------------------------------------------------------------------------------------------

def _poisoned_model(src: str, out: Path, poison: str) -> None:
    """The tiny model with untied embeddings and NaN in the embedding row of a token only `poison` uses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    token = tok(poison, add_special_tokens=False)["input_ids"][0]
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nan_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_path, ray_local):
    import pyarrow.parquet as pq
    from test_train_zero3 import TOPICS, preference_file, train_cfg

    from selfalign_ray.train import train_model

    model = tmp_path / "poisoned"
    _poisoned_model(tiny_model_path, model, "Zyxqv")
    # 6 pairs, 2 ranks, 1 pair per rank per step: 3 steps. Only two pairs carry the poisoned token, and the seed
    # below keeps them out of step 1, so step 1 is clean (and checkpointed).
    data = preference_file(tmp_path / "p.parquet", TOPICS[:4] + ["Zyxqv", "Zyxqv rivers"])
    assert pq.read_metadata(data).num_rows == 6
    # Training reads a seeded permutation; step k takes rows 2k, 2k + 1 of it (train/order.py). Pick a seed that
    # puts both poisoned pairs after step 1.
    from selfalign_ray.train.order import order_key

    rows = pq.read_table(data, columns=["prompt", "chosen", "rejected"]).to_pylist()
    poisoned = {i for i, r in enumerate(rows) if "Zyxqv" in json.dumps(r)}
    seed = next(s for s in range(100)
                if not poisoned & set(sorted(range(6), key=lambda i: order_key(rows[i], s))[:2]))
    train, ds = train_cfg("train.checkpoint_every_steps=1", "train.epochs=1", "train.global_batch_size=2",
                          "train.eval_before_after=false", "train.max_failures=1",
                          f"train.seed={seed}")
    # max_failures=1: Ray Train restarts the group once; the restarted workers find the non-finite marker and stop
    # before loading anything, so the same data is not trained on again and the run fails with the first message.
    with pytest.raises(FloatingPointError) as err:
        train_model(model_path=str(model), train_files=[data], output_dir=str(tmp_path / "out"), cfg=train,
                    deepspeed_cfg=ds)
    found = re.search(r"non-finite loss nan at optimizer step (\d+) \(epoch 0, micro-batch (\d+)\); "
                      r"the last checkpoint is kept", str(err.value))
    assert found, str(err.value)[-2000:]
    assert int(found.group(1)) >= 2
    # The last good checkpoint is in the run's storage; no half-trained model was written as the product.
    checkpoints = [p for p in (tmp_path / "out_ray").rglob("*") if p.is_dir() and p.name.startswith("checkpoint_")]
    assert checkpoints, "the checkpoint of the last finite step is kept"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    history = [json.loads(x) for x in (tmp_path / "out" / "train_history.jsonl").read_text().splitlines()]
    assert history and all(math.isfinite(h["loss"]) for h in history)  # the NaN step is not logged as a step
    assert len({h["step"] for h in history}) == len(history)  # no step was redone by a restart
    assert (tmp_path / "out" / ".nonfinite_stop").read_text().startswith("non-finite loss nan")


# --------------------------------------------------------------------------------------------------------------
# 3d. A full disk while a shard is written: no half-written shard visible, a clear error, committed chunks intact.
# --------------------------------------------------------------------------------------------------------------

class _DiskFullAfterHalf:
    """A file whose write() stores half of the data, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_while_writing_a_shard(tmp_path, persona_file, ray_local, monkeypatch):
    import pyarrow.parquet as pq

    from selfalign_ray.data import shards as shards_mod
    from selfalign_ray.data.shards import IterationStore
    from selfalign_ray.loop import run

    out = tmp_path / "run"
    iter_dir = out / "iter_1"
    cfg = compose(["model=tiny_random", "dataset_size=8", f"personas.path={persona_file}", f"output_dir={out}",
                   "train.enabled=false", "mode.shard_size=2", "mode.respond.max_tokens=16",
                   "mode.instruct.max_tokens=24", "engine.batch_size=2"])
    real_open = open

    def disk_full_on_chunk_1(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        p = Path(file)
        if ("w" in mode or "x" in mode) and p.parent.name == "shards" and "part-00001.parquet" in p.name:
            return _DiskFullAfterHalf(f)
        return f

    monkeypatch.setattr(shards_mod, "open", disk_full_on_chunk_1, raising=False)
    with pytest.raises(OSError) as err:
        run(cfg)
    assert err.value.errno == errno.ENOSPC
    assert "No space left on device" in str(err.value) and "shards/part-00001.parquet" in str(err.value)
    # No half-written file under any name, no marker for the failed chunk, the committed chunks verify.
    files = [p for p in iter_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp-" in p.name]
    assert not (iter_dir / "shards" / "part-00001.parquet").exists()
    assert not (iter_dir / "chunks" / "part-00001.json").exists()
    markers = IterationStore(iter_dir).committed()  # verifies sizes and sha256; would drop a damaged chunk
    assert markers and 1 not in markers  # chunk 0 normally; whichever came back before the failure
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["chunks"] == len(markers)
    kept = {c: (iter_dir / "shards" / f"part-{c:05d}.parquet").stat().st_mtime_ns for c in markers}

    monkeypatch.undo()  # space again: the same command resumes
    report = run(cfg)
    manifest = json.loads((iter_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["chunks"] == 4 and manifest["inputs"] == 8
    assert {c: (iter_dir / "shards" / f"part-{c:05d}.parquet").stat().st_mtime_ns for c in markers} == kept
    ids = [i for s in manifest["shards"] for i in pq.read_table(s["file"]).column("prompt_id").to_pylist()]
    rejects = sum(s["rows"] for s in manifest["rejects"])
    assert len(ids) == len(set(ids)) == manifest["pairs_kept"] == report["iterations"][0]["pairs_kept"]
    assert len(ids) + rejects == 8 and sum(manifest["drops"].values()) == rejects
