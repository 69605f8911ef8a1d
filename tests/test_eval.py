"""Evaluation (selfalign_ray/eval/): win-rate math, the position-swap rule, AlpacaEval format, the builtin
prompt set's independence from the training inputs, and tiny_random judged against itself end to end."""

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from selfalign_ray.engines.base import ChoiceScores
from selfalign_ray.eval.data import BUILTIN_PROMPTS, PromptsConfig, alpaca_outputs, load_prompts
from selfalign_ray.eval.stages import PairwiseJudgeStage
from selfalign_ray.eval.winrate import bootstrap, outcome, wilson, win_rate
from selfalign_ray.sao.judge import generative_verdict, logprob_verdict

BUILTIN = Path(BUILTIN_PROMPTS).parent
ALPACA_KEYS = {"instruction", "output", "generator", "dataset"}


# ------------------------------------------------------------------------------------------ math
def test_win_rate_with_ties_and_wilson_interval_by_hand():
    r = win_rate([1.0, 1.0, 0.0, 0.5, None])
    assert (r.wins, r.ties, r.losses, r.unjudged, r.judged) == (2, 1, 1, 1, 4)
    assert r.win_rate == pytest.approx(0.625)  # (2 + 1/2) / 4
    # Wilson, z = 1.959964, n = 4, p = 0.625: centre (p + z²/2n)/(1 + z²/n) = 0.563765,
    # half-width z/(1 + z²/n) * sqrt(p(1-p)/n + z²/4n²) = 0.344337.
    assert (r.ci_low, r.ci_high) == (pytest.approx(0.219427, abs=1e-5), pytest.approx(0.908101, abs=1e-5))


def test_wilson_edge_cases():
    # All wins: the upper bound is 1, the lower n / (n + z²) = 5 / 8.841459.
    assert wilson(1.0, 5) == (pytest.approx(0.565518, abs=1e-5), 1.0)
    low, high = wilson(0.5, 10)  # symmetric around one half
    assert low + high == pytest.approx(1.0)
    r = win_rate([0.5] * 10)
    assert r.win_rate == 0.5 and r.ties == 10 and r.ci_low == pytest.approx(low)
    empty = win_rate([None, None])
    assert empty.win_rate is None and empty.ci_low is None and empty.unjudged == 2
    with pytest.raises(ValueError):
        win_rate([1.0], method="normal")


def test_bootstrap_interval():
    assert bootstrap([0.5] * 8) == (0.5, 0.5)  # only ties: no spread at all
    outcomes = [1.0, 1.0, 0.0, 0.5] * 5
    r = win_rate(outcomes, method="bootstrap", samples=4000, seed=1)
    assert r.ci_low < r.win_rate == 0.625 < r.ci_high
    assert r.ci_high - r.ci_low < wilson(0.625, 20)[1] - wilson(0.625, 20)[0] + 0.05
    assert win_rate(outcomes, method="bootstrap", seed=1) == win_rate(outcomes, method="bootstrap", seed=1)


def test_both_orders_must_agree():
    lp = lambda p1: {"1": math.log(p1), "2": math.log(1 - p1)}  # noqa: E731
    # A first gets P(1)=0.8; swapped, A second gets P(1)=0.3, i.e. P(A)=0.7: both orders prefer A.
    assert outcome(*_pa(logprob_verdict(lp(0.8), lp(0.3)))) == 1.0
    assert outcome(*_pa(logprob_verdict(lp(0.2), lp(0.7)))) == 0.0
    # Pure position bias (P(1)=0.7 whatever comes first): the orders disagree -> tie, not a win.
    assert outcome(*_pa(logprob_verdict(lp(0.7), lp(0.7)))) == 0.5
    assert outcome(*_pa(generative_verdict("ranking: 1 > 2", "ranking: 2 > 1"))) == 1.0
    assert outcome(*_pa(generative_verdict("ranking: 1 > 2", "ranking: 1 > 2"))) == 0.5
    assert outcome(*_pa(generative_verdict("ranking: 1 > 2", "no idea"))) == 0.5  # one order only: tie
    assert outcome(*_pa(generative_verdict("??", "no idea"))) is None              # unjudged


def _pa(v):
    return v.p_a, v.orders_agree


class _FakeJudge:
    """score_choices: prefers the response holding "good" (whichever position); "biased" always says 1."""

    def __init__(self, biased=False):
        self.biased = biased

    def score_choices(self, chats, choices, answer_prefix=""):
        out = []
        for chat in chats:
            text = chat[0]["content"]
            first = text.find("good") < text.find("bad") if not self.biased else True
            p1 = 0.9 if first else 0.1
            out.append(ChoiceScores(prompt_tokens=1, logprobs={"1": math.log(p1), "2": math.log(1 - p1)}))
        return out


def test_pairwise_judge_stage():
    df = pd.DataFrame({"source_id": ["a", "b", "c", "d"], "prompt_text": ["q"] * 4,
                       "a_text": ["good", "bad", "", "good"], "b_text": ["bad", "good", "good", ""]})
    out = PairwiseJudgeStage("logprob")(df.copy(), _FakeJudge())
    assert list(out["outcome"]) == [1.0, 0.0, 0.0, 1.0]  # a missing answer loses without judging
    assert list(out["judge_note"])[2:] == ["missing_answer", "missing_answer"]
    biased = PairwiseJudgeStage("logprob")(df.iloc[:2].copy(), _FakeJudge(biased=True))
    assert list(biased["outcome"]) == [0.5, 0.5] and list(biased["orders_agree"]) == ["no", "no"]


