"""One SynPO generation iteration: keyword lists -> chain of pools (generator, policy, improver, initial model,
filters, judge) -> preference shards, through the shared chunked, resumable driver (generation/runner.py)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from selfalign_ray.data.schema import prompt_id
from selfalign_ray.data.shards import IterationStore
from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.generation.assemble import PairAssembler
from selfalign_ray.generation.rows import drop
from selfalign_ray.generation.runner import assign_chunks, run_generation
from selfalign_ray.synpo.chain import build_chain
from selfalign_ray.synpo.config import SynpoConfig
from selfalign_ray.synpo.corpus import KeywordList
from selfalign_ray.synpo.stages import (
    AnswerStage,
    ImproveStage,
    PairFilterStage,
    PreferenceStage,
    QuestionStage,
)

STAGE_NAMES = ("question", "respond", "improve", "respond_initial", "judge")


@dataclass(frozen=True)
class Models:
    """The models of iteration t."""

    base: str        # π_0 = θ0: writes the rejected answers
    generator: str   # G: SFT of θ0 on seed data, writes prompts
    policy: str      # π_{t-1}: the answers the improver rewrites
    improver: str    # R_t: SFT of θ0 on (seed prompt, π_{t-1} answer) -> gold answer
    judge: str       # scores (chosen, rejected) for the score-gap filter


@dataclass
class SkipEarlierPrompts:
    """Assembler wrapper: a prompt that was a pair in an earlier iteration is rejected, so the cumulative
    dataset never holds one prompt twice (the inner assembler already drops repeats within the iteration)."""

    inner: PairAssembler
    earlier: frozenset

    def __call__(self, chunk: pd.DataFrame, seen: set):
        # Rows of one chunk come from several batches whose indexes overlap: give each row its own label.
        chunk = chunk.reset_index(drop=True)
        for idx in chunk.index[(chunk["status"] == "ok") & (chunk["prompt_text"] != "")]:
            if prompt_id(chunk.at[idx, "prompt_text"]) in self.earlier:
                drop(chunk, idx, "dedup", "duplicate_prompt_earlier_iteration",
                     "the same prompt became a pair in an earlier iteration")
        return self.inner(chunk, seen)


def pair_chain(sc: SynpoConfig, models: Models, engine: EngineConfig, seed: int):
    """The pools of one iteration (see synpo/stages.py for the order and the columns)."""
    first_iteration = models.policy == models.base
    steps = [
        ("generator", models.generator, [QuestionStage(sc.generator.sampling(), seed, sc.generator.stop_at_question_end,
                                                       sc.generator.require_tags, sc.generator.min_prompt_chars,
                                                       truncation=sc.truncation)]),
        # π_{t-1} = π_0 in iteration 1: its answer is both the text to improve and the rejected answer.
        ("policy", models.policy, [AnswerStage(sc.respond.sampling(), seed,
                                               ("policy", "rejected") if first_iteration else ("policy",),
                                               truncation=sc.truncation)]),
        ("improver", models.improver, [ImproveStage(sc.improve.sampling(), seed, truncation=sc.truncation)]),
        ("initial", models.base, [] if first_iteration else
         [AnswerStage(sc.respond.sampling(), seed, ("rejected",), name="respond_initial", truncation=sc.truncation,
                      cut_reason="truncated_initial_response")]),
        ("filter", models.base, [PairFilterStage(sc.filter.max_repetition, sc.filter.ngram)]),
        ("judge", models.judge, [] if sc.filter.min_gap is None else [PreferenceStage(sc.filter.min_gap)]),
    ]
    return build_chain(steps, engine, sc.pool_resources)


def _digest(lists: list[KeywordList]) -> str:
    return hashlib.sha256("\n".join(f"{k.source_id}\t{k.text}" for k in lists).encode()).hexdigest()


def generate_pairs(sc: SynpoConfig, iteration: int, models: Models, iter_dir: Path, keyword_lists: list[KeywordList],
                   earlier: set[str], engine: EngineConfig, seed: int, manifest_extra: dict) -> dict:
    """Write `iter_dir/{shards,rejects}/` and `iter_dir/manifest.json`; return the manifest."""
    store = IterationStore(iter_dir)
    # Everything that decides which rows exist and what they contain; a resume must match it.
    store.bind_settings({
        "mode": "synpo", "iteration": iteration, "models": asdict(models), "seed": seed,
        "keyword_lists": len(keyword_lists), "keyword_lists_sha256": _digest(keyword_lists),
        "generator": asdict(sc.generator), "respond": asdict(sc.respond), "improve": asdict(sc.improve),
        "filter": asdict(sc.filter), "shard_size": sc.shard_size, "truncation": sc.truncation,
    })
    inputs = assign_chunks(pd.DataFrame({
        "source_id": [k.source_id for k in keyword_lists],
        "source": [k.text for k in keyword_lists],
        "iteration": iteration,
        "mode": "synpo",
    }), sc.shard_size)
    pools = pair_chain(sc, models, engine, seed)
    assembler = SkipEarlierPrompts(PairAssembler("synpo", iteration, models.policy, STAGE_NAMES), frozenset(earlier))
    extra = {"mode": "synpo", "iteration": iteration, "models": asdict(models), "model": models.policy,
             "engine": engine.kind, "truncation": sc.truncation, "pools": [p.name for p in pools], "seed": seed,
             "keyword_lists": len(keyword_lists), "earlier_prompts": len(earlier), **manifest_extra}
    return run_generation(store, inputs, pools, assembler, extra)
