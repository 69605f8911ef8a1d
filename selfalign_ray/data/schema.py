"""Arrow schemas of what a generation stage writes: preference pairs and rejects.

Pairs use TRL's conversational preference format (`prompt` / `chosen` / `rejected` as lists of
{role, content} messages) plus provenance columns, so a shard folder loads unchanged with
`datasets.load_dataset("parquet", data_files=...)` and feeds TRL preference trainers.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PAIR_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),          # sha256 of the prompt text (dedup key)
    ("prompt", MESSAGES),                # the user turn(s)
    ("chosen", MESSAGES),                # the preferred assistant turn
    ("rejected", MESSAGES),              # the other assistant turn
    ("mode", pa.string()),               # sao / synpo
    ("iteration", pa.int32()),           # iteration that produced the pair
    ("source", pa.string()),             # persona text or keyword list
    ("generator_model", pa.string()),    # model path/id that produced the responses
    ("judge_confidence", pa.float32()),  # preference probability (logprob) or agreement (generative)
    ("chosen_tokens", pa.int32()),
    ("rejected_tokens", pa.int32()),
    # Why each generated text ended: "stop" (EOS / stop string) or "length" (cut at its max_tokens). Only
    # mode.truncation=keep_without_eos keeps "length" rows; training then leaves out the end-of-turn tokens
    # of a cut response (train/data.py). null in shards written before these columns existed: read as "stop".
    ("prompt_finish_reason", pa.string()),    # the generated user prompt (SAO instruct, SynPO question)
    ("chosen_finish_reason", pa.string()),
    ("rejected_finish_reason", pa.string()),
])

FINISH_COLUMNS = ("prompt_finish_reason", "chosen_finish_reason", "rejected_finish_reason")

REJECT_SCHEMA = pa.schema([
    ("row_id", pa.int64()),              # position of the input in this iteration's sample
    ("source_id", pa.string()),          # persona id / seed id
    ("source", pa.string()),             # persona text or keyword list
    ("stage", pa.string()),              # stage that dropped the row
    ("reason", pa.string()),             # short machine-readable reason (counted in the manifest)
    ("error", pa.string()),              # human-readable detail
    ("prompt", pa.string()),             # the prompt, where one was produced
    ("raw", pa.string()),                # the raw model output that caused the drop, if any
    ("mode", pa.string()),
    ("iteration", pa.int32()),
])


def conform_pairs(table: pa.Table) -> pa.Table:
    """A pair table in PAIR_SCHEMA; shards from before the finish-reason columns get them as nulls."""
    for name in FINISH_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]
