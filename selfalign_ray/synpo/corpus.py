"""The keyword corpus: paragraphs that keyword lists are sampled from, and the per-iteration sampling.

The paper samples keywords from RefinedWeb paragraphs (App. C.1). Here the corpus is (mode.keywords):
the builtin corpus (selfalign_ray/builtin/corpus.txt) or a local file — .txt (paragraphs separated by blank
lines), .jsonl/.json/.parquet (one document per record in `field`, split into paragraphs at blank lines) —
or a Hugging Face dataset (e.g. tiiuae/falcon-refinedweb, field `content`), plus, by default, the
prompts of the non-held-out seeds. Every paragraph is reduced to its ranked keyword candidates once;
paragraphs with fewer than `per_list` candidates cannot give a list and are counted, not used.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from selfalign_ray.data.inputs import (
    InputFileError,
    ReadReport,
    RecordError,
    handle_error,
    iter_records,
    read_lines,
)
from selfalign_ray.engines.base import request_seed
from selfalign_ray.synpo.keywords import extract_keywords, keyword_text, sample_keywords

BUILTIN_CORPUS = Path(__file__).resolve().parent.parent / "builtin" / "corpus.txt"
# A corpus line (a .txt line, or one JSONL document) may hold this many bytes; a longer one is skipped unread.
CORPUS_LINE_BYTES = 8 << 20
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass
class KeywordsConfig:
    """Mirrors `mode.keywords` in conf/mode/synpo.yaml."""

    path: str | None = None             # .txt/.jsonl/.json/.parquet; null = builtin corpus
    hf_dataset: str | None = None       # e.g. tiiuae/falcon-refinedweb (needs hub access)
    hf_subset: str | None = None
    hf_split: str = "train"
    field: str = "text"                 # document field of .jsonl/.parquet records and hub rows
    max_documents: int | None = 100000  # documents read from a hub dataset (streamed) or a file
    include_seed_prompts: bool = True   # add the non-held-out seed prompts as paragraphs
    min_paragraph_chars: int = 40       # shorter paragraphs (headings, menu items) are skipped
    on_error: str = "skip"              # skip | raise, for malformed records
    per_list: int = 3                   # keywords per list (the paper: 3)
    min_word_length: int = 4
    top_k: int = 12                     # keywords are drawn from a paragraph's top_k candidates


@dataclass(frozen=True)
class Paragraph:
    id: str                 # "corpus.txt:12" (file:paragraph) or "seed:<seed id>"
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class KeywordList:
    source_id: str          # the paragraph it came from
    keywords: tuple[str, ...]

    @property
    def text(self) -> str:
        return keyword_text(self.keywords)


def _paragraphs(text: str, min_chars: int) -> list[str]:
    return [p.strip() for p in _BLANK_LINES.split(text) if len(p.strip()) >= min_chars]


def _text_file(path: Path, report: ReadReport, on_error: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, paragraph) of a UTF-8 text file, the first `limit` paragraphs (max_documents); read line by line, each
    line capped at CORPUS_LINE_BYTES; undecodable or over-long lines are reported and left out."""
    lines, para_start, out = [], 1, []
    if not path.exists():
        raise InputFileError(f"{path}: file not found")

    def close_paragraph():
        nonlocal lines
        if lines:
            out.append((f"{path.name}:{para_start}", "\n".join(lines)))
            lines = []

    with open(path, "rb") as f:
        for lineno, raw in read_lines(f, CORPUS_LINE_BYTES):
            if limit is not None and len(out) >= limit:
                break
            if raw is None:
                handle_error(RecordError(str(path), lineno, "line_too_long",
                                         f"line longer than {CORPUS_LINE_BYTES} bytes (skipped unread)"), report, on_error)
                continue
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                handle_error(RecordError(str(path), lineno, "not_utf8", f"invalid UTF-8 byte at offset {err.start}"),
                             report, on_error)
                continue
            if line.strip():
                if not lines:
                    para_start = lineno
                lines.append(line)
            else:
                close_paragraph()
        close_paragraph()
    return out[:limit] if limit is not None else out


