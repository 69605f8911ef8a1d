"""`selfalign-ray` as a user runs it: a bad setting is one line on stderr and exit status 2; HYDRA_FULL_ERROR=1
shows the traceback. `engine=vllm` on this GPU-less box is refused by the pre-flight within seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def _cli(tmp_path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "selfalign_ray", f"output_dir={tmp_path / 'out'}", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env={**clean, "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.timeout(120)
def test_a_bad_setting_is_one_line_and_exit_status_2(tmp_path):
    proc = _cli(tmp_path, "dataset_size=0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["selfalign-ray: error: dataset_size must be a positive integer, got 0"]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.timeout(120)
def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = _cli(tmp_path, "dataset_size=0", HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigError: dataset_size must be a positive integer" in proc.stderr


@pytest.mark.timeout(120)
def test_a_missing_model_directory_names_it(tmp_path):
    proc = _cli(tmp_path, f"model.path={tmp_path / 'no_model'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"selfalign-ray: error: model.path={tmp_path / 'no_model'} "
                                                   "does not exist")


@pytest.mark.timeout(150)
def test_vllm_on_a_machine_without_gpus_fails_in_seconds(tmp_path):
    """It used to wait forever printing "No available node types can fulfill resource request"."""
    started = time.monotonic()
    proc = _cli(tmp_path, "engine=vllm", "model=tiny_random", "dataset_size=4", "cluster.include_dashboard=false",
                "cluster.num_gpus=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("selfalign-ray: error: generation asks for 1 GPU(s)")
    assert "engine=vllm_cpu" in last and "engine=hf" in last
    assert "Traceback" not in proc.stderr
    # Ray's own start is most of it (~10 s on the 2-core CI box); the refusal itself is immediate.
    assert time.monotonic() - started < 90
