"""Duplicate ids are bad records (personas, SynPO seeds), and inputs are read in bounded memory: Parquet by
projected batches, a capped line length, a capped JSON array, max_documents on text corpora, max_chars on hub
rows, a capped error list. One test reads a file with a 200 MB line and measures the reader's peak RSS."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfalign_ray.data import inputs
from selfalign_ray.data.inputs import InputFileError, ReadReport, iter_records
from selfalign_ray.data.personas import PersonaConfig, _hub_rows, load_personas
from selfalign_ray.synpo.corpus import KeywordsConfig, _documents
from selfalign_ray.synpo.seeds import SeedConfig, load_seeds


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_duplicate_persona_ids_are_bad_records(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "a", "persona": "A chemist who bakes bread."},
                                         {"id": "b", "persona": "A pilot who paints."},
                                         {"id": "a", "persona": "A nurse who climbs mountains."}])
    personas, report = load_personas(PersonaConfig(path=str(path)))
    assert [p.id for p in personas] == ["a", "b"]
    assert [(e.file, e.line, e.reason) for e in report.errors] == [(str(path), 3, "duplicate_id")]
    assert f"{path}:1" in report.errors[0].detail and report.to_json()["by_reason"] == {"duplicate_id": 1}
    with pytest.raises(InputFileError, match=rf"{path}:3: duplicate_id"):
        load_personas(PersonaConfig(path=str(path), on_error="raise"))


def test_duplicate_seed_ids_are_bad_records(tmp_path):
    """Before: both seeds were kept and `by_id` in seed_passes kept only the last, so the improver trained on
    prompt A with B's gold answer. Now the second is skipped and counted, naming both lines."""
    path = _jsonl(tmp_path / "s.jsonl", [{"id": "s1", "prompt": "Name a prime.", "response": "Seven."},
                                         {"id": "s1", "prompt": "Name a colour.", "response": "Teal."},
                                         {"id": "s2", "prompt": "Name a river.", "response": "The Rhine."}])
    seeds, report = load_seeds(SeedConfig(path=str(path)))
    assert [(s.id, s.response) for s in seeds] == [("s1", "Seven."), ("s2", "The Rhine.")]
    assert [(e.line, e.reason) for e in report.errors] == [(2, "duplicate_id")] and f"{path}:1" in report.errors[0].detail


def test_parquet_is_read_in_projected_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"persona": [f"A person number {i}." for i in range(5)], "id": [str(i) for i in range(5)],
                             "embedding": [[0.5] * 1000] * 5}), path, row_group_size=2)
    rows = list(iter_records(path, "persona", columns=["persona", "id", "not_in_file"]))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5]
    assert all(set(r) == {"persona", "id"} for _, r in rows)  # the unread column never left the file
    personas, _ = load_personas(PersonaConfig(path=str(path)))
    assert [p.id for p in personas] == ["0", "1", "2", "3", "4"]


def test_long_lines_are_skipped_and_counted_and_the_error_list_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 64)
    path = _jsonl(tmp_path / "p.txt", ["short one", "x" * 500, "another short one"])
    personas, report = load_personas(PersonaConfig(path=str(path), field="persona", max_chars=20))
    # max_chars=20 gives a line cap of max(64, 8 * 20) = 160 bytes: the 500-byte line is skipped unread.
    assert [p.text for p in personas] == ["short one", "another short one"]
    assert [(e.line, e.reason) for e in report.errors] == [(2, "line_too_long")]
    bad = _jsonl(tmp_path / "bad.jsonl", ["{not json"] * 250 + [json.dumps({"persona": "A real persona."})])
    personas, report = load_personas(PersonaConfig(path=str(bad)))
    assert len(personas) == 1 and report.total == 250 and len(report.errors) == inputs.MAX_KEPT_ERRORS
    assert report.to_json()["count"] == 250 and report.to_json()["by_reason"] == {"invalid_json": 250}


