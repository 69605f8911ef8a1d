"""Hydra multirun (selfalign_ray/report/sweep.py): one summary row per job, failed jobs recorded while the others
run, sweep_summary.{csv,md,png} in the sweep dir, nonzero exit status when a job failed."""

import csv
import json
import os
import subprocess
import sys

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from report_fixtures import make_run
from selfalign_ray.report.sweep import COLUMNS, ROW_FILE, SweepSummary, job_row, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rows_and_summary_files(tmp_path):
    make_run(tmp_path / "a")  # 2 iterations, 3 pairs each, evaluated against the base model
    ok = job_row({"job": 0, "status": "ok", "mode": "sao", "dataset_size": 7, "iterations": 2, "wall_s": 12.5,
                  "overrides": "dataset_size=7 iterations=2", "output_dir": str(tmp_path / "a")})
    assert ok["pairs_kept"] == 6 and ok["train_margin"] == pytest.approx(0.0246)
    assert ok["train_accuracy"] == pytest.approx(0.8667) and ok["eval_score"] == 0.75
    assert ok["eval_kind"] == "win rate vs base" and ok["status"] == "ok"
    failed = job_row({"job": 1, "status": "failed", "mode": "sao", "dataset_size": 9, "iterations": 1,
                      "error": "ConfigError: dataset_size must be a positive integer, got -1",
                      "output_dir": str(tmp_path / "missing")})
    assert failed["pairs_kept"] is None and failed["eval_score"] is None
    paths = write_summary(tmp_path, [ok, failed])
    rows = list(csv.DictReader(paths["csv"].open()))
    assert list(rows[0]) == COLUMNS and [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["error"].startswith("ConfigError")
    md = paths["md"].read_text()
    assert "2 jobs, 1 ok, 1 failed" in md and "| 0 | ok | sao | 7 | 2 | 6 | 0.0246 | 0.8667 | 0.7500 |" in md
    assert "- job 1: ConfigError: dataset_size must be a positive integer" in md
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)


def test_callback_records_a_job_that_raised(tmp_path):
    """A job whose exception escaped the task function (another launcher, or no run_job) is still a row."""
    job_dir = tmp_path / "sweep" / "3"
    job_dir.mkdir(parents=True)
    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(job_dir)},
                                         "job": {"num": 3}, "sweep": {"dir": str(tmp_path / "sweep")}}})
    ret = JobReturn(overrides=["iterations=0"], cfg=OmegaConf.create(
        {"mode": {"name": "sao"}, "dataset_size": 4, "iterations": 0, "output_dir": str(job_dir)}),
        status=JobStatus.FAILED)
    ret.return_value = ValueError("iterations must be positive")
    cb = SweepSummary()
    cb.on_job_end(config, ret)
    row = json.loads((job_dir / ROW_FILE).read_text())
    assert row["status"] == "failed" and row["error"] == "ValueError: iterations must be positive"
    cb.on_multirun_end(config)
    assert "1 failed" in (tmp_path / "sweep" / "sweep_summary.md").read_text()
    from selfalign_ray.report import sweep

    assert sweep.FAILED_JOBS == [3]
    sweep.FAILED_JOBS.clear()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_by_two_sweep_with_one_failing_job(tmp_path):
    """dataset_size=4,6 x iterations=1,2 on tiny_random (no training). Job n6-k2's output dir is blocked by a
    file, so that job alone fails; the other three run, and the sweep exits 1 with the failure in the summary."""
    (tmp_path / "n6-k2").write_text("not a directory")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "selfalign_ray", "-m", "model=tiny_random", "dataset_size=4,6", "iterations=1,2",
           "train.enabled=false", "mode.instruct.max_tokens=24", "mode.respond.max_tokens=24", "cluster.num_cpus=2",
           "cluster.include_dashboard=false", f"output_dir={tmp_path}/n${{dataset_size}}-k${{iterations}}",
           f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    got = {(r["dataset_size"], r["iterations"]): r for r in rows}
    assert set(got) == {("4", "1"), ("4", "2"), ("6", "1"), ("6", "2")}
    assert got[("6", "2")]["status"] == "failed" and "n6-k2" in got[("6", "2")]["error"]
    for key in (("4", "1"), ("4", "2"), ("6", "1")):
        r = got[key]
        assert r["status"] == "ok" and int(r["pairs_kept"]) > 0, r
        assert (tmp_path / f"n{key[0]}-k{key[1]}" / "report.md").exists()  # each run writes its report
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "4 jobs, 3 ok, 1 failed" in md and "## Failed jobs" in md
    assert (sweep_dir / "sweep_summary.png").read_bytes().startswith(PNG_MAGIC)
    failed_job = got[("6", "2")]["job"]
    assert "Traceback" in (sweep_dir / failed_job / "error.txt").read_text()
    assert "job(s) of the sweep failed" in proc.stderr
