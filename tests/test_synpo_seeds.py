"""SynPO seed data: sources and column layouts, bad files reported with file and row, the held-out split."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synpo_fixtures import SEED_RECORDS, write_seed_file

from selfalign_ray.data.inputs import InputFileError
from selfalign_ray.synpo.seeds import (
    BUILTIN_SEEDS,
    SeedConfig,
    heldout_count,
    load_seeds,
    split_seeds,
)


def test_prompt_response_jsonl(tmp_path):
    path = write_seed_file(tmp_path / "seeds.jsonl")
    seeds, report = load_seeds(SeedConfig(path=str(path)))
    assert [(s.prompt, s.response) for s in seeds] == list(SEED_RECORDS)
    assert seeds[0].id == "s0" and seeds[0].origin == f"{path}:1"
    assert report.errors == []


def test_parquet_with_custom_columns_and_no_id(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": [p for p, _ in SEED_RECORDS[:3]],
                             "answer": [r for _, r in SEED_RECORDS[:3]]}), path)
    seeds, _ = load_seeds(SeedConfig(path=str(path), prompt_field="question", response_field="answer"))
    assert [s.prompt for s in seeds] == [p for p, _ in SEED_RECORDS[:3]]
    assert [s.id for s in seeds] == ["seeds.parquet:1", "seeds.parquet:2", "seeds.parquet:3"]


def test_chat_messages_column(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sea salty?"},
                      {"role": "assistant", "content": "Rivers carry dissolved minerals into it."},
                      {"role": "user", "content": "And lakes?"}, {"role": "assistant", "content": "Most drain."}]},
        {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]},
    ]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        seeds, report = load_seeds(SeedConfig(path=str(path), messages_field="messages"))
        # The first user turn and the first assistant turn after it; later turns are not used.
        assert [(s.prompt, s.response) for s in seeds] == [
            ("Why is the sea salty?", "Rivers carry dissolved minerals into it."), ("Name a prime.", "7")]
        assert not report.errors


BAD_LINES = [
    json.dumps({"id": "ok1", "prompt": "How do tides work?", "response": "The moon's gravity pulls the oceans."}),
    json.dumps({"id": "r2", "prompt": "What is basalt?"}),                                # 2: missing_field
    json.dumps({"id": "r3", "prompt": "What is granite?", "response": "   "}),            # 3: empty_field
    json.dumps({"id": "r4", "prompt": "What is 2+2?", "response": 4}),                    # 4: wrong_type
    '{"id": "r5", "prompt": "broken json", ',                                             # 5: invalid_json
    json.dumps(["a", "list"]),                                                            # 6: not_an_object
    json.dumps({"id": "ok7", "prompt": "Why do leaves fall?", "response": "Trees shed them to save water."}),
    json.dumps({"id": "r8", "prompt": "How do tides work?", "response": "Another answer."}),  # 8: duplicate
]


def _bad_file(tmp_path):
    path = tmp_path / "bad_seeds.jsonl"
    data = "\n".join(BAD_LINES).encode() + b'\n{"id": "r9", "prompt": "caf\xe9", "response": "x"}\n'  # 9: not_utf8
    path.write_bytes(data)
    return path


def test_bad_records_are_skipped_and_reported_with_file_and_row(tmp_path):
    path = _bad_file(tmp_path)
    seeds, report = load_seeds(SeedConfig(path=str(path)))
    assert [s.id for s in seeds] == ["ok1", "ok7"]
    by_line = {e.line: e.reason for e in report.errors}
    assert by_line == {2: "missing_field", 3: "empty_field", 4: "wrong_type", 5: "invalid_json",
                       6: "not_an_object", 8: "duplicate", 9: "not_utf8"}
    messages = report.to_json()["first"]
    assert all(m.startswith(f"{path}:") for m in messages)
    assert f"{path}:2: missing_field: no field 'response'" in messages[0]
    assert "field 'response' is int, expected string" in messages[2]
    assert "repeats" in next(m for m in messages if ":8: duplicate" in m)


def test_on_error_raise_stops_at_the_first_bad_row(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(InputFileError, match=rf"{path}:2: missing_field: no field 'response'"):
        load_seeds(SeedConfig(path=str(path), on_error="raise"))
    # One bad line after good ones: the error names that line.
    only_bad = tmp_path / "one_bad.jsonl"
    only_bad.write_text(BAD_LINES[0] + "\n\n" + BAD_LINES[3] + "\n")  # a blank line in between keeps numbering
    with pytest.raises(InputFileError, match=rf"{only_bad}:3: wrong_type"):
        load_seeds(SeedConfig(path=str(only_bad), on_error="raise"))


def test_bad_chat_records(tmp_path):
    rows = [
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": "Only a question?"}]},
        {"messages": [{"role": "assistant", "content": "An answer without a question."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"chat": []},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputFileError, match="no usable seed records") as err:
        load_seeds(SeedConfig(path=str(path), messages_field="messages"))
    assert str(path) in str(err.value)
    cfg = SeedConfig(path=str(path), messages_field="messages", on_error="raise")
    with pytest.raises(InputFileError, match=rf"{path}:1: wrong_type"):
        load_seeds(cfg)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    reasons = []
    for k in range(5):
        path.write_text(json.dumps(rows[1 + k]) + "\n")
        with pytest.raises(InputFileError) as e:
            load_seeds(cfg)
        assert f"{path}:1:" in str(e.value)
        reasons.append(str(e.value).split(":")[2].strip())
    assert reasons == ["missing_assistant_turn", "missing_user_turn", "empty_field", "bad_message", "missing_field"]


def test_unusable_sources(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        load_seeds(SeedConfig(path=str(tmp_path / "nope.jsonl")))
    txt = tmp_path / "seeds.txt"
    txt.write_text("a prompt without an answer\n")
    with pytest.raises(InputFileError, match="needs a prompt and a response"):
        load_seeds(SeedConfig(path=str(txt)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputFileError, match=rf"{empty}: no usable seed records \(file is empty\)"):
        load_seeds(SeedConfig(path=str(empty)))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InputFileError, match=rf"{broken}: not a readable Parquet file"):
        load_seeds(SeedConfig(path=str(broken)))
    with pytest.raises(ValueError, match="on_error"):
        load_seeds(SeedConfig(path=str(empty), on_error="ignore"))


def test_builtin_seed_set_loads_cleanly():
    if not BUILTIN_SEEDS.exists():
        pytest.skip(f"{BUILTIN_SEEDS} is not written yet")
    seeds, report = load_seeds(SeedConfig())
    defaults = SeedConfig()
    assert report.errors == []
    # The default run holds out `heldout` seeds and trains on `train_size` more.
    assert len(seeds) >= defaults.heldout + defaults.train_size


def test_heldout_split(tmp_path):
    seeds, _ = load_seeds(SeedConfig(path=str(write_seed_file(tmp_path / "s.jsonl"))))
    assert heldout_count(3, 14) == 3 and heldout_count(0.25, 14) == 4 and heldout_count(0.01, 14) == 1
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError):
            heldout_count(bad, 14)
    split = split_seeds(seeds, SeedConfig(heldout=0.25, train_size=6), seed=0)
    assert len(split.heldout) == 4 and len(split.train) == 6 and len(split.unused) == 4
    ids = [s.id for s in split.heldout + split.train + split.unused]
    assert sorted(ids) == sorted(s.id for s in seeds)            # a partition: nothing lost, nothing twice
    assert split_seeds(seeds, SeedConfig(heldout=0.25, train_size=6), seed=0) == split
    assert split_seeds(seeds, SeedConfig(heldout=0.25, train_size=6), seed=1).heldout != split.heldout
    everything = split_seeds(seeds, SeedConfig(heldout=3, train_size=None), seed=0)
    assert len(everything.train) == 11 and not everything.unused
    with pytest.raises(ValueError, match="fewer than 2 for training"):
        split_seeds(seeds, SeedConfig(heldout=13), seed=0)
