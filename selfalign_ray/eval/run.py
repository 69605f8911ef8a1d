"""Run an evaluation: A (and B) answer the prompts, the judge compares them in both orders, files go to disk.

The answers and the verdicts run through the project's Ray Data engine pools (synpo/chain.py: one pool per
model, adjacent steps on one model share a pool), so `engine=vllm` and GPU placement work as in generation.

    out/model_outputs.json       A's answers, AlpacaEval format (alpaca_eval --model_outputs)
    out/reference_outputs.json   B's answers, same format (alpaca_eval --reference_outputs)
    out/judgements.jsonl         per prompt: both answers, P(A better), orders agree, outcome
    out/results.json             the win rate, its interval and counts (also returned)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from selfalign_ray.data import storage
from selfalign_ray.data.shards import atomic_write_json
from selfalign_ray.engines.base import SamplingSpec
from selfalign_ray.engines.config import EngineConfig, engine_config
from selfalign_ray.eval.data import PromptsConfig, alpaca_outputs, load_prompts
from selfalign_ray.eval.stages import AnswerStage, PairwiseJudgeStage
from selfalign_ray.eval.winrate import win_rate

log = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256

    def spec(self) -> SamplingSpec:
        return SamplingSpec(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


@dataclass
class JudgeSettings:
    model: str | None = None    # preset name or model dir; null = model B (the loop: the base model)
    kind: str = "logprob"       # logprob | generative (sao/judge.py)
    max_tokens: int = 32        # generative only


@dataclass
class CISettings:
    method: str = "wilson"      # wilson | bootstrap (eval/winrate.py)
    level: float = 0.95
    bootstrap_samples: int = 2000


@dataclass
class EvalSettings:
    """What conf/eval.yaml and the loop's `eval` node share."""

    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    ci: CISettings = field(default_factory=CISettings)
    pool_resources: str = "auto"

    @classmethod
    def from_cfg(cls, node, where: str = "eval") -> "EvalSettings":
        from selfalign_ray.config import ConfigError, to_dict, typed

        d = to_dict(node)
        unknown = sorted(set(d) - {"prompts", "sampling", "judge", "ci", "pool_resources"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}")
        return cls(prompts=typed(PromptsConfig, d.get("prompts", {}), f"{where}.prompts"),
                   sampling=typed(SamplingSettings, d.get("sampling", {}), f"{where}.sampling"),
                   judge=typed(JudgeSettings, d.get("judge", {}), f"{where}.judge"),
                   ci=typed(CISettings, d.get("ci", {}), f"{where}.ci"),
                   pool_resources=d.get("pool_resources", "auto"))


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def evaluate(*, model_a: str, name_a: str, model_b: str | None, name_b: str | None, judge: str | None,
             settings: EvalSettings, engine: EngineConfig, out_dir: Path, seed: int = 0, iteration: int = 0) -> dict:
    """Answers of A (and B); with B, the position-swapped win rate of A over B judged by `judge`."""
    started = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(settings.prompts)
    if not prompts:
        raise ValueError("no evaluation prompts")
    from selfalign_ray.synpo.chain import build_chain, run_rows

    spec = settings.sampling.spec()
    steps = [("a", model_a, [AnswerStage(spec, seed, "a", "answer_a")])]
    if model_b:
        judge = judge or model_b
        steps += [("b", model_b, [AnswerStage(spec, seed, "b", "answer_b")]),
                  ("judge", judge, [PairwiseJudgeStage(settings.judge.kind, seed, settings.judge.max_tokens)])]
    rows = pd.DataFrame({"source_id": [p["id"] for p in prompts], "prompt_text": [p["instruction"] for p in prompts],
                         "iteration": iteration, "mode": "eval"})
    log.info("evaluation: %d prompts, A=%s%s", len(prompts), model_a,
             f", B={model_b}, judge={judge} ({settings.judge.kind}, both orders)" if model_b else "")
    out = run_rows(rows, build_chain(steps, engine, settings.pool_resources), "evaluation")
    result = {"model_a": model_a, "name_a": name_a, "prompts": len(prompts), "dataset": prompts[0]["dataset"],
              "mean_tokens_a": _mean(out["a_tokens"]), "files": {}}
    atomic_write_json(out_dir / "model_outputs.json", alpaca_outputs(prompts, list(out["a_text"]), name_a))
    result["files"]["model_outputs"] = str(out_dir / "model_outputs.json")
    if model_b:
        atomic_write_json(out_dir / "reference_outputs.json", alpaca_outputs(prompts, list(out["b_text"]), name_b))
        outcomes = [None if math.isnan(o) else float(o) for o in out["outcome"]]
        wr = win_rate(outcomes, settings.ci.method, settings.ci.level, settings.ci.bootstrap_samples, seed)
        agree = out.loc[out["orders_agree"] != "", "orders_agree"]
        result.update(model_b=model_b, name_b=name_b, judge=judge, judge_kind=settings.judge.kind, **wr.to_json(),
                      mean_p_a=_mean(out["p_a"]), mean_tokens_b=_mean(out["b_tokens"]),
                      orders_agree=float((agree == "yes").mean()) if len(agree) else None,
                      missing_answers=int((out["judge_note"] == "missing_answer").sum()))
        result["files"]["reference_outputs"] = str(out_dir / "reference_outputs.json")
        cols = ["source_id", "prompt_text", "a_text", "b_text", "a_error", "b_error", "p_a", "orders_agree",
                "outcome", "judge_note", "verdict_raw"]
        lines = [json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()},
                            ensure_ascii=False) for r in out[cols].to_dict("records")]
        (out_dir / "judgements.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        result["files"]["judgements"] = str(out_dir / "judgements.jsonl")
    result["wall_s"] = round(time.time() - started, 1)
    result["settings"] = asdict(settings)
    atomic_write_json(out_dir / "results.json", result)
    return result


def evaluate_vs_base(cfg, iteration: int, model: str, base: str, iter_dir: Path, model_id: dict | None = None,
                     base_id: dict | None = None) -> dict | None:
    """The loop's optional step (`eval.enabled`): iteration k's model against the base model.

    The base model judges (`eval.judge.model` to change it): a fixed judge reads every iteration on the same scale.
    Resumable: the result is kept in iter_dir/eval_vs_base.json with the settings it ran with (eval, engine, the
    models' identities `model_id` / `base_id`, see selfalign_ray/steps.py); a re-run under other settings is
    refused. Returns None when disabled or when there is no new model (train.enabled=false).
    """
    node = cfg.get("eval")
    if node is None or not node.get("enabled", False):
        return None
    if model == base:
        log.info("iteration %d: evaluation against the base model skipped (no trained model)", iteration)
        return None
    from selfalign_ray.config import to_dict
    from selfalign_ray.eval.data import resolve_model
    from selfalign_ray.steps import eval_settings, model_identity, run_step

    settings = EvalSettings.from_cfg({k: v for k, v in node.items() if k != "enabled"})
    judge = resolve_model(settings.judge.model)[0] if settings.judge.model else base
    engine = engine_config(cfg)
    base_id = base_id or model_identity(base)
    models = {"a": model_id or model_identity(model), "b": base_id,
              "judge": base_id if judge == base else model_identity(judge)}
    step = eval_settings(to_dict(node), engine, models, cfg.seed)
    eval_dir = storage.join(iter_dir, "eval")

    def work():
        # On object storage the answers are written to a local staging dir, then uploaded (data/storage.py).
        local_dir = storage.staging_dir(eval_dir) if storage.is_uri(eval_dir) else Path(eval_dir)
        result = evaluate(model_a=model, name_a=f"iter_{iteration}", model_b=base, name_b="base", judge=judge,
                          settings=settings, engine=engine, out_dir=local_dir, seed=cfg.seed, iteration=iteration)
        if storage.is_uri(eval_dir):
            storage.upload_dir(local_dir, eval_dir)
            result["files"] = {k: storage.join(eval_dir, storage.name(v)) for k, v in result["files"].items()}
        log.info("iteration %d vs base: %s", iteration, describe(result))
        return result

    return run_step(storage.join(iter_dir, "eval_vs_base.json"),
                    f"iteration {iteration}: evaluation against the base model", step, work)


def describe(r: dict) -> str:
    if r.get("win_rate") is None:
        return f"no judged prompts ({r.get('unjudged')} unjudged)"
    return (f"win rate {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({r['level']:.0%} {r['ci_method']}; "
            f"{r['wins']} W / {r['ties']} T / {r['losses']} L of {r['judged']} judged)")


def add_to_manifest(iter_dir: Path, key: str, value) -> None:
    """Record `value` under `key` in iter_dir/manifest.json (read, update, atomic write)."""
    path = storage.join(iter_dir, "manifest.json")
    manifest = storage.read_json(path)
    manifest[key] = value
    storage.write_json(path, manifest)
