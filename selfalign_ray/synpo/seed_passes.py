"""Small generation passes over seed data (no preference shards): the improver's training answers, and the
held-out evaluation. Both run through engine pools like the pair generation (synpo/chain.py)."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.generation.rows import TRUNCATION_KEEP
from selfalign_ray.synpo.chain import build_chain, run_rows
from selfalign_ray.synpo.config import SynpoConfig
from selfalign_ray.synpo.seeds import Seed
from selfalign_ray.synpo.sft_data import improver_example
from selfalign_ray.synpo.stages import AnswerStage, PreferenceStage


def _seed_rows(seeds: list[Seed], iteration: int, source: str) -> pd.DataFrame:
    return pd.DataFrame({
        "source_id": [s.id for s in seeds], "source": source, "iteration": iteration, "mode": "synpo",
        "prompt_text": [s.prompt for s in seeds], "gold_text": [s.response for s in seeds],
    })


def improver_training_data(seeds: list[Seed], policy: str, judge: str, sc: SynpoConfig, engine: EngineConfig,
                           seed: int, iteration: int) -> tuple[list[dict], dict]:
    """π_{t-1} answers the training seeds; each (seed prompt, answer) -> gold answer is an improver example.

    With mode.improve.min_gold_gap set, a seed is kept only if the judge prefers the gold answer by that gap
    (paper App. C.2: the improver must learn improvements, not to make answers worse).

    Cut answers are kept whatever mode.truncation says: the answer is the improver's input, never its training
    target (that is the gold answer), and learning to turn a cut answer into the gold one does no harm. Dropping
    them would leave the improver without examples when answers run long (SmolLM2 at CPU token limits).
    Their number is in the stats (answers_cut).
    """
    steps = [("policy", policy, [AnswerStage(sc.respond.sampling(), seed, ("policy",), name="seed_respond",
                                             truncation=TRUNCATION_KEEP)])]
    if sc.improve.min_gold_gap is not None:
        steps.append(("judge", judge, [PreferenceStage(sc.improve.min_gold_gap, "gold", "policy", name="gold_judge")]))
    out = run_rows(_seed_rows(seeds, iteration, "seed"), build_chain(steps, engine, sc.pool_resources))
    by_id = {s.id: s for s in seeds}
    if len(by_id) != len(seeds):  # load_seeds drops duplicate ids; a caller that did not would pair wrong answers
        dup = sorted({s.id for s in seeds if sum(t.id == s.id for t in seeds) > 1})
        raise ValueError(f"seed ids must be unique; repeated: {dup[:5]}")
    kept = out[out["status"] == "ok"]
    examples = [improver_example(by_id[sid], answer) for sid, answer in zip(kept["source_id"], kept["policy_text"])]
    stats = {"seeds": len(seeds), "examples": len(examples),
             "drops": dict(Counter(out.loc[out["status"] != "ok", "reason"])),
             "policy_output_tokens": int(out["tok_seed_respond_output"].sum()),
             "answers_cut": int(out["cut_seed_respond_length"].sum())}
    if "score_gap" in out:
        stats["mean_gold_gap"] = _mean(out["score_gap"])
    return examples, stats


def evaluate_heldout(model: str, judge: str, heldout: list[Seed], sc: SynpoConfig, engine: EngineConfig,
                     seed: int, iteration: int) -> dict:
    """`model` answers the held-out seed prompts; the judge compares each answer with the gold answer in
    both orders. win_rate: share of judged prompts where P(model answer better) > 0.5; mean_preference:
    the mean of that probability (0.5 = indistinguishable from gold to the judge)."""
    # Evaluation keeps cut answers (truncation does not apply): they are scored, never trained on, and dropping
    # them would score only the answers that happened to be short.
    steps = [("model", model, [AnswerStage(sc.eval.sampling(), seed, ("answer",), name="eval_respond",
                                           truncation=TRUNCATION_KEEP)]),
             ("judge", judge, [PreferenceStage(None, "answer", "gold", name="eval_judge")])]
    out = run_rows(_seed_rows(heldout, iteration, "heldout"), build_chain(steps, engine, sc.pool_resources))
    judged = out[(out["status"] == "ok") & out["judge_confidence"].notna()]
    p = judged["judge_confidence"]
    return {
        "model": model, "judge": judge, "prompts": len(out), "judged": len(judged),
        "win_rate": float((p > 0.5).mean()) if len(judged) else None,
        "mean_preference": _mean(p),
        "orders_agree": float((judged["judge_agreement"] == "yes").mean()) if len(judged) else None,
        "mean_answer_tokens": _mean(out.loc[out["status"] == "ok", "answer_tokens"]),
        "answers_cut": int(out["cut_eval_respond_length"].sum()),
        "drops": dict(Counter(out.loc[out["status"] != "ok", "reason"])),
    }


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.mean()) if len(values) else None
