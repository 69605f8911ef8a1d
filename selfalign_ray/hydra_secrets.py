"""Keep secrets out of the files Hydra writes for a run (hydra.callbacks.redact_secrets in conf/config.yaml).

Hydra saves the composed config, its own config and the command-line overrides under `<output dir>/.hydra/`
(config.yaml, hydra.yaml, overrides.yaml; hydra/core/utils.py `run_job`), and a multirun's whole config in
`<sweep dir>/multirun.yaml` (basic_sweeper), before our code runs. A token given on the command line
(`+engine.extra.hf_token=hf_...`) would stay there, readable by anyone who can read the output dir. Hydra calls
`on_job_start` right after writing them and before the task: this callback rewrites each file with the values
of secret keys (selfalign_ray/redaction.py) and every secret value given on the command line hidden, wherever it
appears (hydra.yaml also holds it in `job.override_dirname`). The live config keeps the value: the run still
hands it to the engine. Log lines get the same treatment from `redaction.RedactingFilter` (hydra.job_logging).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from selfalign_ray.redaction import is_secret_key, redact_text, secret_values

log = logging.getLogger(__name__)

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def config_secret_values(node: Any) -> set[str]:
    """String values under secret keys anywhere in a config (a token put in a yaml file, not on the command line)."""
    out: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if is_secret_key(str(key)) and isinstance(value, str) and value and not value.startswith("${"):
                out.add(value)
            else:
                out |= config_secret_values(value)
    elif isinstance(node, list):
        for value in node:
            out |= config_secret_values(value)
    return out


def run_secrets(config: DictConfig) -> set[str]:
    """Every secret value of this job: secret overrides (task and hydra) and secret keys of the config."""
    values = config_secret_values(OmegaConf.to_container(config, resolve=False))
    overrides = OmegaConf.select(config, "hydra.overrides")
    if overrides is not None:
        for group in ("task", "hydra"):
            values |= secret_values(list(overrides.get(group) or []))
    return values


def scrub_file(path: Path, secrets: set[str]) -> bool:
    """Rewrite `path` (atomically, same permissions) with its secrets hidden; True if anything changed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    clean = redact_text(text, secrets)
    if clean == text:
        return False
    tmp = path.with_name(f".{path.name}.redact-{os.getpid()}")
    tmp.write_text(clean, encoding="utf-8")
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return True


class RedactHydraFiles(Callback):
    """hydra.callbacks.redact_secrets: hides secrets in `.hydra/*.yaml` of every job and in `multirun.yaml`."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        secrets = run_secrets(config)
        hc = config.hydra
        files = []
        if hc.output_subdir is not None:
            files += [Path(hc.runtime.output_dir) / str(hc.output_subdir) / name for name in HYDRA_FILES]
        if hc.mode == RunMode.MULTIRUN:
            files.append(Path(str(hc.sweep.dir)) / "multirun.yaml")
        changed = [str(p) for p in files if scrub_file(p, secrets)]
        if changed:
            log.info("secrets hidden in %s", ", ".join(changed))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The sweep's own multirun.yaml again: a sweep whose jobs all failed to start never ran on_job_start.
        scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml", run_secrets(config))
