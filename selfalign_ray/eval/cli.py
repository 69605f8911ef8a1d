"""`selfalign-ray-eval`: answers in AlpacaEval format, and a position-swapped win rate of model A vs model B.

    selfalign-ray-eval model_a=outputs/run/iter_1/model                      # answers only
    selfalign-ray-eval model_a=outputs/run/iter_1/model model_b=smollm2_135m  # + win rate of A vs B
See conf/eval.yaml for every setting.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from omegaconf import DictConfig

from selfalign_ray.cli import CONF_DIR


def run_eval(cfg: DictConfig) -> dict:
    from selfalign_ray.cluster import init_ray
    from selfalign_ray.engines.config import engine_config
    from selfalign_ray.eval.data import resolve_model
    from selfalign_ray.eval.run import EvalSettings, evaluate

    settings = EvalSettings.from_cfg({k: cfg[k] for k in ("prompts", "sampling", "judge", "ci", "pool_resources")})
    model_a, name_a = resolve_model(str(cfg.model_a))
    model_b, name_b = resolve_model(str(cfg.model_b)) if cfg.model_b else (None, None)
    judge = resolve_model(settings.judge.model)[0] if settings.judge.model else None
    init_ray(cfg.cluster)
    return evaluate(model_a=model_a, name_a=cfg.name_a or name_a, model_b=model_b, name_b=cfg.name_b or name_b,
                    judge=judge, settings=settings, engine=engine_config(cfg),
                    out_dir=cfg.output_dir, seed=cfg.seed)


def tracked_eval(cfg: DictConfig) -> dict:
    """run_eval inside the run of `tracker=` (conf/tracker/; none by default): the composed settings as
    parameters, the win rate with its interval, and the output files as artifacts."""
    from selfalign_ray.tracking import tracking_run

    with tracking_run(cfg) as tracking:
        result = run_eval(cfg)
        tracking.standalone_evaluation(result, cfg.output_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from selfalign_ray.cli import USAGE_ERROR, _one_line, _user_errors
    from selfalign_ray.eval.run import describe

    try:
        result = tracked_eval(cfg)
    except _user_errors() as err:  # as selfalign-ray does: one line, exit 2 (HYDRA_FULL_ERROR=1: the traceback)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"selfalign-ray-eval: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    print(f"\n== selfalign-ray-eval: {result['prompts']} prompts ({result['dataset']}), outputs in {cfg.output_dir}")
    print(json.dumps(result["files"], indent=2))
    if "win_rate" in result:
        print(f"{result['name_a']} vs {result['name_b']} judged by {result['judge']} ({result['judge_kind']}, both "
              f"orders): {describe(result)}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()


if __name__ == "__main__":
    sys.exit(main())
