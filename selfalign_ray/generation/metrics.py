"""Per-stage throughput exported as Ray metrics (Prometheus), so the dashboard shows them live.

Counters only: rates (tokens/s, prompts/s) are `rate()` over them in Prometheus/Grafana.
All carry the tags stage, mode and iteration.
"""

from __future__ import annotations

import pandas as pd

TAGS = ("stage", "mode", "iteration")


class StageMetrics:
    """Created inside each engine actor (metrics objects are per process)."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.rows = Counter("selfalign_stage_rows", "Rows that left a stage, by outcome.", tag_keys=TAGS + ("outcome",))
        self.prompt_tokens = Counter("selfalign_stage_prompt_tokens", "Prompt tokens processed.", tag_keys=TAGS)
        self.output_tokens = Counter("selfalign_stage_output_tokens", "Output tokens generated.", tag_keys=TAGS)
        self.seconds = Counter("selfalign_stage_seconds", "Engine seconds spent in a stage.", tag_keys=TAGS)

    def record(self, stage: str, before: pd.DataFrame, after: pd.DataFrame, seconds: float) -> None:
        """`before`: the status column going in; `after`: the batch coming out."""
        if after.empty:
            return
        tags = {"stage": stage, "mode": str(after["mode"].iloc[0]) if "mode" in after else "",
                "iteration": str(int(after["iteration"].iloc[0]))}
        entered = before == "ok"
        dropped = int((entered & (after["status"] != "ok")).sum())
        kept = int(entered.sum()) - dropped
        if kept:
            self.rows.inc(kept, tags={**tags, "outcome": "kept"})
        if dropped:
            self.rows.inc(dropped, tags={**tags, "outcome": "dropped"})
        for col, counter in ((f"tok_{stage}_prompt", self.prompt_tokens), (f"tok_{stage}_output", self.output_tokens)):
            if col in after:
                total = int(after.loc[entered, col].sum())
                if total:
                    counter.inc(total, tags=tags)
        self.seconds.inc(seconds, tags=tags)
