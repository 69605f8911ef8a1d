"""Run by tests/test_train_core.py under torchrun (1 or 2 gloo processes): one DeepSpeed ZeRO-3 engine on the
tiny random model, driven through selfalign_ray.train.core.TrainCore.

For each layout of the same 8 pairs into micro-batches and ranks, one optimizer step
with learning rate 0 (the weights stay put, so every layout sees the same model), for SimPO (with an SFT term)
and SFT; rank 0 saves the step's loss and the full gradient (gathered from the ZeRO-3 partitions right
before the update) to OUT/<objective>-<layout>.pt.
--nonfinite (1 process, after the above): a clean step at a real learning rate (weights move), then a step whose
backward returns NaN gradients under a finite loss, then a step whose third micro-batch has a NaN loss; each
bad step must raise NonFiniteError and leave every weight as it was. Results in OUT/nonfinite.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

# Pairs per micro-batch on each rank; both 1-rank and 2-rank layouts cover pairs 0..7 in order.
LAYOUTS = {
    1: {"even": [[2, 2, 2, 2]], "uneven": [[3, 1, 1, 3]], "uneven_padded": [[3, 1, 1, 3]]},
    2: {"even": [[2, 2], [2, 2]], "uneven": [[3, 1], [1, 3]], "uneven_padded": [[3, 1], [1, 3]]},
}


def setup(lr: float):
    from omegaconf import OmegaConf

    from selfalign_ray.models.tiny import tiny_random_path
    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.core import build_engine, configure_runtime
    from selfalign_ray.train.deepspeed_config import deepspeed_config
    from selfalign_ray.train.schedule import StepPlan
    from selfalign_ray.train.smoke import CONF

    world = int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig(num_workers=world, per_device_batch_size=1, global_batch_size=8, learning_rate=lr,
                      lr_scheduler="constant", warmup_ratio=0.0, sft_weight=0.5, beta=2.0, max_length=96,
                      max_prompt_length=48, torch_threads=1, max_grad_norm=1.0)
    ds = deepspeed_config(OmegaConf.load(CONF / "deepspeed" / "zero3.yaml"), cfg)
    configure_runtime(cfg)
    tokenizer, engine, hf_ds = build_engine(str(tiny_random_path()), cfg, ds, StepPlan.build(64, cfg))
    return cfg, engine, hf_ds


def pairs():
    from selfalign_ray.train.smoke import random_pairs

    return random_pairs(8, 512, 96, random.Random(1234))


def batches_for(layout: list[list[int]], rank: int, objective: str, packed: bool):
    from selfalign_ray.train.data import collate

    all_pairs, start = pairs(), sum(sum(sizes) for sizes in layout[:rank])
    out = []
    for size in layout[rank]:
        chunk = all_pairs[start:start + size]
        start += size
        examples = [c for c, _ in chunk] + [r for _, r in chunk] if objective == "simpo" else [c for c, _ in chunk]
        out.append(collate(examples, 0, packed))
    return out


def full_grads(engine, rank: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p)  # a collective under ZeRO-3: every rank, same order
        if rank == 0:
            grads[name] = g.detach().to("cpu", torch.float64, copy=True)
    return grads


def full_params(engine, rank: int) -> dict:
    import deepspeed

    params = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                params[name] = p.detach().to("cpu", torch.float64, copy=True)
    return params


def set_lr(engine, lr: float) -> None:
    # LambdaLR sets every group's lr to base_lr x factor at each step; this is the test's knob.
    engine.lr_scheduler.base_lrs = [lr for _ in engine.lr_scheduler.base_lrs]
    for group in engine.lr_scheduler.optimizer.param_groups:
        group["lr"] = lr


def part_normalisation(out: Path):
    from selfalign_ray.train.core import TrainCore

    cfg, engine, _hf = setup(lr=0.0)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    step = 0
    for objective in ("simpo", "sft"):
        core = TrainCore(engine, cfg, objective)
        for name, layout in LAYOUTS[world].items():
            step += 1
            grads = {}
            result = core.train_step(batches_for(layout, rank, objective, packed=name != "uneven_padded"), step=step,
                                     before_update=lambda e: grads.update(full_grads(e, rank)))
            if rank == 0:
                torch.save({"loss": result.metrics["loss"], "grad_norm": result.grad_norm, "grads": grads,
                            "examples": result.metrics["examples"]}, out / f"{objective}-{name}.pt")
    return cfg, engine, _hf


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def part_nonfinite(out: Path, cfg, engine) -> None:
    from selfalign_ray.train.core import NonFiniteError, TrainCore

    set_lr(engine, 0.05)
    rank = int(os.environ["RANK"])
    core = TrainCore(engine, cfg, "simpo")
    layout = LAYOUTS[1]["uneven"]
    report = {}

    before = full_params(engine, rank)
    core.train_step(batches_for(layout, rank, "simpo", True), step=1)
    after = full_params(engine, rank)
    report["clean_step_moved_weights"] = any(not torch.equal(before[k], after[k]) for k in before)

    def attempt(step: int, hook_module, hook) -> str:
        handle = hook_module.register_forward_hook(hook)
        try:
            core.train_step(batches_for(layout, rank, "simpo", True), step=step)
            return ""
        except NonFiniteError as err:
            return str(err)
        finally:
            handle.remove()

    layer = engine.module.model.layers[0].mlp
    report["nan_grad_error"] = attempt(2, layer, lambda m, i, o: _NaNBackward.apply(o))
    moved = full_params(engine, rank)
    report["nan_grad_weights_unchanged"] = all(torch.equal(after[k], moved[k]) for k in after)

    calls = {"n": 0}

    def poison_third(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    report["nan_loss_error"] = attempt(3, engine.module.model.embed_tokens, poison_third)
    last = full_params(engine, rank)
    report["nan_loss_weights_unchanged"] = all(torch.equal(after[k], last[k]) for k in after)
    if rank == 0:
        (out / "nonfinite.json").write_text(json.dumps(report, indent=2))


def part_from_config(out: Path, cfg) -> None:
    """smoke --llama-shape: random weights built from a config under zero.Init, initialised, and one step."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    from selfalign_ray.models.tiny import tiny_random_path
    from selfalign_ray.train.core import TrainCore, build_engine, partition_stats
    from selfalign_ray.train.deepspeed_config import deepspeed_config
    from selfalign_ray.train.schedule import StepPlan
    from selfalign_ray.train.smoke import CONF, LLAMA_SHAPES

    rank = int(os.environ["RANK"])
    ds = deepspeed_config(OmegaConf.load(CONF / "deepspeed" / "zero3.yaml"), cfg)
    _, engine, _hf = build_engine(str(tiny_random_path()), cfg, ds, StepPlan.build(64, cfg),
                                  model_config=LlamaConfig(**LLAMA_SHAPES["tiny"]))
    params = full_params(engine, rank)
    result = TrainCore(engine, cfg, "simpo").train_step(batches_for(LAYOUTS[1]["even"], rank, "simpo", True), step=1)
    if rank == 0:
        (out / "from_config.json").write_text(json.dumps({
            "params": partition_stats(engine.module)["total"],
            "all_finite": all(bool(torch.isfinite(p).all()) for p in params.values()),
            "weights_std": {k: float(v.std()) for k, v in params.items() if v.dim() == 2},
            "loss": result.metrics["loss"], "grad_norm": result.grad_norm}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nonfinite", action="store_true", help="then the non-finite steps (1 process)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, engine, _hf = part_normalisation(out)
    if args.nonfinite:
        part_nonfinite(out, cfg, engine)
        part_from_config(out, cfg)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
