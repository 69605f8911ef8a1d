"""Row conventions every stage follows.

A batch is a pandas DataFrame. Every row carries `status` ("ok" or "drop"); a stage only touches
rows that are still "ok" and, when it drops one, sets `status="drop"`, `stage`, `reason`, `error`
and `raw`. Rows are never removed, so each input ends in exactly one place: a pair or a reject.
List values travel as JSON strings: Arrow infers one type per block, and an all-empty list column
in one block would not unify with a list<string> column in the next.
"""

from __future__ import annotations

import json

import pandas as pd

STATUS_COLUMNS = {"status": "ok", "stage": "", "reason": "", "error": "", "raw": ""}


def with_status_columns(df: pd.DataFrame) -> pd.DataFrame:
    for col, default in STATUS_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    return df


def live(df: pd.DataFrame) -> pd.Series:
    return df["status"] == "ok"


def drop(df: pd.DataFrame, index, stage: str, reason: str, error: str = "", raw: str = "") -> None:
    df.loc[index, ["status", "stage", "reason", "error", "raw"]] = ["drop", stage, reason, error, raw]


def ensure_columns(df: pd.DataFrame, defaults: dict) -> pd.DataFrame:
    """Add a stage's output columns with typed defaults, so every block has the same schema."""
    for col, default in defaults.items():
        if col not in df.columns:
            df[col] = default
    return df


def dumps(values) -> str:
    return json.dumps(values, ensure_ascii=False)


def loads(text: str):
    return json.loads(text) if text else []


# mode.truncation: what happens to a generated text that stopped at its max_tokens (finish_reason "length").
# drop: the row goes to rejects/ as truncated_<what> (never trained on); keep_without_eos: the row is kept,
# its finish reasons travel into the shard, and training leaves out the end-of-turn tokens of a cut response.
TRUNCATION_DROP = "drop"
TRUNCATION_KEEP = "keep_without_eos"
TRUNCATION_MODES = (TRUNCATION_DROP, TRUNCATION_KEEP)


def check_truncation(value: str, where: str = "mode.truncation") -> str:
    if value not in TRUNCATION_MODES:
        from selfalign_ray.config import ConfigError

        raise ConfigError(f"{where}={value!r} is not one of: {', '.join(TRUNCATION_MODES)}")
    return value


def count_cut(df: pd.DataFrame, stage: str, index=None, finish_reasons=()) -> None:
    """Per row and stage: `cut_<stage>_completions` generated, `cut_<stage>_length` of them stopped at
    max_tokens (summed into the manifest's `cut`). Without `index`: only add the columns (every block of a
    stage must have them, live rows or not)."""
    ensure_columns(df, {f"cut_{stage}_completions": 0, f"cut_{stage}_length": 0})
    if index is not None:
        df.at[index, f"cut_{stage}_completions"] += len(finish_reasons)
        df.at[index, f"cut_{stage}_length"] += sum(f == "length" for f in finish_reasons)
