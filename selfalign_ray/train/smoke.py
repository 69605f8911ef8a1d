"""K SimPO steps of the training core under torchrun, on generated pairs (no Ray, no data files, no hub).

    torchrun --standalone --nproc_per_node=2 -m selfalign_ray.train.smoke --model tiny_random --steps 3
    torchrun --standalone --nproc_per_node=1 -m selfalign_ray.train.smoke --llama-shape 1b --bf16 --steps 20

The process group is gloo on CPU and NCCL on GPU (one GPU per process, LOCAL_RANK's); the step is exactly
what a Ray Train worker runs (train/core.py: DeepSpeed ZeRO-3, packing, SimPO normalised over the step's
pairs, the NaN guard). Pairs are random token ids (prompt 1/4-1/2 of --seq-len, responses up to the rest),
different on every rank and step, seeded. Rank 0 prints one line per step (loss, tokens, tokens/s, gradient
norm) and a last `SMOKE SUMMARY` line: steady tokens/s over all ranks (the first step, which warms up
kernels and allocators, is left out when there are more), peak memory (the largest process RSS on CPU,
torch.cuda.max_memory_allocated on GPU, the maximum over ranks), and MFU = 6 x parameters x tokens/s /
(peak FLOP/s x ranks) when the peak is given (--peak-tflops) or known for the GPU's name. 6N per token is the
usual dense-transformer estimate; it leaves out attention's s^2 term, so MFU is a slight underestimate.

--model: a conf/model preset name (tiny_random builds locally) or an HF model directory.
--llama-shape 1b|8b-2l|tiny: random weights of that Llama shape built under zero.Init (tokenizer of tiny_random,
used only for the HF export with --out).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

CONF = Path(__file__).resolve().parents[2] / "conf"

LLAMA_SHAPES = {
    # Llama-3.2-1B: 16 layers, d 2048, 32 heads / 8 KV heads, FFN 8192, vocab 128256.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Two layers of Llama-3-8B: per-layer throughput of the 8B shape.
    "8b-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # The tiny_random shape: the CPU check of this code path (tests/test_train_core.py).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
}
# Dense bf16 tensor-core peak per GPU (datasheets, no sparsity), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100": first match wins
        if key in device_name:
            return value
    return None


def resolve_model(name_or_dir: str) -> str:
    """A conf/model preset name or a model directory -> a local model directory."""
    from omegaconf import OmegaConf

    from selfalign_ray.models.resolve import resolve_model_path

    if Path(name_or_dir).expanduser().is_dir():
        return resolve_model_path("hf", name_or_dir)
    preset = CONF / "model" / f"{name_or_dir}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise SystemExit(f"--model {name_or_dir}: neither a directory nor a preset in conf/model ({', '.join(known)})")
    node = OmegaConf.load(preset)
    return resolve_model_path(node.source, node.get("path"), node.get("dtype", "float32"))


def random_pairs(n: int, vocab: int, seq_len: int, rng: random.Random):
    """n (chosen, rejected) Examples of random ids; ids 0-2 (pad / special) are left out."""
    from selfalign_ray.train.data import IGNORE, Example

    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(seq_len // 4, seq_len // 2))]
        room = seq_len - len(prompt)
        responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(max(1, room // 4), room))] for _ in "cr"]
        pairs.append(tuple(Example(prompt + r, [IGNORE] * len(prompt) + r) for r in responses))
    return pairs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_random", help="conf/model preset name or HF model directory")
    ap.add_argument("--llama-shape", choices=sorted(LLAMA_SHAPES), help="random weights of this Llama shape")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps")
    ap.add_argument("--pairs-per-micro", type=int, default=2, help="pairs per micro-batch per rank")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step per rank")
    ap.add_argument("--seq-len", type=int, default=256, help="longest prompt + response, tokens")
    ap.add_argument("--bf16", action="store_true", help="train.bf16=true: bf16 weights (GPU), bf16 autocast with fp32 weights (CPU)")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU (gloo) even where CUDA is available")
    ap.add_argument("--padded", action="store_true", help="right-pad micro-batches instead of packing them")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    ap.add_argument("--attn", default="auto", help="auto | sdpa | eager | flash_attention_2")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--deepspeed", default="zero3", help="conf/deepspeed preset")
    ap.add_argument("--peak-tflops", type=float, help="peak FLOP/s of one device, in TFLOP/s (for MFU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    ap.add_argument("--out", help="also save a DeepSpeed checkpoint and the HF export here")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import warnings

    # DeepSpeed's ZeRO-3 calls torch's *_tensor collectives, deprecated in torch 2.13: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from omegaconf import OmegaConf

    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.core import (
        TrainCore,
        build_engine,
        configure_runtime,
        partition_stats,
        save_checkpoint,
        save_hf,
    )
    from selfalign_ray.train.data import collate
    from selfalign_ray.train.deepspeed_config import deepspeed_config
    from selfalign_ray.train.schedule import StepPlan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_gpu = torch.cuda.is_available() and not args.cpu
    if use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "MASTER_ADDR" not in os.environ:  # plain `python -m`: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cfg = TrainConfig(
        num_workers=world, per_device_batch_size=args.pairs_per_micro,
        global_batch_size=args.pairs_per_micro * world * args.grad_accum, max_length=args.seq_len,
        max_prompt_length=args.seq_len // 2, use_gpu=use_gpu, bf16=args.bf16, learning_rate=args.lr,
        lr_scheduler="constant", warmup_ratio=0.0, padding_free=not args.padded,
        gradient_checkpointing=args.grad_ckpt, attn_implementation=args.attn, torch_threads=args.threads,
        cpus_per_worker=float(args.threads), seed=args.seed)
    cfg.validate()
    plan = StepPlan.build(args.steps * cfg.global_batch_size, cfg)
    ds_cfg = deepspeed_config(OmegaConf.load(CONF / "deepspeed" / f"{args.deepspeed}.yaml"), cfg)

    precision = configure_runtime(cfg)  # creates the process group from torchrun's env (gloo / nccl)
    model_config = None
    if args.llama_shape:
        from transformers import LlamaConfig

        model_path = resolve_model("tiny_random")  # its tokenizer; the weights are random
        model_config = LlamaConfig(**LLAMA_SHAPES[args.llama_shape], max_position_embeddings=max(4096, args.seq_len))
    else:
        model_path = resolve_model(args.model)
    tokenizer, engine, _hf_ds = build_engine(model_path, cfg, ds_cfg, plan, model_config=model_config,
                                             precision=precision)
    core = TrainCore(engine, cfg, "simpo", precision=precision)
    params = partition_stats(engine.module)["total"]
    vocab = engine.module.config.vocab_size
    device_name = torch.cuda.get_device_name() if use_gpu else "cpu"
    if rank == 0:
        print(f"smoke: {world} rank(s), {core.coll.device} ({device_name}), backend "
              f"{torch.distributed.get_backend()}, {params / 1e6:.1f}M parameters, attn {core.attn}, "
              f"{precision.mode}, {args.grad_accum} x {args.pairs_per_micro} pairs per rank per step, "
              f"seq-len {args.seq_len}", flush=True)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()

    rng = random.Random(args.seed * 1000003 + rank)
    timed_tokens = timed_s = 0.0
    losses = []
    for step in range(1, args.steps + 1):
        batches = []
        for _ in range(args.grad_accum):
            pairs = random_pairs(args.pairs_per_micro, vocab, args.seq_len, rng)
            batches.append(collate([c for c, _ in pairs] + [r for _, r in pairs], 0, cfg.padding_free))
        if use_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = core.train_step(batches, step=step)
        if use_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = result.totals["tokens"]
        if step > 1 or args.steps == 1:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + dt
        losses.append(result.metrics["loss"])
        if rank == 0:
            print(f"step {step}/{args.steps} loss {result.metrics['loss']:.6f} tokens {int(tokens)} "
                  f"tokens/s {tokens / dt:.1f} grad_norm {result.grad_norm:.4g} "
                  f"accuracy {result.metrics['preference_accuracy']:.2f} s {dt:.2f}", flush=True)

    if use_gpu:
        peak_bytes, kind = float(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    else:
        peak_bytes, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "rss"
    peak = core.coll.max_(core.coll.tensor([peak_bytes]), "peak memory").item()
    if args.out:
        out = Path(args.out)
        save_checkpoint(engine, out / "checkpoint", "smoke", {"steps": args.steps})
        save_hf(engine, tokenizer, out / "hf", rank)
    tps = timed_tokens / max(timed_s, 1e-9)
    peak_t = args.peak_tflops or (peak_tflops(device_name) if use_gpu else None)
    mfu = 6 * params * tps / (peak_t * 1e12 * world) if peak_t else None
    if rank == 0:
        print(f"SMOKE SUMMARY steps {args.steps} world {world} device {device_name} params {params} "
              f"tokens_per_s {tps:.1f} peak_mem_gib {peak / 2**30:.3f} ({kind}) "
              f"mfu {'n/a' if mfu is None else f'{mfu:.4f}'} peak_tflops {peak_t or 'n/a'} "
              f"loss_first {losses[0]:.6f} loss_last {losses[-1]:.6f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
