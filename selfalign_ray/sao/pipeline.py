"""One SAO generation iteration: sample personas -> one actor pool (instruct, respond, judge) -> shards."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd

from selfalign_ray.config import ConfigError, positive, typed
from selfalign_ray.data.personas import PersonaConfig, load_personas, sample_personas
from selfalign_ray.data.shards import IterationStore
from selfalign_ray.engines.config import engine_config
from selfalign_ray.generation.assemble import PairAssembler
from selfalign_ray.generation.pool import PoolSpec
from selfalign_ray.generation.rows import TRUNCATION_DROP, check_truncation
from selfalign_ray.generation.runner import assign_chunks, run_generation
from selfalign_ray.sao.judge import JudgeConfig
from selfalign_ray.sao.stages import InstructStage, JudgeStage, RespondStage, SamplingConfig

log = logging.getLogger(__name__)


def generate_sao(cfg, iteration: int, model_path: str, iter_dir: Path) -> dict:
    """Write `iter_dir/{shards,rejects}/` and `iter_dir/manifest.json`; return the manifest."""
    mode = cfg.mode
    dataset_size = positive(cfg.dataset_size, "dataset_size")
    persona_cfg = typed(PersonaConfig, cfg.personas, "personas")
    pool, read_report = load_personas(persona_cfg)
    sampled = sample_personas(pool, dataset_size, cfg.seed, iteration)
    judge_cfg = typed(JudgeConfig, cfg.judge, "judge")
    engine_cfg = engine_config(cfg)  # the engine node + the model's load policy (models/loading.py)
    instruct = typed(SamplingConfig, mode.instruct, "mode.instruct")
    respond = typed(SamplingConfig, mode.respond, "mode.respond")
    if respond.n < 2:
        raise ValueError(f"mode.respond.n must be >= 2 to form a pair, got {respond.n}")
    for where, sampling in (("mode.instruct", instruct), ("mode.respond", respond)):
        try:
            sampling.spec()  # the engines' own checks (max_tokens >= 1, 0 < top_p <= 1, ...), here on the driver
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    # Validated before run.json binds it: a bad value must not make the output dir refuse the corrected command.
    shard_size = positive(mode.shard_size, "mode.shard_size")
    truncation = check_truncation(mode.get("truncation", TRUNCATION_DROP))

    store = IterationStore(iter_dir)
    # Everything that decides which rows exist and what they contain; a resume must match it.
    store.bind_settings({
        "mode": "sao", "iteration": iteration, "model": model_path, "seed": cfg.seed,
        "dataset_size": dataset_size, "personas": persona_cfg.__dict__, "instruct": instruct.__dict__,
        "respond": respond.__dict__, "judge": judge_cfg.__dict__, "shard_size": shard_size,
        "require_prefix": mode.require_prefix, "min_prompt_chars": mode.min_prompt_chars, "truncation": truncation,
        # The sampled personas themselves: an edited persona file under the same path must not mix two samples.
        "inputs_sha256": hashlib.sha256("\n".join(f"{p.id}\t{p.text}" for p in sampled).encode()).hexdigest(),
        # Another hub revision is another model (only when pinned, so that older run.json files still match).
        **({"model_revision": engine_cfg.load.revision} if engine_cfg.load.revision else {}),
    })
    inputs = assign_chunks(pd.DataFrame({
        "source_id": [p.id for p in sampled],
        "source": [p.text for p in sampled],
        "iteration": iteration,
        "mode": "sao",
    }), shard_size)
    stages = [
        InstructStage(instruct, cfg.seed, require_prefix=mode.require_prefix, min_prompt_chars=mode.min_prompt_chars,
                      truncation=truncation),
        RespondStage(respond, cfg.seed, truncation=truncation),
        JudgeStage(judge_cfg, cfg.seed),
    ]
    pools = [PoolSpec("sao", model_path, engine_cfg, stages)]
    assembler = PairAssembler("sao", iteration, model_path, tuple(s.name for s in stages))
    extra = {
        "mode": "sao", "iteration": iteration, "model": model_path, "engine": engine_cfg.kind,
        "judge": judge_cfg.kind, "truncation": truncation, "seed": cfg.seed, "dataset_size": dataset_size,
        "persona_pool_size": len(pool), "input_errors": read_report.to_json(),
        # How the weights were allowed to load, and the hub revision pinned (null: the default branch).
        "model_load": engine_cfg.model_load,
    }
    return run_generation(store, inputs, pools, assembler, extra)
