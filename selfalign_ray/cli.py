"""`selfalign-ray`: the Hydra entry point. Everything it does is chosen by config (see conf/).

    selfalign-ray                                   # SAO on the embedded SmolLM2-135M, CPU, defaults
    selfalign-ray mode=sao model=tiny_random dataset_size=16 train.enabled=false output_dir=/tmp/x
    selfalign-ray -m dataset_size=16,32 iterations=1,2

Errors in what the user gave (a setting, an input file, a model path, a resource request the cluster can never
grant, an output dir holding another run) print one line naming it and exit with status 2; set
HYDRA_FULL_ERROR=1 to get the traceback instead (Hydra's own switch, which also shows Hydra's full traces).
Anything else is a bug or an infrastructure failure and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# The package ships conf/ (a link to the repository's top-level conf/ in a source checkout).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _hydra_run_dir(output_dir: str) -> str:
    """hydra.run.dir (conf/config.yaml): the output dir itself, or for a URI (s3://...) a local directory that
    stands for it (data/storage.py staging_dir): Hydra writes its logs and .hydra/ with local file calls."""
    from selfalign_ray.data import storage

    return str(storage.staging_dir(output_dir, "hydra")) if storage.is_uri(output_dir) else output_dir


OmegaConf.register_new_resolver("hydra_run_dir", _hydra_run_dir, replace=True)

log = logging.getLogger("selfalign_ray")


def _print_summary(report: dict) -> None:
    print(f"\n== selfalign-ray {report['mode']} done in {report['wall_s']} s; output: {report['output_dir']}")
    for it in report["iterations"]:
        gen = it.get("generation") or {}
        print(f"iteration {it['iteration']}: {it['pairs_kept']} pairs kept of {it['inputs']} inputs; "
              f"drops {json.dumps(it['drops'])}")
        if gen:
            print(f"  generation: {gen.get('wall_s')} s, {gen.get('pairs_per_min')} pairs/min, "
                  f"{gen.get('output_tokens_per_s')} output tokens/s")
        print(f"  shards:   {it['shards']}\n  manifest: {it['manifest']}")
        if "train" in it:
            t = it["train"]
            print(f"  model:    {it['model']}")
            line = f"  training: {t['steps']} optimizer steps on {t['rows']} pairs in {t['wall_s']} s"
            if t.get("mean_tokens_per_s"):
                line += f", {t['mean_tokens_per_s']:.0f} tokens/s"
            print(line)
            before, after = t.get("before") or {}, t.get("after") or {}
            if "preference_accuracy" in before and "preference_accuracy" in after:
                print(f"  preference accuracy {before['preference_accuracy']:.3f} -> {after['preference_accuracy']:.3f}, "
                      f"mean margin {before['mean_margin']:.4f} -> {after['mean_margin']:.4f} (training pairs)")


# Exit status for errors in the user's settings or inputs (argparse's convention).
USAGE_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from selfalign_ray.config import ConfigError
    from selfalign_ray.data.inputs import InputFileError
    from selfalign_ray.data.shards import ResumeMismatchError
    from selfalign_ray.models.resolve import ModelNotFoundError

    # ConfigError covers the pre-flight refusals (preflight.PreflightError).
    return ConfigError, InputFileError, ModelNotFoundError, ResumeMismatchError


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _run(cfg: DictConfig) -> dict:
    from selfalign_ray.loop import run

    report = run(cfg)
    _print_summary(report)
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig):
    from selfalign_ray.report.sweep import in_multirun, run_job

    if in_multirun():
        # Own output dir per job; a failure is recorded and the sweep goes on (selfalign_ray/report/sweep.py).
        return run_job(cfg, _run)
    try:
        _run(cfg)
    except _user_errors() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # SystemExit passes through Hydra's error handler (it catches Exception only).
        print(f"selfalign-ray: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def main() -> None:
    # Hydra resolves relative output dirs against the launch directory (hydra.job.chdir=false).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()
    from selfalign_ray.report.sweep import FAILED_JOBS

    if FAILED_JOBS:  # a multirun with failed jobs (listed in its sweep_summary.md) exits nonzero
        print(f"selfalign-ray: {len(FAILED_JOBS)} job(s) of the sweep failed: {FAILED_JOBS}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config `selfalign-ray <overrides>` would run with (for tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []))
