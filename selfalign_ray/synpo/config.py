"""Typed view of `mode` when mode=synpo (conf/mode/synpo.yaml documents every field), and the two training
configs SynPO derives from `train`: SFT (generator, improver) and SimPO with the paper's fixed gamma."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from selfalign_ray.config import ConfigError, positive, to_dict, typed
from selfalign_ray.generation.rows import check_truncation
from selfalign_ray.sao.stages import SamplingConfig
from selfalign_ray.synpo.chain import POOL_RESOURCES
from selfalign_ray.synpo.corpus import KeywordsConfig
from selfalign_ray.synpo.seeds import SeedConfig
from selfalign_ray.train.config import TrainConfig


@dataclass
class GenerateConfig:
    """One sampled completion per row (generator, policy, improver, evaluation)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 64

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


@dataclass
class GeneratorConfig(GenerateConfig):
    stop_at_question_end: bool = True
    require_tags: bool = True
    min_prompt_chars: int = 10


@dataclass
class ImproveConfig(GenerateConfig):
    # Improver training keeps a seed only if the judge prefers its gold answer to the model's answer by
    # at least this score gap (paper App. C.2); null = keep every seed.
    min_gold_gap: float | None = None


@dataclass
class FilterConfig:
    max_repetition: float = 0.5
    ngram: int = 3
    # Score-gap filter on (chosen, rejected) with the logprob judge; null = off.
    min_gap: float | None = 0.0
    # The judging model (a local HF dir or hub id of a causal LM); null = the initial model.
    judge_model: str | None = None


@dataclass
class EvalConfig(GenerateConfig):
    enabled: bool = True
    baseline: bool = True
    temperature: float = 0.0


@dataclass
class SimpoConfig:
    # SynPO fixes gamma (1.6) while searching beta; the trainer takes gamma / beta. null = train.gamma_beta_ratio.
    gamma: float | None = 1.6


@dataclass
class SynpoConfig:
    name: str = "synpo"
    shard_size: int = 64
    init_from: str = "base"
    keyword_lists: int = 16
    pairs_per_iteration: int | None = None
    pool_resources: str = "auto"
    # What happens to a question, answer or refinement cut at its max_tokens (generation/rows.py).
    truncation: str = "drop"
    seeds: SeedConfig = field(default_factory=SeedConfig)
    keywords: KeywordsConfig = field(default_factory=KeywordsConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    respond: GenerateConfig = field(default_factory=GenerateConfig)
    improve: ImproveConfig = field(default_factory=ImproveConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: dict = field(default_factory=dict)
    # Overrides of `sft` for the improver runs only (the paper: max length 8,000 generator, 6,000 improver).
    improver_sft: dict = field(default_factory=dict)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)


_NESTED = {"seeds": SeedConfig, "keywords": KeywordsConfig, "generator": GeneratorConfig, "respond": GenerateConfig,
           "improve": ImproveConfig, "filter": FilterConfig, "eval": EvalConfig, "simpo": SimpoConfig}


def synpo_config(mode_node) -> SynpoConfig:
    """Build and check the typed config; unknown keys anywhere are an error naming the node."""
    data = to_dict(mode_node)
    nested = {k: typed(cls, data.get(k) or {}, f"mode.{k}") for k, cls in _NESTED.items()}
    top = typed(SynpoConfig, {k: v for k, v in data.items() if k not in _NESTED}, "mode")
    cfg = dataclasses.replace(top, **nested)
    for name, overrides in (("mode.sft", cfg.sft), ("mode.improver_sft", cfg.improver_sft)):
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ConfigError(f"{name}: unknown key(s) {unknown}; it overrides fields of `train`")
    positive(cfg.shard_size, "mode.shard_size")
    positive(cfg.keyword_lists, "mode.keyword_lists")
    if cfg.pairs_per_iteration is not None:
        positive(cfg.pairs_per_iteration, "mode.pairs_per_iteration")
    if cfg.init_from not in ("base", "previous"):
        raise ConfigError(f"mode.init_from={cfg.init_from!r}: use base (SynPO) or previous")
    check_truncation(cfg.truncation)
    if cfg.pool_resources not in POOL_RESOURCES:
        raise ConfigError(f"mode.pool_resources={cfg.pool_resources!r}: use one of {', '.join(POOL_RESOURCES)}")
    if not 0 <= cfg.filter.max_repetition <= 1:
        raise ConfigError(f"mode.filter.max_repetition must lie in [0, 1], got {cfg.filter.max_repetition}")
    for name, gap in (("mode.filter.min_gap", cfg.filter.min_gap), ("mode.improve.min_gold_gap", cfg.improve.min_gold_gap)):
        if gap is not None and not -1 <= gap <= 1:
            raise ConfigError(f"{name} is a difference of probabilities and must lie in [-1, 1], got {gap}")
    if cfg.keywords.per_list < 1:
        raise ConfigError(f"mode.keywords.per_list must be >= 1, got {cfg.keywords.per_list}")
    return cfg


def sft_train_config(train_node, overrides: dict) -> TrainConfig:
    """`train` with `mode.sft` on top: generator and improver SFT runs."""
    cfg = dataclasses.replace(typed(TrainConfig, train_node, "train"), **overrides)
    cfg.validate()
    return cfg


def simpo_train_config(train_node, simpo: SimpoConfig) -> TrainConfig:
    """`train` with gamma_beta_ratio = gamma / beta when SynPO's fixed gamma is set."""
    cfg = typed(TrainConfig, train_node, "train")
    if simpo.gamma is not None:
        cfg = dataclasses.replace(cfg, gamma_beta_ratio=simpo.gamma / cfg.beta)
    cfg.validate()
    return cfg