def _documents(cfg: KeywordsConfig, report: ReadReport) -> list[tuple[str, str]]:
    """(id, document text) of the configured corpus."""
    limit = cfg.max_documents
    if cfg.hf_dataset:
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_subset, split=cfg.hf_split, streaming=True)
        out = []
        for i, row in enumerate(ds):
            if limit is not None and i >= limit:
                break
            text = row.get(cfg.field)
            if isinstance(text, str) and text.strip():
                out.append((f"{cfg.hf_dataset}:{i}", text))
        if not out:
            raise InputFileError(f"{cfg.hf_dataset}: no text in field {cfg.field!r}")
        return out
    path = Path(cfg.path).expanduser() if cfg.path else BUILTIN_CORPUS
    if path.suffix.lower() == ".txt":
        return _text_file(path, report, cfg.on_error, limit)
    out = []
    for row, record in iter_records(path, cfg.field, columns=[cfg.field], max_line_bytes=CORPUS_LINE_BYTES):
        if isinstance(record, RecordError):
            handle_error(record, report, cfg.on_error)
            continue
        text = record.get(cfg.field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            handle_error(RecordError(str(path), row, "missing_field" if not isinstance(record, dict) or cfg.field not in record
                                     else "wrong_type" if not isinstance(text, str) else "empty_field",
                                     f"no text in field {cfg.field!r}"), report, cfg.on_error)
            continue
        out.append((f"{path.name}:{row}", text))
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass
class Corpus:
    paragraphs: list[Paragraph]   # only paragraphs that can give a keyword list
    too_few_keywords: int          # paragraphs skipped for having fewer than per_list candidates
    report: ReadReport

    def stats(self) -> dict:
        return {"paragraphs": len(self.paragraphs), "too_few_keywords": self.too_few_keywords,
                "input_errors": self.report.to_json()}


def build_corpus(cfg: KeywordsConfig, seed_prompts: list[tuple[str, str]]) -> Corpus:
    """Paragraphs of the configured corpus plus (id, prompt) of the seeds, reduced to keyword candidates."""
    if cfg.on_error not in ("skip", "raise"):
        raise ValueError(f"mode.keywords.on_error={cfg.on_error!r} must be 'skip' or 'raise'")
    report = ReadReport()
    texts: list[tuple[str, str]] = []
    for doc_id, doc in _documents(cfg, report):
        parts = _paragraphs(doc, cfg.min_paragraph_chars)
        texts += [(doc_id if len(parts) == 1 else f"{doc_id}#{k}", p) for k, p in enumerate(parts)]
    if cfg.include_seed_prompts:
        texts += [(f"seed:{sid}", prompt) for sid, prompt in seed_prompts]
    paragraphs, skipped = [], 0
    for pid, text in texts:
        candidates = extract_keywords(text, cfg.min_word_length)
        if len(candidates) < cfg.per_list:
            skipped += 1
            continue
        paragraphs.append(Paragraph(pid, tuple(candidates[:max(cfg.top_k, cfg.per_list)])))
    if not paragraphs:
        raise InputFileError(f"keyword corpus ({cfg.hf_dataset or cfg.path or BUILTIN_CORPUS}): no paragraph has "
                             f"{cfg.per_list} keyword candidates")
    return Corpus(paragraphs, skipped, report)


def sample_keyword_lists(corpus: Corpus, n: int, seed: int, iteration: int, cfg: KeywordsConfig) -> list[KeywordList]:
    """`n` keyword lists for iteration k (1-based), each from a different paragraph.

    Paragraphs are consecutive slices of one seeded shuffle, so iterations use different paragraphs
    until the corpus is used up (then it wraps around, with freshly drawn keywords).
    """
    total = len(corpus.paragraphs)
    if n <= 0:
        raise ValueError(f"mode.keyword_lists must be positive, got {n}")
    if n > total:
        raise ValueError(f"mode.keyword_lists={n} is larger than the keyword corpus ({total} usable paragraphs)")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    start = (iteration - 1) * n
    lists = []
    for i in range(n):
        para = corpus.paragraphs[order[(start + i) % total]]
        rng = random.Random(request_seed(seed, "keywords", iteration, para.id))
        lists.append(KeywordList(para.id, tuple(sample_keywords(list(para.candidates), cfg.per_list, rng, cfg.top_k))))
    return lists
