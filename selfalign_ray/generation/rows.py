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
