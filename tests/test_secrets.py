"""A secret given as an override (`+engine.extra.hf_token=...`) reaches the engine and no file the run writes:
Hydra's `.hydra/` copies, multirun.yaml, run records, manifests, summaries, the report, sweep records and logs."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from selfalign_ray.hydra_secrets import RedactHydraFiles
from selfalign_ray.redaction import REDACTED, RedactingFilter, redact_text, secret_values

SECRET = "hf_SECRET123"


def _files_holding(root: Path, needle: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits


def test_text_redaction_covers_overrides_yaml_json_and_known_values():
    assert secret_values(["+engine.extra.hf_token=hf_abc", "dataset_size=4", "x.api_key='k 1'"]) == {"hf_abc", "k 1"}
    text = ("#0 : +engine.extra.hf_token=hf_abc dataset_size=4\n"
            "override_dirname: +engine.extra.hf_token=hf_abc,dataset_size=4\n"
            "  hf_token: hf_abc\n  max_tokens: 64\n"
            '{"hf_token": "hf_abc", "max_tokens": 64} and a bare hf_abc in a traceback')
    out = redact_text(text, {"hf_abc"})
    assert "hf_abc" not in out and "max_tokens: 64" in out and '"max_tokens": 64' in out
    assert "+engine.extra.hf_token=<redacted>" in out and "dataset_size=4" in out
    # Without the known value, the key-based rules alone still hide every keyed occurrence.
    keyed = redact_text("hf_token: hf_abc\nrun --engine.extra.hf_token=hf_abc\n{'api_key': 'z'}")
    assert "hf_abc" not in keyed and "'z'" not in keyed


def test_logging_filter_rewrites_the_record():
    record = logging.LogRecord("hydra", logging.INFO, __file__, 1, "\t#%d : %s", (0, f"+engine.extra.hf_token={SECRET}"),
                               None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"\t#0 : +engine.extra.hf_token={REDACTED}"


def test_callback_rewrites_hydra_files(tmp_path):
    """on_job_start rewrites the three .hydra files and multirun.yaml as Hydra wrote them; the live config keeps
    its value."""
    from hydra.types import RunMode

    job, sweep = tmp_path / "sweep" / "0", tmp_path / "sweep"
    (job / ".hydra").mkdir(parents=True)
    config = OmegaConf.create({
        "engine": {"extra": {"hf_token": SECRET}}, "dataset_size": 4,
        "hydra": {"mode": RunMode.MULTIRUN, "output_subdir": ".hydra", "runtime": {"output_dir": str(job)},
                  "sweep": {"dir": str(sweep)},
                  "overrides": {"task": [f"+engine.extra.hf_token={SECRET}", "dataset_size=4"], "hydra": []},
                  "job": {"override_dirname": f"+engine.extra.hf_token={SECRET},dataset_size=4"}}})
    OmegaConf.save(OmegaConf.masked_copy(config, ["engine", "dataset_size"]), job / ".hydra" / "config.yaml")
    OmegaConf.save(config.hydra, job / ".hydra" / "hydra.yaml")
    OmegaConf.save(config.hydra.overrides.task, job / ".hydra" / "overrides.yaml")
    OmegaConf.save(config, sweep / "multirun.yaml")
    (job / ".hydra" / "overrides.yaml").chmod(0o640)
    RedactHydraFiles().on_job_start(config=config)
    assert _files_holding(tmp_path, SECRET) == []
    assert OmegaConf.load(job / ".hydra" / "config.yaml").engine.extra.hf_token == REDACTED
    assert list(OmegaConf.load(job / ".hydra" / "overrides.yaml")) == [f"+engine.extra.hf_token={REDACTED}",
                                                                       "dataset_size=4"]
    assert (job / ".hydra" / "overrides.yaml").stat().st_mode & 0o777 == 0o640
    assert config.engine.extra.hf_token == SECRET


def test_hf_engine_gets_the_token(monkeypatch, tiny_model_path):
    """engine.extra.hf_token is handed to the hub calls of the hf engine (vLLM takes `hf_token` itself)."""
    from selfalign_ray.engines import hf
    from selfalign_ray.engines.config import EngineConfig

    seen = []
    real_tok, real_lm = hf.load_tokenizer, hf.load_causal_lm
    monkeypatch.setattr(hf, "load_tokenizer", lambda p, load, **kw: seen.append(kw) or real_tok(p, load))
    monkeypatch.setattr(hf, "load_causal_lm", lambda p, load, **kw: seen.append(kw) or real_lm(
        p, load, **{k: v for k, v in kw.items() if k != "token"}))
    hf.HFEngine(tiny_model_path, EngineConfig(extra={"hf_token": SECRET}))
    assert [kw.get("token") for kw in seen] == [SECRET, SECRET]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_and_sweep_never_write_the_token(tmp_path):
    """A real run (tiny_random, no training) and a 2-job sweep with the token as an override: the runs work, and
    no file under the output dirs or the sweep dir holds the token."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["model=tiny_random", "train.enabled=false", "mode.instruct.max_tokens=8", "mode.respond.max_tokens=8",
              "cluster.num_cpus=2", "cluster.include_dashboard=false", f"+engine.extra.hf_token={SECRET}"]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "selfalign_ray", *common, "dataset_size=2", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert (out / ".hydra" / "config.yaml").exists() and (out / "iter_1" / "manifest.json").exists()
    assert _files_holding(out, SECRET) == []
    assert OmegaConf.load(out / ".hydra" / "config.yaml").engine.extra.hf_token == REDACTED
    manifest = json.loads((out / "iter_1" / "manifest.json").read_text())
    assert manifest["model_load"] == {"trust_remote_code": False, "allow_pickle_weights": False, "revision": None}

    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "selfalign_ray", "-m", *common, "dataset_size=2,3",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert (sweep / "multirun.yaml").exists() and (sweep / "sweep_summary.csv").exists()
    assert (sweep / "1" / "iter_1" / "manifest.json").exists()
    assert _files_holding(sweep, SECRET) == []
    assert f"+engine.extra.hf_token={REDACTED}" in (sweep / "sweep_summary.csv").read_text()


def test_short_values_are_hidden_only_where_a_secret_key_names_them():
    out = redact_text("x.token: 1\nmax_tokens: 1\nseed=1", {"1"})
    assert out == f"x.token: {REDACTED}\nmax_tokens: 1\nseed=1"
