"""Scaling: generation pairs/s and peak memory as the dataset grows 1x, 4x, 16x; training tokens/s with 1 vs 2
Ray Train workers.

    python bench/scaling.py                       # both parts
    python bench/scaling.py --part gen            # generation only (tiny_random, short outputs)
    python bench/scaling.py --part train          # training only (SmolLM2-135M)

Generation (--part gen): the real SAO generation path, selfalign_ray.sao.pipeline.generate_sao (config composed
as `selfalign-ray model=tiny_random engine=hf dataset_size=N ...` would), with short outputs so that 16x fits in
minutes. Sizes --base x {1, 4, 16} personas, each size run --reps times, sizes interleaved. pairs/s and
personas/s are over the whole generate_sao call (actor start included). Memory: a background thread samples
the RSS of this driver and of every process it started (the local Ray cluster) every 0.25 s: peak of the
driver, of the Ray worker/actor processes (`ray::...`), and of all of them together. Streaming means the peak
must not grow with the dataset: rows flow through the actor in engine-batch blocks and the driver holds at
most one shard (mode.shard_size rows) per chunk in flight.

Training (--part train): selfalign_ray.train.train_model (TorchTrainer + DeepSpeed ZeRO-3), SmolLM2-135M,
the same synthetic pairs as bench/train_vs_trl.py, global batch --global-batch pairs, 2 pairs per worker
micro-batch, eval off. Three CPU budgets, interleaved:
  1w x 1t : 1 worker, 1 CPU, torch threads 1              (one core idle: the baseline)
  1w x 2t : 1 worker, 2 CPUs, torch threads 2              (both cores, one process)
  2w x 1t : 2 workers, 1 CPU each, torch threads 1 each   (both cores, ZeRO-3 across two ranks over gloo)
Ray is started with 3 logical CPUs for this part, so that 2 CPUs reserved by workers still leave the one
that the trainer's budget check keeps for Ray Data's read tasks (the machine has 2 physical cores; the
reader uses almost none). Tokens/s = real tokens of all ranks per second of optimizer steps (from
train_history.jsonl), first --warmup steps dropped. The comparison that answers "does a second worker pay"
is 2w x 1t vs 1w x 2t (same cores, same threads in total); 1w x 1t shows what one core gives.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RSSSampler, init_ray, interleave, machine, median, uptime, versions, write_json  # noqa: E402


# ------------------------------------------------------------------------------------------- generation
def gen_variant(args, size: int, workdir: Path):
    from selfalign_ray.cli import compose
    from selfalign_ray.models.resolve import resolve_model_path
    from selfalign_ray.sao.pipeline import generate_sao

    def run() -> dict:
        out = Path(tempfile.mkdtemp(dir=workdir))
        cfg = compose([f"model={args.gen_model}", "engine=hf", f"dataset_size={size}", f"output_dir={out}",
                       f"mode.instruct.max_tokens={args.gen_tokens}", f"mode.respond.max_tokens={args.gen_tokens}",
                       f"engine.torch_threads={args.gen_threads}", "train.enabled=false"])
        model_path = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
        t0 = time.time()
        with RSSSampler() as mem:
            manifest = generate_sao(cfg, 1, model_path, out / "iter_1")
        wall = time.time() - t0
        peak = mem.mib()
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        return {"size": size, "wall_s": wall, "pairs": manifest["pairs_kept"], "pairs_s": manifest["pairs_kept"] / wall,
                "personas_s": size / wall, "chunks": manifest["chunks"], "peak_driver_mib": peak["driver"],
                "peak_workers_mib": peak["workers"], "peak_total_mib": peak["total"]}
    return run


def part_gen(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench_scale_gen_"))
    sizes = [args.base * m for m in (1, 4, 16)]
    init_ray(num_cpus=2)
    print(f"== generation: {args.gen_model}, sizes {sizes}, {args.gen_tokens} max new tokens per stage, hf engine "
          f"(batch 16, {args.gen_threads} torch thread(s)), shard_size 64", flush=True)
    gen_variant(args, args.base, workdir)()  # warm-up: imports, first actor start, page cache
    runs = interleave({f"{m}x": gen_variant(args, args.base * m, workdir) for m in (1, 4, 16)}, args.reps)
    import ray

    ray.shutdown()
    keys = ("wall_s", "pairs", "pairs_s", "personas_s", "peak_driver_mib", "peak_workers_mib", "peak_total_mib")
    med = {name: {k: median([r[k] for r in rs]) for k in keys} for name, rs in runs.items()}
    return {"sizes": sizes, "median": med, "runs": runs}


# --------------------------------------------------------------------------------------------- training
BUDGETS = {
    "1w x 1t": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
    "1w x 2t": {"num_workers": 1, "cpus_per_worker": 2, "torch_threads": 2},
    "2w x 1t": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
}


def train_variant(args, name: str, parquet: str, model_path: str, ds_cfg, workdir: Path):
    from selfalign_ray.train import train_model

    def run() -> dict:
        budget = BUDGETS[name]
        cfg = {"beta": 10.0, "gamma_beta_ratio": 0.3, "learning_rate": 1e-6, "max_length": 512,
               "max_prompt_length": 256, "per_device_batch_size": 2, "global_batch_size": args.global_batch,
               "eval_before_after": False, "checkpoint_every_steps": 10**6,
               "max_failures": 0, "warmup_ratio": 0.0, "seed": 0, **budget}
        out = Path(tempfile.mkdtemp(dir=workdir))
        with RSSSampler() as mem:
            result = train_model(model_path=model_path, train_files=[parquet], output_dir=str(out / "model"),
                                 cfg=cfg, deepspeed_cfg=ds_cfg, run_name="bench")
        hist = result.history[args.warmup:]
        seconds = sum(h["tokens"] / h["tokens_per_s"] for h in hist)
        tokens = sum(h["tokens"] for h in hist)
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        return {"steps": len(hist), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                "peak_workers_mib": mem.mib()["workers"], "peak_total_mib": mem.mib()["total"],
                "step_s": [round(h["tokens"] / h["tokens_per_s"], 1) for h in hist]}
    return run


def part_train(args) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from selfalign_ray.cli import compose
    from selfalign_ray.models.resolve import resolve_model_path
    from train_vs_trl import make_pairs

    cfg = compose([f"model={args.train_model}"])
    model_path = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
    workdir = Path(tempfile.mkdtemp(prefix="bench_scale_train_"))
    parquet = str(workdir / "pairs.parquet")
    rows = make_pairs(args.global_batch * (args.train_steps + args.warmup), 0, (15, 80))
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    init_ray(num_cpus=3)
    print(f"== training: {model_path}, {len(rows)} pairs, global batch {args.global_batch} pairs "
          f"(2 per worker micro-batch), {args.train_steps} timed + {args.warmup} warm-up optimizer steps", flush=True)
    names = [n for n in BUDGETS if n in args.budgets.split(",")]
    runs = interleave({n: train_variant(args, n, parquet, model_path, cfg.deepspeed, workdir) for n in names},
                      args.reps)
    import ray

    ray.shutdown()
    med = {n: {k: median([r[k] for r in rs]) for k in ("tok_s", "tokens", "peak_workers_mib", "peak_total_mib")}
           for n, rs in runs.items()}
    return {"model": model_path, "median": med, "runs": runs, "budgets": {n: BUDGETS[n] for n in names}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="gen,train")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--base", type=int, default=20, help="personas at 1x (16x must fit the 370 builtin personas)")
    ap.add_argument("--gen-model", default="tiny_random")
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--gen-threads", type=int, default=1)
    ap.add_argument("--train-model", default="smollm2_135m")
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budgets", default="1w x 1t,1w x 2t,2w x 1t")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    start_load = uptime("start")
    parts = args.part.split(",")
    report = {"versions": versions(), "machine": machine(), "args": vars(args), "uptime_start": start_load}
    if "gen" in parts:
        report["gen"] = part_gen(args)
    if "train" in parts:
        report["train"] = part_train(args)
    report["uptime_end"] = uptime("end")
    write_json(args.json, report)

    if "gen" in report:
        g = report["gen"]
        print(f"\ngeneration, medians of {args.reps} interleaved runs ({args.gen_model}, {args.gen_tokens} tokens/stage)")
        print(f"{'size':>5} {'personas':>8} {'pairs':>6} {'wall s':>7} {'pairs/s':>8} {'vs 1x':>6} "
              f"{'driver MiB':>10} {'actors MiB':>10} {'all MiB':>8} {'mem vs 1x':>9}")
        base = g["median"]["1x"]
        for (name, m), size in zip(g["median"].items(), g["sizes"]):
            print(f"{name:>5} {size:8d} {m['pairs']:6.0f} {m['wall_s']:7.1f} {m['pairs_s']:8.2f} "
                  f"{m['pairs_s'] / base['pairs_s']:6.2f} {m['peak_driver_mib']:10.0f} {m['peak_workers_mib']:10.0f} "
                  f"{m['peak_total_mib']:8.0f} {m['peak_total_mib'] / base['peak_total_mib']:9.2f}")
    if "train" in report:
        t = report["train"]
        print(f"\ntraining, medians of {args.reps} interleaved runs ({t['model']})")
        print(f"{'budget':8} {'workers':>7} {'CPUs/w':>6} {'thr/w':>5} {'tok/s':>7} {'vs 1w x 1t':>10} "
              f"{'vs 1w x 2t':>10} {'workers MiB':>11}")
        med = t["median"]
        for n, m in med.items():
            b = t["budgets"][n]
            r1 = m["tok_s"] / med["1w x 1t"]["tok_s"] if "1w x 1t" in med else float("nan")
            r2 = m["tok_s"] / med["1w x 2t"]["tok_s"] if "1w x 2t" in med else float("nan")
            print(f"{n:8} {b['num_workers']:7d} {b['cpus_per_worker']:6} {b['torch_threads']:5d} {m['tok_s']:7.2f} "
                  f"{r1:10.2f} {r2:10.2f} {m['peak_workers_mib']:11.0f}")


if __name__ == "__main__":
    main()
