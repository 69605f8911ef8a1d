"""The cluster files install on a current stack (no network: the YAML is parsed and checked offline).

ray_up_gpu.yaml: Ray's Ubuntu 22.04 / CUDA 12 / Python >= 3.10 container instead of Ray's default Ubuntu 18.04 AMI,
80 GB GPUs, flash-attn from a prebuilt wheel only, Ray's child-process reaping on every node. The KubeRay manifest
and cluster/README.md say the same. Secure as written: the token exists before the head starts with token auth,
the dashboard stays on localhost, no Ray Client port on KubeRay, SSH only from the user's address, the hub token
from a Kubernetes secret / a mode-600 env file and never from runtime_env.
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
    for pod in _pods(_kuberay()):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
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


# ------------------------------------------------------------------ secure as written (token, network, secrets)
def _kuberay() -> dict:
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay_raycluster.yaml").read_text()))
    return next(d for d in docs if d and d.get("kind") == "RayCluster")


def _pods(cluster: dict) -> list[dict]:
    return [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]


def _start_commands(up: dict, key: str) -> list[str]:
    return [c for c in up[key] if "ray start" in c]


def test_ray_up_creates_the_token_before_the_head_and_starts_it_with_token_auth(up):
    """The header's first step generates the token, the token file is mounted on every node, and each `ray start`
    exports RAY_AUTH_MODE=token first; the head refuses to start without a token (never unauthenticated)."""
    header = (REPO / "cluster" / "ray_up_gpu.yaml").read_text()
    assert header.index("ray get-auth-token --generate") < header.index("ray up -y")
    assert up["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in _start_commands(up, key):
            start = command.index("ray start")
            assert command.index("test -s ~/.ray/auth_token ||") < start, key
            assert re.search(r"export [^;]*RAY_AUTH_MODE=token", command[:start]), key
            assert "exit 1" in command[:start], key
    head = _start_commands(up, "head_start_ray_commands")
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0]


def test_ray_up_ssh_is_not_open_to_the_world(up):
    """Every node type names the user's security group, so Ray 2.60 creates none (its own group always opens SSH to
    0.0.0.0/0): checked with Ray's own AWS config step, which returns before any AWS call in that case."""
    pytest.importorskip("boto3")
    import copy

    from ray.autoscaler._private.aws import config as aws_config

    for name, node in up["available_node_types"].items():
        assert re.fullmatch(r"sg-[0-9a-f]{8,17}", node["node_config"]["SecurityGroupIds"][0]), name
    config = copy.deepcopy(up)
    assert aws_config._configure_security_group(config) == up  # nothing to create, no rule added
    assert "0.0.0.0/0" not in str(up["provider"].get("security_group", {}))
    text = (REPO / "cluster" / "ray_up_gpu.yaml").read_text()
    assert "--port 22" in text and "--cidr YOUR.PUBLIC.IP.ADDRESS/32" in text


def test_ray_up_gives_the_hub_token_as_a_private_env_file(up):
    assert up["file_mounts"]["~/.selfalign/hf.env"] == "~/.selfalign/hf.env"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in _start_commands(up, key):
            start = command.index("ray start")
            before = command[:start]
            assert "chmod 600" in before and "~/.selfalign/hf.env" in before.split("chmod 600")[1].split(";")[0]
            assert re.search(r"set -a; \. ~/\.selfalign/hf\.env; set \+a;", before), key


def test_kuberay_token_auth_localhost_dashboard_no_client_port_and_the_hub_token_from_a_secret():
    from selfalign_ray.redaction import is_secret_key

    cluster = _kuberay()
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    for pod in _pods(cluster):
        for container in pod["containers"]:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            assert 10001 not in ports, container["name"]
            env = {e["name"]: e for e in container["env"]}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "selfalign-hf-token"
            for name, entry in env.items():  # no secret given as a literal value
                assert not (is_secret_key(name) and "value" in entry), name
    assert "10001" not in re.sub(r"#.*", "", (REPO / "cluster" / "kuberay_raycluster.yaml").read_text())


def test_runtime_env_carries_no_secret():
    from selfalign_ray.redaction import is_secret_key

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text()).get("env_vars", {})
    assert env and not [k for k in env if is_secret_key(k)]


def test_docs_create_the_token_before_the_head_and_name_the_ports_to_firewall():
    """In every shell block of the READMEs, a `ray start --head` comes after the token was generated and
    RAY_AUTH_MODE=token exported, and binds the dashboard to localhost."""
    for path in (REPO / "README.md", REPO / "cluster" / "README.md"):
        text = path.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            if "ray start --head" not in block:
                continue
            start = block.index("ray start --head")
            assert block.index("ray get-auth-token --generate") < start, path
            assert block.index("export RAY_AUTH_MODE=token") < start, path
            assert "--dashboard-host=127.0.0.1" in block[start:].splitlines()[0], path
    network = (REPO / "cluster" / "README.md").read_text().split("## Network")[1].split("\n## ")[0]
    for port in ("22", "6379", "8265", "10001", "8076", "8080", "52365", "10002-19999"):
        assert f"**{port}" in network or f"({port})" in network, port
    secrets = (REPO / "cluster" / "README.md").read_text().split("## Secrets")[1].split("\n## ")[0]
    assert "secretKeyRef" in secrets and "chmod 600" in secrets and "runtime_env" in secrets
