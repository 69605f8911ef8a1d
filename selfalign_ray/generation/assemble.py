"""Turn a finished chunk's rows into a pair table, a reject table and its counts.

Shared by SAO and SynPO: rows that survived every stage carry `prompt_text`, `chosen_text`,
`rejected_text`; every other row becomes a reject with the stage and reason that dropped it.
A prompt already produced earlier in the iteration is dropped as `duplicate_prompt`. The driver assembles
chunks in chunk order (generation/runner.py), so of several copies the one with the lowest (chunk_id,
row_id) survives, whichever chunk finished first. Every generation stage counts its completions cut at
max_tokens (`cut_<stage>_*` columns), summed here into ChunkStats.cut.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from selfalign_ray.data.schema import (
    FINISH_COLUMNS,
    PAIR_SCHEMA,
    REJECT_SCHEMA,
    assistant_turn,
    prompt_id,
    user_turn,
)
from selfalign_ray.data.shards import ChunkStats


@dataclass
class PairAssembler:
    mode: str
    iteration: int
    generator_model: str
    stages: tuple[str, ...]

    def __call__(self, chunk: pd.DataFrame, seen: set) -> tuple[pa.Table, pa.Table, ChunkStats]:
        stats = ChunkStats(inputs=len(chunk), drops=Counter())
        for stage in self.stages:
            p, o = f"tok_{stage}_prompt", f"tok_{stage}_output"
            if p in chunk.columns:
                stats.tokens[stage] = {"prompt": int(chunk[p].fillna(0).sum()), "output": int(chunk[o].fillna(0).sum())}
        for col in chunk.columns:  # cut_<stage>_completions / cut_<stage>_length (generation/rows.py count_cut)
            if col.startswith("cut_") and col.endswith("_completions"):
                stage = col[len("cut_"):-len("_completions")]
                stats.cut[stage] = {"completions": int(chunk[col].fillna(0).sum()),
                                    "length": int(chunk[f"cut_{stage}_length"].fillna(0).sum())}
        pairs, rejects = [], []
        for row in chunk.itertuples(index=False):
            r = row._asdict()
            prompt = r.get("prompt_text") or ""
            if prompt:
                stats.prompts_produced += 1
                pid = prompt_id(prompt)
                if pid in seen:
                    stats.duplicate_prompts += 1
                    if r["status"] == "ok":
                        r.update(status="drop", stage="dedup", reason="duplicate_prompt",
                                 error="the same prompt was produced earlier in this iteration")
                seen.add(pid)
            if r.get("judge_agreement") in ("yes", "no"):
                stats.judged_pairs += 1
                stats.judge_orders_agree += r["judge_agreement"] == "yes"
            if r["status"] == "ok":
                confidence = r.get("judge_confidence")
                pairs.append({
                    "prompt_id": prompt_id(prompt),
                    "prompt": user_turn(prompt),
                    "chosen": assistant_turn(r["chosen_text"]),
                    "rejected": assistant_turn(r["rejected_text"]),
                    "mode": self.mode,
                    "iteration": self.iteration,
                    "source": r["source"],
                    "generator_model": self.generator_model,
                    "judge_confidence": None if confidence is None or math.isnan(confidence) else float(confidence),
                    "chosen_tokens": int(r["chosen_tokens"]),
                    "rejected_tokens": int(r["rejected_tokens"]),
                    # "" (a stage that records none) is unknown: null, read as "stop" by training.
                    **{col: r.get(col) or None for col in FINISH_COLUMNS},
                })
            else:
                stats.drops[r["reason"]] += 1
                rejects.append({
                    "row_id": int(r["row_id"]), "source_id": str(r["source_id"]), "source": r["source"],
                    "stage": r["stage"], "reason": r["reason"], "error": r["error"], "prompt": prompt or None,
                    "raw": r["raw"], "mode": self.mode, "iteration": self.iteration,
                })
        stats.pairs = len(pairs)
        return (pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA),
                pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), stats)