# --------------------------------------------------------------------------------------- formats
def test_alpaca_eval_model_outputs_format(tmp_path):
    prompts = load_prompts(PromptsConfig(num_prompts=3))
    rows = alpaca_outputs(prompts, ["x", "y", "z"], "my-model")
    assert json.loads(json.dumps(rows)) == rows and len(rows) == 3
    assert all(set(r) == ALPACA_KEYS for r in rows)
    assert rows[0] == {"instruction": prompts[0]["instruction"], "output": "x", "generator": "my-model",
                       "dataset": "selfalign_ray_builtin"}
    # An AlpacaEval-style JSON list keeps each record's dataset; duplicates count once.
    f = tmp_path / "set.json"
    f.write_text(json.dumps([{"instruction": "Hi?", "dataset": "helpful_base"}, {"instruction": "Hi?"},
                             {"instruction": "Bye?"}]))
    got = load_prompts(PromptsConfig(path=str(f)))
    assert [(p["instruction"], p["dataset"]) for p in got] == [("Hi?", "helpful_base"), ("Bye?", "set")]
    f.write_text('{"text": "no instruction field"}\n')
    with pytest.raises(ValueError, match="instruction"):
        load_prompts(PromptsConfig(path=str(f)))


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def _grams(text, n):
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def test_builtin_eval_prompts_are_disjoint_from_training_inputs():
    """The builtin evaluation set must not leak into what the loops train on: no prompt equal to (or a light
    rewording of) a persona, a SynPO seed prompt or a keyword-corpus paragraph, and no 8-word run copied from
    any of them or from a seed's gold answer."""
    evals = [json.loads(line) for line in BUILTIN_PROMPTS.read_text().splitlines() if line.strip()]
    assert len(evals) == 129 and len({e["id"] for e in evals}) == 129
    assert len({" ".join(_words(e["instruction"])) for e in evals}) == 129
    seeds = [json.loads(line) for line in (BUILTIN / "synpo_seed.jsonl").read_text().splitlines() if line.strip()]
    personas = [json.loads(line)["persona"] for line in (BUILTIN / "personas.jsonl").read_text().splitlines()
                if line.strip()]
    corpus = [p for p in (BUILTIN / "corpus.txt").read_text().split("\n\n") if p.strip()]
    near = personas + [s["prompt"] for s in seeds] + corpus
    copied = near + [s["response"] for s in seeds]
    normalised = {" ".join(_words(t)) for t in near}
    near_tri = [(other, _grams(other, 3)) for other in near]
    copied_eight = set().union(*(_grams(other, 8) for other in copied))
    for e in evals:
        text = e["instruction"]
        assert " ".join(_words(text)) not in normalised, e["id"]
        tri = _grams(text, 3)
        for other, o in near_tri:
            jaccard = len(tri & o) / max(1, len(tri | o))
            assert jaccard < 0.2, (e["id"], other[:80], jaccard)
        assert not _grams(text, 8) & copied_eight, e["id"]


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.timeout(600)
def test_tiny_random_against_itself_is_even(tmp_path, tiny_model_path, ray_local, monkeypatch):
    """selfalign-ray-eval's config and code path: A = B = tiny_random, 6 prompts, both orders; tracked in a local
    MLflow file store (tracker=mlflow): parameters, the win rate with its interval, the output files."""
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from selfalign_ray.cli import CONF_DIR
    from selfalign_ray.eval.cli import tracked_eval

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path}/mlruns"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["model_a=tiny_random", "model_b=tiny_random", "prompts.num_prompts=6",
                                         "sampling.max_tokens=12", f"output_dir={tmp_path / 'ev'}",
                                         "engine.batch_size=8", "tracker=mlflow", f"tracker.tracking_uri={uri}",
                                         "tracker.experiment=eval-test"])
    r = tracked_eval(cfg)
    assert r["prompts"] == 6 and r["judged"] + r["unjudged"] == 6 and r["judged"] >= 5
    # Same model on both sides: with both orders the judge cannot prefer either side beyond chance.
    assert r["ci_low"] <= 0.5 <= r["ci_high"] and abs(r["win_rate"] - 0.5) <= 0.25
    assert abs(r["mean_p_a"] - 0.5) < 0.05
    for name in ("model_outputs.json", "reference_outputs.json"):
        rows = json.loads((tmp_path / "ev" / name).read_text())
        assert len(rows) == 6 and all(set(x) == ALPACA_KEYS for x in rows)
        assert {x["generator"] for x in rows} == {"tiny_random"}
    assert len((tmp_path / "ev" / "judgements.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["win_rate"] == r["win_rate"]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model_b"] == "tiny_random"
    for key in ("win_rate", "ci_low", "ci_high", "judged"):
        assert run.data.metrics[f"eval/{key}"] == pytest.approx(r[key])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "results.json", "model_outputs.json", "reference_outputs.json", "judgements.jsonl"}
