"""Evaluation prompts in, AlpacaEval `model_outputs` out, and model names -> loadable paths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfalign_ray.data.schema import prompt_id

# Written for this project, disjoint from the personas, SynPO seeds and keyword corpus (tests/test_eval.py).
BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "builtin" / "eval_prompts.jsonl"
BUILTIN_DATASET = "selfalign_ray_builtin"
MODEL_PRESETS = Path(__file__).resolve().parent.parent / "conf" / "model"


@dataclass
class PromptsConfig:
    """Mirrors the `prompts` node of conf/eval.yaml and of `eval` in conf/config.yaml."""

    path: str | None = None          # .jsonl (one object a line) or .json (a list, e.g. AlpacaEval's set); null = builtin
    field: str = "instruction"
    dataset: str | None = None       # "dataset" of every output; null: the record's own, else the file name
    num_prompts: int | None = None   # the first N prompts (null = all)


def load_prompts(cfg: PromptsConfig) -> list[dict]:
    """[{"id", "instruction", "dataset"}] in file order, the first `num_prompts` of them."""
    path = Path(cfg.path).expanduser() if cfg.path else BUILTIN_PROMPTS
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    records = json.loads(text) if stripped.startswith("[") else \
        [json.loads(line) for line in text.splitlines() if line.strip()]
    default_dataset = cfg.dataset or (BUILTIN_DATASET if not cfg.path else path.stem)
    out, seen = [], set()
    for i, r in enumerate(records, 1):
        value = r.get(cfg.field) if isinstance(r, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: record {i} has no text field {cfg.field!r}")
        if value in seen:  # the same prompt twice would count twice in the win rate
            continue
        seen.add(value)
        out.append({"id": str(r.get("id") or prompt_id(value)[:16]), "instruction": value,
                    "dataset": cfg.dataset or r.get("dataset") or default_dataset})
    if cfg.num_prompts is not None:
        if cfg.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 or null, got {cfg.num_prompts}")
        out = out[:cfg.num_prompts]
    return out


def alpaca_outputs(prompts: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """AlpacaEval's model_outputs format: a JSON list of {instruction, output, generator, dataset}."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p["instruction"], "output": o, "generator": generator, "dataset": p["dataset"]}
            for p, o in zip(prompts, outputs)]


def resolve_model(spec: str) -> tuple[str, str]:
    """(loadable path, display name) for a preset name of conf/model/ (e.g. tiny_random) or a local dir / hub id."""
    from omegaconf import OmegaConf

    from selfalign_ray.models.resolve import resolve_model_path

    preset = MODEL_PRESETS / f"{spec}.yaml"
    if "/" not in spec and preset.exists():
        node = OmegaConf.load(preset)
        return resolve_model_path(node.source, node.get("path"), node.get("dtype", "float32")), str(node.name)
    path = resolve_model_path("hf", spec)
    p = Path(path)
    # A trained iteration's model is DIR/iter_k/model: name it after the run and iteration.
    name = f"{p.parent.parent.name}-{p.parent.name}" if p.name == "model" and p.parent.name.startswith("iter_") else p.name
    return path, name
