"""A synthetic run output dir (manifests, shards, rejects, train history, evaluation) for report/sweep tests:
the same files a run writes, with known numbers, in milliseconds instead of minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfalign_ray.data.schema import PAIR_SCHEMA, REJECT_SCHEMA, assistant_turn, prompt_id, user_turn

PROMPTS = {
    1: ["How do I repot a cactus without getting hurt?", "What is a good beginner routine for running?",
        "Explain compound interest with a short example.", "How do I repot a cactus without getting hurt today?"],
    2: ["How do I repot a cactus without getting hurt?", "Suggest three names for a bakery.",
        "Write a haiku about trains.", "Write a haiku about trains."],
}


def _pairs(k: int, prompts: list[str]) -> pa.Table:
    rows = [{"prompt_id": prompt_id(p), "prompt": user_turn(p), "chosen": assistant_turn("good " * (10 + i)),
             "rejected": assistant_turn("bad " * (5 + i)), "mode": "sao", "iteration": k, "source": "persona",
             "generator_model": "m", "judge_confidence": 0.6 + 0.1 * i, "chosen_tokens": 10 + i,
             "rejected_tokens": 5 + i} for i, p in enumerate(prompts)]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def _rejects(k: int, prompts: list[str], reason: str) -> pa.Table:
    rows = [{"row_id": 100 + i, "source_id": f"p{i}", "source": "persona", "stage": "judge", "reason": reason,
             "error": "", "prompt": p, "raw": "", "mode": "sao", "iteration": k} for i, p in enumerate(prompts)]
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def make_run(out: Path, iterations: int = 2, with_eval: bool = True, summary: bool = True,
             mode: str = "sao") -> dict[int, dict]:
    """Write a run of `iterations` (<= 2) iterations to `out`; return the manifests by iteration."""
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for k in range(1, iterations + 1):
        d = out / f"iter_{k}"
        for sub in ("shards", "rejects", "model"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        kept, dropped = PROMPTS[k][:3], PROMPTS[k][3:]
        pq.write_table(_pairs(k, kept), d / "shards" / "part-00000.parquet")
        pq.write_table(_rejects(k, dropped, "duplicate_prompt"), d / "rejects" / "part-00000.parquet")
        history = [{"step": s, "loss": 2.0 - 0.1 * s - k, "margin": 0.01 * s * k, "preference_accuracy": 0.5 + 0.1 * s,
                    "tokens_per_s": 100.0} for s in (1, 2, 3)]
        (d / "model" / "train_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        m = {"mode": mode, "iteration": k, "inputs": 7, "prompts_kept": 4, "pairs_kept": 3,
             "drops": {"duplicate_prompt": 1, "below_confidence": 2 + k, "too_short": 1, "truncated_response": k},
             "truncation": "drop",
             "cut": {"instruct": {"completions": 7, "length": k, "rate": k / 7},
                     "respond": {"completions": 12, "length": 3 * k, "rate": 3 * k / 12}},
             "judge": "logprob", "judged_pairs": 6, "judge_position_agreement": 0.25 * k,
             "prompt_repetition_rate": 0.25, "yield": 3 / 7,
             "shards": [{"file": str(d / "shards" / "part-00000.parquet"), "rows": 3}],
             "rejects": [{"file": str(d / "rejects" / "part-00000.parquet"), "rows": len(dropped)}],
             "generation": {"wall_s": 10.0, "pairs_per_min": 18.0, "output_tokens_per_s": 42.5,
                            "tokens_per_s_by_stage": {"instruct": 50.0, "respond": 60.0, "judge": 300.0}},
             "train": {"model_dir": str(d / "model"), "pairs": 3, "summary": {
                 "rows": 3, "steps": 3, "mean_tokens_per_s": 123.4, "wall_s": 30.0,
                 "before": {"preference_accuracy": 0.5, "mean_margin": 0.001},
                 "after": {"preference_accuracy": 0.6667 + 0.1 * k, "mean_margin": 0.0123 * k}}}}
        if with_eval:
            m["eval_vs_base"] = {"win_rate": 0.5 + 0.125 * k, "ci_low": 0.2, "ci_high": 0.9, "wins": k, "ties": 2,
                                 "losses": 1, "unjudged": 0, "judged": 3 + k, "prompts": 3 + k,
                                 "dataset": "selfalign_ray_builtin", "judge": "base", "judge_kind": "logprob",
                                 "ci_method": "wilson", "level": 0.95, "mean_p_a": 0.55, "orders_agree": 0.5}
        (d / "manifest.json").write_text(json.dumps(m))
        manifests[k] = m
    if summary:
        (out / "summary.json").write_text(json.dumps({"mode": mode, "base_model": "/models/base", "wall_s": 321.5,
                                                      "output_dir": str(out), "iterations": []}))
    return manifests
