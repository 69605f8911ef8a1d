"""Read a run's output dir back from disk (manifests, shards, rejects, train histories, evaluations).

Only files are read, never the live objects of a run, so a report can be rebuilt at any time, for a run that
was killed half-way too (then there is no summary.json and every iter_k/ with a manifest is taken).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

# Two prompts are near-duplicates when their word-trigram sets overlap this much (Jaccard).
NEAR_DUP_JACCARD = 0.7
# Near-duplicate search is quadratic in the worst case: above this many prompts per iteration, a seeded sample.
NEAR_DUP_MAX_PROMPTS = 5000


@dataclass
class Iteration:
    k: int
    dir: Path
    manifest: dict
    chosen_tokens: list[int] = field(default_factory=list)
    rejected_tokens: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)      # every prompt produced: pairs and rejects
    history: list[dict] = field(default_factory=list)     # SimPO train_history.jsonl
    repetition: dict = field(default_factory=dict)

    @property
    def train(self) -> dict | None:
        return (self.manifest.get("train") or {}).get("summary")


@dataclass
class Run:
    dir: Path
    summary: dict
    mode: str
    iterations: list[Iteration]
    extra_train: dict = field(default_factory=dict)       # SynPO's generator SFT summary


def _file(entry: dict, folder: Path) -> Path:
    # Manifests hold absolute paths; a run dir that was moved still has its files next to the manifest.
    path = Path(entry["file"])
    return path if path.exists() else folder / path.name


def _user_text(messages) -> str:
    return next((m["content"] for m in messages or [] if m.get("role") == "user"), "")


def _history(iter_dir: Path) -> list[dict]:
    path = iter_dir / "model" / "train_history.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    record = iter_dir / "train.json"
    if not record.exists():
        return []
    return json.loads(record.read_text()).get("history") or []


def load_iteration(k: int, iter_dir: Path) -> Iteration:
    it = Iteration(k=k, dir=iter_dir, manifest=json.loads((iter_dir / "manifest.json").read_text()))
    for entry in it.manifest.get("shards", []):
        path = _file(entry, iter_dir / "shards")
        if entry.get("rows", 1) == 0 or not path.exists():
            continue
        t = pq.read_table(path, columns=["prompt", "chosen_tokens", "rejected_tokens", "judge_confidence"]).to_pydict()
        it.prompts += [_user_text(p) for p in t["prompt"]]
        it.chosen_tokens += [int(x) for x in t["chosen_tokens"]]
        it.rejected_tokens += [int(x) for x in t["rejected_tokens"]]
        it.confidence += [float(x) for x in t["judge_confidence"] if x is not None]
    for entry in it.manifest.get("rejects", []):
        path = _file(entry, iter_dir / "rejects")
        if entry.get("rows", 1) and path.exists():
            it.prompts += [p for p in pq.read_table(path, columns=["prompt"]).column(0).to_pylist() if p]
    it.history = _history(iter_dir)
    return it


def load_run(out: str | Path) -> Run:
    out = Path(out).expanduser().resolve()
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    dirs = sorted((int(m.group(1)), d) for d in out.glob("iter_*")
                  if (m := re.fullmatch(r"iter_(\d+)", d.name)) and (d / "manifest.json").exists())
    if not dirs:
        raise FileNotFoundError(f"{out}: no iter_*/manifest.json — not a selfalign-ray output dir")
    iterations = [load_iteration(k, d) for k, d in dirs]
    earlier: list[str] = []
    for it in iterations:
        it.repetition = repetition(it.prompts, earlier, seed=it.k)
        earlier += it.prompts
    mode = summary.get("mode") or iterations[0].manifest.get("mode", "?")
    run = Run(dir=out, summary=summary, mode=mode, iterations=iterations)
    generator = out / "synpo" / "generator.json"
    if generator.exists():
        run.extra_train["generator SFT"] = json.loads(generator.read_text()).get("summary") or {}
    return run


# ------------------------------------------------------------------------------------------ repetition
def _normalise(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _shingles(words: list[str]) -> frozenset:
    if len(words) < 3:  # too short for trigrams: compare the words themselves
        return frozenset((w,) for w in words)
    return frozenset(tuple(words[i:i + 3]) for i in range(len(words) - 2))


def repetition(prompts: list[str], earlier: list[str], threshold: float = NEAR_DUP_JACCARD,
               max_prompts: int = NEAR_DUP_MAX_PROMPTS, seed: int = 0) -> dict:
    """How repetitive one iteration's prompts are.

    exact_dup_rate: share of prompts whose normalised text (lower case, words only) already occurred in the
        iteration; near_dup_rate: share with a word-trigram Jaccard >= threshold to an earlier prompt of the
        iteration (exact ones included); repeated_from_earlier_rate: share that is a near-duplicate of a prompt
        of an earlier iteration.
    """
    n = len(prompts)
    if not n:
        return {"prompts": 0, "exact_dup_rate": None, "near_dup_rate": None, "repeated_from_earlier_rate": None,
                "sampled": False}
    norm = [" ".join(_normalise(p)) for p in prompts]
    seen: set[str] = set()
    exact = 0
    for t in norm:
        exact += t in seen
        seen.add(t)
    rng = random.Random(seed)
    sample = list(range(n)) if n <= max_prompts else sorted(rng.sample(range(n), max_prompts))
    old = [" ".join(_normalise(p)) for p in earlier]
    if len(old) > max_prompts:
        old = rng.sample(old, max_prompts)
    index: dict[tuple, list[int]] = defaultdict(list)
    sets: list[frozenset] = []

    def add(s: frozenset) -> None:
        sets.append(s)
        for g in s:
            index[g].append(len(sets) - 1)

    for t in old:
        add(_shingles(t.split()))
    n_old = len(sets)
    near = repeated = 0
    for i in sample:
        s = _shingles(norm[i].split())
        shared = Counter(j for g in s for j in index.get(g, ()))
        matches = [j for j, c in shared.items() if c / (len(s) + len(sets[j]) - c) >= threshold]
        if not s:  # an empty prompt only matches other empty ones
            matches = [j for j in range(len(sets)) if not sets[j]][:1]
        near += any(j >= n_old for j in matches)
        repeated += any(j < n_old for j in matches)
        add(s)
    m = len(sample)
    return {"prompts": n, "exact_dup_rate": exact / n, "near_dup_rate": near / m,
            "repeated_from_earlier_rate": repeated / m if old else None, "sampled": m < n}
