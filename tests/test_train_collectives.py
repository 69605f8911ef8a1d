"""Device-safe collectives: one module calls torch.distributed collectives, on tensors of the training device.

NCCL cannot reduce a CPU tensor, and gloo reduces anything, so a CPU-built tensor in a collective passes every
CPU test and fails on the first GPU step. These tests make that visible on CPU: the helper refuses tensors of
another device (a meta or CUDA expectation against CPU tensors, checked before any collective runs), the
metric window builds its tensors on its device, and no other module in selfalign_ray calls a collective.
"""

import ast
from pathlib import Path

import pytest
import torch

from selfalign_ray.train.collectives import Collectives, WrongDeviceError, backend_for, same_device

PACKAGE = Path(__file__).resolve().parents[1] / "selfalign_ray"
HELPER = PACKAGE / "train" / "collectives.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "monitored_barrier", "gather", "gather_object", "scatter",
               "scatter_object_list", "send", "recv", "isend", "irecv", "all_reduce_coalesced"}
DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def collective_calls(source: str) -> list[str]:
    """Calls of torch.distributed / deepspeed.comm collectives in `source`, as 'line: call'."""
    tree = ast.parse(source)
    aliases, direct = set(), set()  # names bound to a dist module; collective functions imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module in DIST_MODULES and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    aliases.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            receiver = ast.unparse(f.value)
            if receiver in aliases or receiver in DIST_MODULES:
                found.append(f"{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{node.lineno}: {f.id}")
    return found


def test_the_checker_finds_collectives_however_they_are_imported():
    source = """
import torch
import torch.distributed as dist
from torch import distributed
from torch.distributed import all_gather as ag
import deepspeed.comm as comm
dist.all_reduce(t)
torch.distributed.barrier()
distributed.broadcast(t, 0)
ag(out, t)
comm.reduce_scatter(t, ts)
x.all_reduce(t)          # some other object's method: not a collective
dist.get_rank()          # not a collective
"""
    assert [c.split(": ")[1] for c in collective_calls(source)] == [
        "dist.all_reduce", "torch.distributed.barrier", "distributed.broadcast", "ag", "comm.reduce_scatter"]


def test_only_the_helper_calls_collectives():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HELPER:
            continue
        calls = collective_calls(path.read_text())
        if calls:
            offenders[str(path.relative_to(PACKAGE.parent))] = calls
    assert not offenders, f"collectives outside selfalign_ray/train/collectives.py: {offenders}"
    assert collective_calls(HELPER.read_text()), "the helper itself must be where the reduction happens"


@pytest.mark.parametrize("expected", ["meta", "cuda", "cuda:0"])
def test_a_tensor_of_another_device_is_refused_before_any_collective(expected):
    coll = Collectives(expected)
    with pytest.raises(WrongDeviceError, match=r"step counts lives on cpu, but collectives run on the training "
                                               r"device (meta|cuda)"):
        coll.sum_(torch.ones(3), "step counts")
    with pytest.raises(WrongDeviceError):
        coll.min_(torch.ones(1))
    with pytest.raises(TypeError, match="collectives take tensors"):
        coll.sum_([1.0, 2.0])


def test_device_matching_and_backend():
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))
    assert backend_for("cuda:0") == "nccl" and backend_for("cpu") == "gloo"
    # The helper builds its tensors where it reduces them.
    assert Collectives("meta").tensor([1.0, 2.0]).device.type == "meta"


def test_metric_window_tensors_live_on_the_training_device(tmp_path):
    """The fixed bug: the window's all-rank sum was a CPU float64 tensor (NCCL would refuse it). Its tensors now
    come from its device, so a window of another device than the helper's is refused; in a real (gloo, one
    rank) process group the matching pair reduces."""
    import torch.distributed as dist

    from selfalign_ray.train.objectives import MetricWindow

    with pytest.raises(WrongDeviceError, match="metric window lives on meta"):
        MetricWindow("meta").all_ranks(Collectives("cpu"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        coll = Collectives("cpu")
        assert coll.world_size == 1
        window = MetricWindow("cpu")
        window.counts["examples"] = 3
        assert window.all_ranks(coll)["examples"] == 3.0
        with pytest.raises(WrongDeviceError):
            Collectives("cuda:0").sum_(torch.zeros(2))
        coll.barrier()
    finally:
        dist.destroy_process_group()
