"""Per-stage throughput exported as Ray metrics (Prometheus), so the dashboard shows them live.

Counters only: rates (tokens/s, prompts/s) are `rate()` over them in Prometheus/Grafana.
All carry the tags stage, mode and iteration.
"""

from __future__ import annotations

import logging

import pandas as pd

log = logging.getLogger(__name__)

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


# --- Outcomes of committed chunks (driver side) -------------------------------------------------------------


class PairMetrics:
    """What each committed chunk became, counted in the driver when the chunk is committed (so a resumed
    run counts only the chunks it generates itself):

    selfalign_pairs{stage, mode, iteration, outcome, reason}: outcome=kept rows became a pair (stage="shards",
        reason=""); outcome=dropped rows became a reject, tagged with the stage and reason that dropped them
        (the same reasons as the manifest's `drops`, duplicate_prompt included).
    selfalign_judge_pairs{stage="judge", mode, iteration, agreement}: pairs judged in both orders, by whether
        the two orders preferred the same response (agreement rate = yes / all; position bias shows here).

    Metrics are best effort: when they cannot be created (no Ray metrics backend), `record` does nothing.
    """

    def __init__(self):
        try:
            from ray.util.metrics import Counter

            self.pairs = Counter("selfalign_pairs", "Inputs that became a pair (kept) or a reject (dropped, by "
                                 "stage and reason).", tag_keys=TAGS + ("outcome", "reason"))
            self.judged = Counter("selfalign_judge_pairs", "Pairs judged in both orders, by whether the two "
                                  "orders agree.", tag_keys=TAGS + ("agreement",))
        except Exception:  # noqa: BLE001 — metrics must never stop generation
            log.debug("no Ray metrics for pair outcomes", exc_info=True)
            self.pairs = self.judged = None

    def record(self, manifest_extra: dict, pairs, rejects, stats) -> None:
        """`pairs`, `rejects`: the chunk's Arrow tables; `stats`: its ChunkStats."""
        if self.pairs is None:
            return
        try:
            tags = {"mode": str(manifest_extra.get("mode", "")), "iteration": str(manifest_extra.get("iteration", ""))}
            if pairs.num_rows:
                self.pairs.inc(pairs.num_rows, tags={**tags, "stage": "shards", "outcome": "kept", "reason": ""})
            if rejects.num_rows:
                dropped = rejects.select(["stage", "reason"]).to_pandas().value_counts()
                for (stage, reason), n in dropped.items():
                    self.pairs.inc(int(n), tags={**tags, "stage": str(stage), "outcome": "dropped",
                                                 "reason": str(reason)})
            agree = int(stats.judge_orders_agree)
            for agreement, n in (("yes", agree), ("no", int(stats.judged_pairs) - agree)):
                if n:
                    self.judged.inc(n, tags={**tags, "stage": "judge", "agreement": agreement})
        except Exception:  # noqa: BLE001
            log.debug("pair outcome metrics not recorded", exc_info=True)
