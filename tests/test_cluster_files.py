"""The cluster files install on a current stack (no network: the YAML is parsed and checked offline).

ray_up_gpu.yaml: Ray's Ubuntu 22.04 / CUDA 12 / Python >= 3.10 container instead of Ray's default Ubuntu 18.04 AMI,
80 GB GPUs, flash-attn from a prebuilt wheel only, Ray's child-process reaping on every node. The KubeRay manifest
and cluster/README.md say the same.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
REAPER = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"
# Instance types with 80 GB GPUs (Gemma-2-9B SimPO under ZeRO-3 on 4 ranks needs ~41 GB per rank for states alone).
GPU_80GB = {"p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}
IMAGE = re.compile(r"rayproject/ray:(?P<ray>2\.60\.\d+)-py3(?P<minor>\d+)-cu(?P<cuda>1[2-9])\d*$")


@pytest.fixture(scope="module")
def up() -> dict:
    return yaml.safe_load((REPO / "cluster" / "ray_up_gpu.yaml").read_text())


def test_reaper_variable_is_the_one_ray_reads():
    """The name is checked against the installed Ray 2.60 raylet (a misspelt env var would be ignored silently)."""
    import ray

    raylet = Path(ray.__file__).parent / "_raylet.so"
    assert REAPER.removeprefix("RAY_").encode() in raylet.read_bytes()


def test_ray_up_runs_in_a_current_image(up):
    match = IMAGE.match(up["docker"]["image"])
    assert match, up["docker"]["image"]
    assert int(match["minor"]) >= 10 and int(match["cuda"]) >= 12  # Python >= 3.10, CUDA 12+
    for name, node in up["available_node_types"].items():
        # Ray's default latest_dlami is Ubuntu 18.04 / Python 3.6 / CUDA 11: torch 2.13 cannot install there.
        image = node["node_config"]["ImageId"]
        assert image != "latest_dlami", name
        # Runs as written: the DLAMI Base Ubuntu 22.04 SSM parameter (or a real AMI id), never a placeholder.
        assert image.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/") \
            or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), (name, image)
    assert "Ubuntu 22.04" in (REPO / "cluster" / "ray_up_gpu.yaml").read_text()


def test_gpu_nodes_have_memory_for_the_presets(up):
    gpu_types = {node["node_config"]["InstanceType"] for name, node in up["available_node_types"].items()
                 if name != up["head_node_type"]}
    assert gpu_types and gpu_types <= GPU_80GB, gpu_types


def test_every_ray_start_enables_child_process_reaping(up):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in up[key] if "ray start" in c]
        assert start and all(f"{REAPER}=true" in c for c in start), key
    _, cluster = yaml.safe_load_all((REPO / "cluster" / "kuberay_raycluster.yaml").read_text())
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env.get(REAPER) == "true"
    assert f"{REAPER}=true" in (REPO / "cluster" / "README.md").read_text()


def test_flash_attn_only_from_a_prebuilt_wheel(up):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert not any(dep.lower().replace("_", "-").startswith("flash-attn") for dep in gpu_extra), gpu_extra
    commands = " ".join(up["setup_commands"] + up.get("head_setup_commands", []) + up["worker_setup_commands"])
    # No `pip install flash-attn` (PyPI has only the sdist: a source build) anywhere.
    assert not re.search(r"pip install[^;&|]*\bflash[-_]attn\b(?![^ ]*\.whl)", commands)
    worker = " ".join(up["worker_setup_commands"])
    assert "--no-deps" in worker and "github.com/Dao-AILab/flash-attention/releases/download" in worker


def test_the_wheel_url_follows_the_installed_torch(up, monkeypatch):
    """Run the URL snippet of worker_setup_commands against a stand-in torch 2.13 CUDA build."""
    worker = " ".join(up["worker_setup_commands"])
    code = shlex.split(re.search(r'\$\(python -c ("[^"]+")\)', worker).group(1))[0]
    fake = types.SimpleNamespace(__version__="2.13.0+cu130", version=types.SimpleNamespace(cuda="13.0"),
                                 _C=types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=True))
    monkeypatch.setitem(sys.modules, "torch", fake)
    printed = []
    exec(code, {"print": printed.append})  # noqa: S102 — our own YAML's snippet, with a fake torch
    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert printed == ["https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3.post1/"
                       f"flash_attn-2.8.3.post1+cu13torch2.13cxx11abiTRUE-{py}-{py}-linux_x86_64.whl"]


def test_kuberay_image_recipe_is_current():
    text = (REPO / "cluster" / "kuberay_raycluster.yaml").read_text()
    base = re.search(r"FROM (\S+)", text).group(1)
    match = IMAGE.match(base)
    assert match and int(match["minor"]) >= 10, base
    assert "flash-attention/releases/download" in text and "--no-deps" in text
