"""Persona files: every malformed record is reported with file and line; nothing is guessed."""

import json

import pytest

from selfalign_ray.data.inputs import InputFileError
from selfalign_ray.data.personas import BUILTIN_PERSONAS, PersonaConfig, load_personas, sample_personas

GOOD = json.dumps({"id": "a", "persona": "A beekeeper in Wales who sells honey at farmers markets."})
GOOD2 = json.dumps({"id": "b", "persona": "A bus driver in Nairobi learning Python in the evenings."})


def write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("content, reason, line", [
    (GOOD + "\n{not json\n" + GOOD2 + "\n", "invalid_json", 2),
    (GOOD + "\n" + json.dumps({"id": "x", "text": "no persona field"}) + "\n" + GOOD2, "missing_field", 2),
    (GOOD + "\n" + json.dumps({"persona": 42}) + "\n" + GOOD2, "wrong_type", 2),
    (GOOD + "\n" + json.dumps({"persona": "   "}) + "\n" + GOOD2, "empty_field", 2),
    (GOOD + "\n" + GOOD2 + "\n" + json.dumps(["a list"]), "not_an_object", 3),
])
def test_bad_jsonl_record_is_skipped_and_named(tmp_path, content, reason, line):
    path = write(tmp_path, "p.jsonl", content.encode())
    personas, report = load_personas(PersonaConfig(path=str(path)))
    assert [p.id for p in personas] == ["a", "b"]
    assert [(e.reason, e.line, e.file) for e in report.errors] == [(reason, line, str(path))]
    with pytest.raises(InputFileError, match=rf"p\.jsonl:{line}: {reason}"):
        load_personas(PersonaConfig(path=str(path), on_error="raise"))


def test_non_utf8_line_blank_lines_and_duplicates(tmp_path):
    path = write(tmp_path, "p.jsonl", GOOD.encode() + b"\n\n   \n" + b'{"persona": "caf\xe9"}\n' + GOOD.encode() + b"\n" + GOOD2.encode())
    personas, report = load_personas(PersonaConfig(path=str(path)))
    assert [p.id for p in personas] == ["a", "b"]
    assert sorted(e.reason for e in report.errors) == ["duplicate", "not_utf8"]
    assert report.to_json()["by_reason"] == {"not_utf8": 1, "duplicate": 1}
    assert any(":4: not_utf8" in m for m in report.to_json()["first"])
    assert any(m.endswith(f"p.jsonl:5: duplicate: persona a repeats {path}:1") for m in report.to_json()["first"])


def test_text_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = write(tmp_path, "p.txt", b"A potter in Kyoto.\n\nA welder in Gdansk.\n")
    personas, _ = load_personas(PersonaConfig(path=str(txt)))
    assert [p.text for p in personas] == ["A potter in Kyoto.", "A welder in Gdansk."]
    pq.write_table(pa.table({"persona": ["A potter in Kyoto.", None, "A welder."]}), tmp_path / "p.parquet")
    personas, report = load_personas(PersonaConfig(path=str(tmp_path / "p.parquet")))
    assert len(personas) == 2 and [(e.reason, e.line) for e in report.errors] == [("wrong_type", 2)]


@pytest.mark.parametrize("name, content, match", [
    ("p.csv", b"persona\nx\n", "unsupported file type .csv"),
    ("p.jsonl", b"", "no usable personas"),
    ("p.jsonl", b"\n\n", "no usable personas"),
    ("p.parquet", b"not parquet at all", "not a readable Parquet file"),
])
def test_unusable_files_fail_clearly(tmp_path, name, content, match):
    path = write(tmp_path, name, content)
    with pytest.raises(InputFileError, match=match):
        load_personas(PersonaConfig(path=str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        load_personas(PersonaConfig(path=str(tmp_path / "nope.jsonl")))


def test_builtin_set_is_large_diverse_and_clean():
    personas, report = load_personas(PersonaConfig())
    assert BUILTIN_PERSONAS.exists()
    assert len(personas) >= 300 and not report.errors
    openings = {p.text.split()[0] for p in personas}
    assert len(openings) > 3


def test_sampling_is_seeded_and_iterations_take_fresh_personas():
    pool, _ = load_personas(PersonaConfig())
    first = sample_personas(pool, 20, seed=7, iteration=1)
    assert first == sample_personas(pool, 20, seed=7, iteration=1)
    assert first != sample_personas(pool, 20, seed=8, iteration=1)
    second = sample_personas(pool, 20, seed=7, iteration=2)
    assert not {p.id for p in first} & {p.id for p in second}
    with pytest.raises(ValueError, match="larger than the persona pool"):
        sample_personas(pool, len(pool) + 1, seed=0, iteration=1)
    with pytest.raises(ValueError, match="must be positive"):
        sample_personas(pool, 0, seed=0, iteration=1)
