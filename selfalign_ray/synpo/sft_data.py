"""SFT data for the self-prompt generator and the response improver.

Both are written as Parquet in TRL's prompt-completion conversational format — columns `prompt` and
`completion`, each list<struct<role: string, content: string>> — which the project trainer reads with
objective="sft" (the prompt is masked, the completion is learned), plus provenance columns it ignores.

Generator (paper Sec. 2.1): for seed i, 2 keywords of its prompt + 1 noise keyword of another seed's
prompt, shuffled, fill the question template; the target is the seed prompt and its answer in the
<question>/<solution> format. The noise keyword teaches the generator to ignore an unrelated keyword.

Improver (paper Sec. 2.2): seed prompt + the current model's answer to it fill the improver template; the
target is the seed's gold answer.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfalign_ray.data.schema import MESSAGES, assistant_turn, user_turn
from selfalign_ray.data.shards import atomic_write_bytes
from selfalign_ray.engines.base import request_seed
from selfalign_ray.synpo.keywords import extract_keywords, keyword_text, sample_keywords
from selfalign_ray.synpo.seeds import Seed
from selfalign_ray.synpo.templates import (
    generator_prompt,
    generator_target,
    improver_prompt,
)

SFT_SCHEMA = pa.schema([
    ("prompt", MESSAGES),       # the user turn (a filled template)
    ("completion", MESSAGES),   # the assistant turn to learn
    ("seed_id", pa.string()),   # which seed the example was built from
    ("keywords", pa.string()),  # generator data: the keyword list in the prompt; improver data: ""
])


def _noise_keyword(seeds: list[Seed], own_seed: Seed, candidates: dict[str, list[str]],
                   rng: random.Random) -> str | None:
    """A keyword of another seed's prompt that is no candidate of the own prompt, so it is really unrelated
    noise (random donors first; a scan if unlucky)."""
    own = set(candidates[own_seed.id])

    def usable(donor: Seed) -> list[str]:
        return [] if donor.id == own_seed.id else [w for w in candidates[donor.id] if w not in own]

    for _ in range(20):
        words = usable(rng.choice(seeds))
        if words:
            return rng.choice(words)
    for donor in seeds:
        words = usable(donor)
        if words:
            return rng.choice(words)
    return None


def generator_examples(seeds: list[Seed], seed: int, top_k: int = 12,
                       min_word_length: int = 4) -> tuple[list[dict], Counter]:
    """One example per seed whose prompt has >= 2 keyword candidates; the rest are counted by reason."""
    candidates = {s.id: extract_keywords(s.prompt, min_word_length) for s in seeds}
    skipped: Counter = Counter()
    rows = []
    for s in seeds:
        rng = random.Random(request_seed(seed, "generator_keywords", s.id))
        own = sample_keywords(candidates[s.id], 2, rng, top_k)
        if own is None:
            skipped["too_few_keywords"] += 1
            continue
        noise = _noise_keyword(seeds, s, candidates, rng)
        if noise is None:
            skipped["no_noise_keyword"] += 1
            continue
        keywords = own + [noise]
        rng.shuffle(keywords)
        rows.append({"prompt": user_turn(generator_prompt(keyword_text(keywords))),
                     "completion": assistant_turn(generator_target(s.prompt, s.response)),
                     "seed_id": s.id, "keywords": keyword_text(keywords)})
    return rows, skipped


def improver_example(seed: Seed, model_answer: str) -> dict:
    return {"prompt": user_turn(improver_prompt(seed.prompt, model_answer)),
            "completion": assistant_turn(seed.response), "seed_id": seed.id, "keywords": ""}


def write_sft(path: Path, rows: list[dict]) -> str:
    """Write rows atomically (a killed run never leaves a half-written training file)."""
    table = pa.Table.from_pylist(rows, schema=SFT_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return str(path)