def test_line_cap_keeps_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"persona": "first"}) + "\n" + "y" * 3000 + "\n" + json.dumps({"persona": "third"}) + "\n")
    got = list(iter_records(path, "persona", max_line_bytes=1000))
    assert got[0] == (1, {"persona": "first"}) and got[2] == (3, {"persona": "third"})
    assert got[1][0] == 2 and got[1][1].reason == "line_too_long"


def test_a_big_json_array_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_JSON_ARRAY_BYTES", 100)
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"persona": f"A person number {i}."} for i in range(20)]))
    with pytest.raises(InputFileError, match=r"p\.json: a JSON array of \d+ bytes .*JSON Lines"):
        load_personas(PersonaConfig(path=str(path)))
    small = tmp_path / "s.json"
    small.write_text(json.dumps([{"persona": "A pilot."}]))
    assert len(load_personas(PersonaConfig(path=str(small)))[0]) == 1


def test_text_corpus_honours_max_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"Paragraph {i} talks about rivers, mountains and weather." for i in range(10)) + "\n")
    docs = _documents(KeywordsConfig(path=str(path), max_documents=3), ReadReport())
    assert [d for d, _ in docs] == ["c.txt:1", "c.txt:3", "c.txt:5"]
    assert len(_documents(KeywordsConfig(path=str(path), max_documents=None), ReadReport())) == 10


def test_hub_personas_apply_max_chars():
    rows = [{"persona": "A short persona."}, {"persona": "z" * 50}, {"persona": ""}]
    report = ReadReport()
    personas = _hub_rows("proj-persona/PersonaHub", rows, PersonaConfig(max_chars=20), report)
    assert [p.id for p in personas] == ["proj-persona/PersonaHub:0"]
    assert report.counts() == {"too_long": 1, "empty_field": 1}


READ_HUGE = textwrap.dedent("""
    import json, resource, sys
    from selfalign_ray.data.personas import PersonaConfig, load_personas
    from selfalign_ray.synpo.corpus import KeywordsConfig, build_corpus
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    personas, report = load_personas(PersonaConfig(path=sys.argv[1]))
    corpus = build_corpus(KeywordsConfig(path=sys.argv[2], include_seed_prompts=False), [])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kb": before, "after_kb": after, "personas": len(personas),
                      "errors": report.counts(), "paragraphs": len(corpus.paragraphs),
                      "corpus_errors": corpus.report.counts()}))
""")


def _write_huge_line(path: Path, first: str, last: str, prefix: bytes, suffix: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(first.encode() + b"\n" + prefix)
        block = b"w" * (1 << 20)
        for _ in range(size >> 20):
            f.write(block)
        f.write(suffix + b"\n" + last.encode() + b"\n")


def test_a_200_mb_line_is_read_in_bounded_memory(tmp_path):
    """A persona file and a text corpus, each with one 200 MB line between two good records: the reader skips the
    line as `line_too_long` and its peak RSS grows by far less than the line (before: the whole line was read,
    then decoded and parsed)."""
    size = 200 << 20
    personas = tmp_path / "p.jsonl"
    _write_huge_line(personas, json.dumps({"persona": "A chemist who bakes bread."}),
                     json.dumps({"persona": "A pilot who paints landscapes."}), b'{"persona": "', b'"}', size)
    corpus = tmp_path / "c.txt"
    _write_huge_line(corpus, "Rivers carry sediment from mountains toward the ocean every season.\n",
                     "\nGlaciers carve valleys while forests reclaim abandoned farmland slowly.", b"", b"", size)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", READ_HUGE, str(personas), str(corpus)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["personas"] == 2 and got["errors"] == {"line_too_long": 1}
    assert got["paragraphs"] == 2 and got["corpus_errors"] == {"line_too_long": 1}
    grown_mb = (got["after_kb"] - got["before_kb"]) / 1024
    assert grown_mb < 40, f"peak RSS grew by {grown_mb:.0f} MB reading a 200 MB line"
