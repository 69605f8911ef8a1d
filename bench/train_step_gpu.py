"""GPU training-step benchmark: our SimPO micro-batch step on a 1B-class Llama shape, bf16, random weights.

    python bench/train_step_gpu.py                      # Llama-3.2-1B shape, 4 pairs per step, sdpa
    python bench/train_step_gpu.py --shape llama3-8b-2l # 2 layers of Llama-3-8B (fits anywhere; per-layer speed)

Runs in one process on one GPU (no Ray, no DeepSpeed: nothing to download on the GPU machine; ZeRO-3 on one
rank partitions nothing, so the step is the same compute). The step is selfalign_ray.train.objectives
.run_micro_batch (the function every Ray Train worker calls) + backward + torch AdamW (fused), measured
three ways on the same pairs, same order:

  packed  : padding-free, the pairs' 2B sequences in one row with restarting position_ids (our default)
  padded  : the same sequences right-padded into a (2B, L) batch (what TRL's concatenated_forward does)
  flash   : packed with flash_attention_2 varlen kernels (only when flash-attn is installed)

Sequence lengths are drawn from a fixed-seed spread (prompts 64-512 tokens, responses 32-768) so that
padding waste is realistic. Tokens/s counts real tokens only (no pads) for every variant.

MFU uses the useful FLOPs of the real tokens (the convention of PaLM's appendix B / nanoGPT):
    FLOPs/step = 6 * N * T  +  6 * n_layers * d_model * sum_i s_i^2
N = parameters that do matmuls per token (all but the input embedding; the LM head counts), T = real
tokens in the step, s_i = length of sequence i; the second term is causal attention (QK^T and AV,
2 * s^2 * d forward per layer for a causal mask, x3 for forward + backward). Peak: the dense bf16 tensor
rate of the GPU model (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756, A100: 312).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHAPES = {
    # Llama-3.2-1B: 16 layers, d 2048, 32 heads / 8 KV heads, FFN 8192, vocab 128256.
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Two layers of Llama-3-8B: per-layer throughput of the 8B shape on one GPU.
    "llama3-8b-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def make_pairs(n_pairs: int, vocab: int, seed: int):
    from selfalign_ray.train.data import IGNORE, Example

    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(64, 512))]
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(32, 768))]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(32, 768))]
        pairs.append(tuple(Example(prompt + r, [IGNORE] * len(prompt) + r) for r in (chosen, rejected)))
    return pairs


def run_variant(name, model, optimizer, batches, cfg, warmup: int):
    from selfalign_ray.train.objectives import run_micro_batch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for i, (batch, n_tok) in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run_micro_batch(model, batch, cfg, "simpo")
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(n_tok)
    return {"variant": name, "steps": len(times), "tokens": sum(tokens), "seconds": sum(times),
            "tokens_per_s": sum(tokens) / sum(times), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-1b", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (2x sequences)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for train_step_gpu.json")
    args = ap.parse_args()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.data import collate, num_tokens

    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    device_name = torch.cuda.get_device_name()
    shape = SHAPES[args.shape]
    cfg = TrainConfig(beta=10.0, gamma_beta_ratio=0.3)
    pairs_by_step = [make_pairs(args.pairs, shape["vocab_size"], args.seed + s) for s in range(args.steps)]

    variants = [("packed", "sdpa", True), ("padded", "sdpa", False)]
    try:
        import flash_attn  # noqa: F401

        variants.append(("flash", "flash_attention_2", True))
    except ImportError:
        pass

    results = []
    for name, attn, packed in variants:
        torch.manual_seed(args.seed)
        config = LlamaConfig(**shape, max_position_embeddings=4096, torch_dtype="bfloat16")
        config._attn_implementation = attn
        model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        batches = []
        for pairs in pairs_by_step:
            examples = [c for c, _ in pairs] + [r for _, r in pairs]
            batch = collate(examples, pad_id=0, padding_free=packed)
            batches.append(({k: v.to("cuda") for k, v in batch.items()}, num_tokens(batch)))
        r = run_variant(name, model, optimizer, batches, cfg, args.warmup)
        r["attn"] = attn
        r["padded_width_tokens"] = sum(b["input_ids"].numel() for b, _ in batches[args.warmup:])
        results.append(r)
        del model, optimizer, batches
        torch.cuda.empty_cache()

    n_params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**shape)).parameters())
    embed = shape["vocab_size"] * shape["hidden_size"]
    matmul_params = n_params - (0 if shape.get("tie_word_embeddings") else embed)  # tied: head = embedding
    seq_lens = [len(e.input_ids) for pairs in pairs_by_step[args.warmup:] for pr in pairs for e in pr]
    real_tokens = sum(seq_lens)
    flops = 6 * matmul_params * real_tokens + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * sum(
        s * s for s in seq_lens)
    peak = peak_flops(device_name)
    for r in results:
        r["tflops_per_s"] = flops / r["seconds"] / 1e12
        r["mfu"] = flops / r["seconds"] / peak if peak else None

    report = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "shape": args.shape, "params": n_params, "matmul_params": matmul_params, "pairs_per_step": args.pairs,
              "measured_steps": args.steps - args.warmup, "real_tokens": real_tokens, "flops": flops,
              "peak_flops": peak, "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_step_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}, {args.shape} "
          f"({n_params / 1e9:.2f} B params), {args.pairs} pairs/step, {report['measured_steps']} steps timed")
    print(f"{'variant':8} {'attn':18} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'pad waste':>9}")
    for r in results:
        waste = 1 - real_tokens / r["padded_width_tokens"]
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        print(f"{r['variant']:8} {r['attn']:18} {r['tokens_per_s']:10.0f} {r['tflops_per_s']:8.1f} {mfu:>6} "
              f"{r['peak_mem_gib']:9.1f} {waste:9.2f}")
    by = {r["variant"]: r for r in results}
    print(f"ratio packed/padded tokens/s: {by['packed']['tokens_per_s'] / by['padded']['tokens_per_s']:.2f}")
    if "flash" in by:
        print(f"ratio flash/padded tokens/s: {by['flash']['tokens_per_s'] / by['padded']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
