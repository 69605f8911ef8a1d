"""SimPO training step: ours vs TRL's CPOTrainer(loss_type="simpo", cpo_alpha=0), same model, data, batch, lengths.

    python bench/train_vs_trl.py                        # SmolLM2-135M, CPU, 4 pairs per step, fp32 and bf16 rows
    python bench/train_vs_trl.py --threads 2 --steps 4 --json /tmp/trl.json

TRL is not a dependency of this project: a trl wheel is installed beside the venv, never into it,
    pip install --no-deps --target /tmp/trl_pkg trl-1.16.0-py3-none-any.whl
and this script puts --trl-path (default /tmp/trl_pkg) on sys.path.

Variants (interleaved in one process, medians reported); every variant records its precision:
  trl_fp32    : trl.experimental.cpo.CPOTrainer, loss_type="simpo", cpo_alpha=0, beta=10, simpo_gamma=3
                (= gamma/beta 0.3), lr 1e-6, max_length 512, optim --trl-optim (adamw_torch_fused), max_grad_norm 1,
                sequential sampler, one process (HF Trainer + accelerate, no DeepSpeed). Padded concatenated forward.
                bf16=False set explicitly: fp32 weights and compute.
  trl_bf16    : the same with bf16=True set explicitly: HF Trainer/accelerate run the forward under
                torch.autocast("cpu", bfloat16), fp32 weights (what our bf16 CPU path does too).
  trl_default : the same without setting bf16, i.e. what a TRL user gets: CPOConfig (TRL 1.16) defaults to
                bf16=True even with use_cpu=True, so this is bf16 autocast; the precision column says what it
                resolved to. Not a like-for-like row: reported separately.
  ours_direct_fp32 / ours_direct_bf16 : our step without Ray and DeepSpeed: the worker's code path (train/data.py
                tokenisation and padding-free packing, the attention the worker picks (core._attn_implementation:
                sdpa_packed on CPU), train/objectives.run_micro_batch) + the worker's torch AdamW (fused kernel,
                clip 1.0) in this process; _bf16 = the worker's CPU bf16 path (train/precision.py: autocast,
                fp32 weights). The like-for-like comparison with TRL's single process.
  ours_zero3_fp32 / ours_zero3_bf16 : the worker's step itself (train/core.TrainCore.train_step) on a DeepSpeed
                ZeRO-3 engine (conf/deepspeed/zero3.yaml, train/core.build_engine) in this process, a gloo group of
                one, no Ray: the same pairs in the same order as ours_direct, so ours_direct -> ours_zero3 is what
                ZeRO-3's engine costs at world size 1 and ours_zero3 -> ours_ray what Ray Train + Ray Data add.
                Can be profiled (--profile).
  ours_ray_fp32 / ours_ray_bf16 : the product path: selfalign_ray.train.train_model -> Ray Train TorchTrainer,
                1 worker, DeepSpeed ZeRO-3 (conf/deepspeed/zero3.yaml), Ray Data streaming the Parquet pairs,
                train.bf16=false / true. Step times come from train_history.jsonl (tokens / tokens_per_s per
                optimizer step); the precision from its train_summary.json.
All: the same fp32 checkpoint, the same pairs (in the same order, except ours_ray_*: Ray Train reads them in its
seeded permutation, so compare losses by the run's mean step loss, not the first step's), per-device batch = global batch = --batch pairs
(no accumulation), the same torch threads (--threads). Ratios: each of ours against the TRL row of the SAME
precision (fp32 vs trl_fp32, bf16 autocast vs trl_bf16), and separately against trl_default. The report
records the CPU model, its bf16 flags (avx512_bf16 / amx_bf16: without them bf16 is emulated and slow, which
decides how TRL's default compares), torch's CPU capability, /proc/loadavg at start and end, and versions.

Step time = from the end of the previous optimizer step to the end of this one (tokenisation / collation of
the batch, forward, backward, clipping, optimizer step); the first --warmup steps are not counted.
Tokens = real (non-pad) tokens of chosen + rejected (prompt + response each), each side counting what its own
tokenisation fed the model (TRL appends an extra EOS after the template's `<|im_end|>\\n`, so it has ~1 more
token per sequence). Ratio = ours tokens/s / TRL tokens/s (target >= 1.3); pairs/s ratio printed as well.

Long sequences (--long): pairs of fixed length (--long-tokens, default 2048 tokens per sequence, prompt + answer;
answers are corpus paragraphs joined past the limit, so every sequence is cut to exactly max_length), one pair
per optimizer step, --steps timed steps after --warmup, each variant in its OWN subprocess so that its peak
memory (VmHWM of that process: weights, optimizer state, activations, logits) is its own:
  trl_fp32        : CPOTrainer(loss_type="simpo", cpo_alpha=0), bf16=False (CPOConfig defaults to bf16=True,
                    even on CPU), max_length = --long-tokens; gradient checkpointing ON, CPOConfig's own default
                    (TRL 1.16), so its like-for-like row of ours is ours_chunked_gc(_padded)
  trl_bf16        : the same with CPOConfig's default bf16=True (autocast bf16 on CPU; fp32 master weights)
  ours_full       : our step (ours_direct) with train.logprob_chunk_tokens=0: the model's full logits (before)
  ours_chunked    : our step with train.logprob_chunk_tokens=1024 (the default): train/logprobs.py (after)
  ours_chunked_gc : ours_chunked + gradient checkpointing (train.gradient_checkpointing=true, non-reentrant)
  *_padded        : the same with train.padding_free=false: a (2, L) right-padded batch like TRL's. The packed row
                    (1, 2L) attends through a block-diagonal mask, which on CPU SDPA costs the full (2L)^2 instead
                    of two causal L^2 (is_causal lets the kernel skip the upper triangle); equal-length pairs
                    have no padding to save, so padded is the right layout for them on CPU.
Ours: max_prompt_length 32 (so the prompt is cut to 32 tokens and the answers fill the rest: both sides train
on sequences of exactly --long-tokens tokens). Precision is printed per variant.

Memory curve (--memory-curve): peak bytes of the tensors made during one forward + backward of one pair, by
selfalign_ray/train/tensor_memory.LiveTensorPeak (deterministic, op by op; weights and optimizer excluded),
full logits vs chunked, at --curve-lengths tokens per sequence, on the model's architecture cut to
--curve-layers decoder layers (random weights; the logits part does not depend on the depth, and the curve
stays cheap).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, init_ray, interleave, loadavg, machine, median, uptime, versions, write_json  # noqa: E402

TRL_VARIANTS = ("trl_fp32", "trl_bf16", "trl_default")
VARIANTS = TRL_VARIANTS + ("ours_direct_fp32", "ours_direct_bf16", "ours_zero3_fp32", "ours_zero3_bf16",
                           "ours_ray_fp32", "ours_ray_bf16")
FP32, AUTOCAST = "fp32", "bf16 autocast (fp32 weights)"
# Our SimPO settings in every short-pair variant (TRL's: beta 10, simpo_gamma 3 = 0.3 x beta, lr 1e-6).
OURS_SIMPO = {"beta": 10.0, "gamma_beta_ratio": 0.3, "learning_rate": 1e-6, "max_length": 512,
              "max_prompt_length": 256}


def make_pairs(n: int, seed: int, words: tuple[int, int]) -> list[dict]:
    """TRL conversational preference rows: builtin eval prompts; chosen / rejected = builtin corpus paragraphs
    cut to a random number of words (so lengths vary as in real data)."""
    builtin = ROOT / "selfalign_ray" / "builtin"
    prompts = [json.loads(x)["instruction"] for x in (builtin / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    paras = [p.split() for p in (builtin / "corpus.txt").read_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        def answer():
            return " ".join(rng.choice(paras)[:rng.randint(*words)])
        rows.append({"prompt": [{"role": "user", "content": prompts[i % len(prompts)]}],
                     "chosen": [{"role": "assistant", "content": answer()}],
                     "rejected": [{"role": "assistant", "content": answer()}]})
    return rows


def load_model(path: str, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    model.train()
    return model


def step_stats(ends: list[float], tokens: list[int], pairs_per_step: int, warmup: int, start: float) -> dict:
    """Per-step seconds from consecutive step-end stamps (step 0 measured from `start`), warmup dropped."""
    times = [e - s for s, e in zip([start] + ends[:-1], ends)][warmup:]
    toks = tokens[warmup:len(ends)]
    sec = sum(times)
    return {"steps": len(times), "seconds": sec, "tokens": sum(toks), "tok_s": sum(toks) / sec,
            "pairs_s": pairs_per_step * len(times) / sec, "step_s": [round(t, 2) for t in times]}


class Bench:
    def __init__(self, args):
        from selfalign_ray.cli import compose
        from selfalign_ray.models.resolve import resolve_model_path

        cfg = compose([f"model={args.model}"])
        self.model_path = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
        self.ds_cfg = cfg.deepspeed
        self.args = args
        self.n_steps = args.steps + args.warmup
        self.rows = make_pairs(self.n_steps * args.batch, args.seed, (args.min_words, args.max_words))
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_trl_"))
        self.parquet = str(self.tmp / "pairs.parquet")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(self.rows), self.parquet)
        self.first_loss = {}
        # Mean step loss over the run (each of the n_steps x batch pairs once): comparable across variants whatever
        # the order, where the first-step loss is not (ours_ray reads the pairs in Ray Train's seeded permutation).
        self.run_loss = {}

    def record_losses(self, name: str, losses: list[float]) -> None:
        """The first step's loss and the run's mean step loss, from a variant's first repetition."""
        self.first_loss.setdefault(name, losses[0])
        self.run_loss.setdefault(name, sum(losses) / len(losses))

    def step_batches(self, tok, cfg) -> Iterator[dict]:
        """The pairs, --batch per optimizer step, tokenised and collated as the worker does (train/data.py); lazily,
        so each step's tokenisation falls inside that step's time."""
        from selfalign_ray.train.data import collate, preference_examples

        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        n = self.args.batch
        for s in range(self.n_steps):
            pairs = [preference_examples(tok, r, cfg.max_length, cfg.max_prompt_length)
                     for r in self.rows[s * n:(s + 1) * n]]
            yield collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, padding_free=cfg.padding_free)

    # ------------------------------------------------------------------------ TRL
    def trl_fp32(self) -> dict:
        return self.trl("trl_fp32", False)

    def trl_bf16(self) -> dict:
        return self.trl("trl_bf16", True)

    def trl_default(self) -> dict:
        return self.trl("trl_default", None)

    def trl(self, name: str, bf16: bool | None) -> dict:
        """bf16 None: CPOConfig's own default."""
        import torch
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        a = self.args
        torch.set_num_threads(a.threads)
        tokens, padded, ends, losses, threads_seen = [], [], [], [], []

        class Counting(CPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                c, r = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]
                tokens.append(int(c.sum() + r.sum()))
                padded.append(2 * c.shape[0] * max(c.shape[1], r.shape[1]))
                threads_seen.append(torch.get_num_threads())
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                losses.append(float(out[0] if isinstance(out, tuple) else out))
                return out

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                ends.append(time.perf_counter())

        cfg = CPOConfig(output_dir=str(self.tmp / "trl"), loss_type="simpo", cpo_alpha=0.0, beta=10.0,
                        simpo_gamma=3.0, learning_rate=1e-6, max_length=512, per_device_train_batch_size=a.batch,
                        gradient_accumulation_steps=1, max_steps=self.n_steps, optim=a.trl_optim,
                        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0,
                        train_sampling_strategy="sequential", use_cpu=True, report_to="none",
                        save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, seed=a.seed,
                        disable_tqdm=True, **({} if bf16 is None else {"bf16": bf16}))
        tok = AutoTokenizer.from_pretrained(self.model_path)
        trainer = Counting(model=load_model(self.model_path), args=cfg, train_dataset=Dataset.from_list(self.rows),
                           processing_class=tok, callbacks=[Stamp()])
        start = time.perf_counter()
        trainer.train()
        res = step_stats(ends, tokens, a.batch, a.warmup, start)
        res["pad_waste"] = 1 - sum(tokens[a.warmup:]) / sum(padded[a.warmup:])
        res["threads"] = threads_seen[-1]
        # What the HF Trainer really ran: bf16=True on CPU = accelerate's bf16 autocast, fp32 weights.
        res["precision"] = AUTOCAST if cfg.bf16 else FP32
        res["model_dtype"] = str(next(trainer.model.parameters()).dtype)
        self.record_losses(name, losses)
        del trainer
        gc.collect()
        return res

    # ---------------------------------------------------------------- ours, direct
    def ours_direct_fp32(self) -> dict:
        return self.ours_direct("ours_direct_fp32", "fp32")

    def ours_direct_bf16(self) -> dict:
        return self.ours_direct("ours_direct_bf16", "bf16_autocast")

    def ours_direct(self, name: str, mode: str) -> dict:
        import torch
        from transformers import AutoTokenizer

        from selfalign_ray.train.config import TrainConfig
        from selfalign_ray.train.core import _attn_implementation
        from selfalign_ray.train.precision import Precision
        from selfalign_ray.train.objectives import run_micro_batch
        from selfalign_ray.train.worker import make_adamw

        a = self.args
        torch.set_num_threads(a.threads)
        cfg = TrainConfig(**OURS_SIMPO, per_device_batch_size=a.batch, global_batch_size=a.batch, num_workers=1)
        tok = AutoTokenizer.from_pretrained(self.model_path)
        # What the worker picks (sdpa_packed on CPU), or --ours-attn as given (sdpa: the block-diagonal mask).
        attn = _attn_implementation(self.model_path, cfg) if a.ours_attn == "auto" else a.ours_attn
        precision = Precision(mode, "bench")
        model = load_model(self.model_path, attn)
        opt = make_adamw(model.parameters(), cfg.learning_rate, 0.0)  # the worker's optimizer
        tokens, ends, losses = [], [], []
        start = time.perf_counter()
        for batch in self.step_batches(tok, cfg):
            with precision.autocast():  # the worker's forward context (TrainCore.train_step)
                out = run_micro_batch(model, batch, cfg, "simpo", attn)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens.append(out.tokens)
            losses.append(float(out.loss))
            ends.append(time.perf_counter())
        self.record_losses(name, losses)
        res = step_stats(ends, tokens, a.batch, a.warmup, start)
        res.update(threads=torch.get_num_threads(), precision=FP32 if mode == "fp32" else AUTOCAST, attn=attn)
        del model, opt
        gc.collect()
        return res

    # --------------------------------------------------------- ours, ZeRO-3 engine
    def ours_zero3_fp32(self) -> dict:
        return self.ours_zero3("ours_zero3_fp32", False)

    def ours_zero3_bf16(self) -> dict:
        return self.ours_zero3("ours_zero3_bf16", True)

    def ours_zero3(self, name: str, bf16: bool) -> dict:
        import os
        import socket

        import torch

        from selfalign_ray.train.config import TrainConfig
        from selfalign_ray.train.core import TrainCore, build_engine, configure_runtime
        from selfalign_ray.train.deepspeed_config import deepspeed_config
        from selfalign_ray.train.schedule import StepPlan

        a = self.args
        if "MASTER_ADDR" not in os.environ:  # a gloo group of one for DeepSpeed, made once per process
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        # ours_ray's settings (constant lr here, like ours_direct: the schedule costs nothing measurable).
        cfg = TrainConfig(**OURS_SIMPO, per_device_batch_size=a.batch, global_batch_size=a.batch, num_workers=1,
                          cpus_per_worker=1, torch_threads=a.threads, lr_scheduler="constant", warmup_ratio=0.0,
                          seed=a.seed, bf16=bf16)
        cfg.validate()
        precision = configure_runtime(cfg)  # threads, seed, the group (DeepSpeed reuses it on later calls)
        plan = StepPlan.build(self.n_steps * a.batch, cfg)
        tok, engine, _hf_ds = build_engine(self.model_path, cfg, deepspeed_config(self.ds_cfg, cfg), plan,
                                           precision=precision)
        core = TrainCore(engine, cfg, "simpo", precision=precision)
        tokens, ends, losses = [], [], []
        start = time.perf_counter()
        for step, batch in enumerate(self.step_batches(tok, cfg), start=1):
            result = core.train_step([batch], step=step)
            tokens.append(int(result.totals["tokens"]))
            losses.append(result.metrics["loss"])
            ends.append(time.perf_counter())
        self.record_losses(name, losses)
        res = step_stats(ends, tokens, a.batch, a.warmup, start)
        res.update(threads=torch.get_num_threads(), precision=AUTOCAST if precision.mode == "bf16_autocast" else FP32,
                   attn=core.attn)
        engine.destroy()
        del core, engine, _hf_ds
        gc.collect()
        return res

    # ------------------------------------------------------------ ours, Ray Train
    def ours_ray_fp32(self) -> dict:
        return self.ours_ray("ours_ray_fp32", False)

    def ours_ray_bf16(self) -> dict:
        return self.ours_ray("ours_ray_bf16", True)

    def ours_ray(self, name: str, bf16: bool) -> dict:
        from selfalign_ray.train import train_model

        a = self.args
        cfg = {**OURS_SIMPO, "per_device_batch_size": a.batch, "global_batch_size": a.batch,
               "num_workers": 1, "cpus_per_worker": 1, "torch_threads": a.threads,
               "eval_before_after": False, "checkpoint_every_steps": 10**6, "max_failures": 0,
               "warmup_ratio": 0.0, "seed": a.seed, "bf16": bf16}
        out = Path(tempfile.mkdtemp(dir=self.tmp))
        result = train_model(model_path=self.model_path, train_files=[self.parquet], output_dir=str(out / "model"),
                             cfg=cfg, deepspeed_cfg=self.ds_cfg, run_name="bench")
        hist = result.history
        self.record_losses(name, [h["loss"] for h in hist])
        prec = result.summary.get("precision", {})
        times = [h["tokens"] / h["tokens_per_s"] for h in hist][a.warmup:]
        toks = [h["tokens"] for h in hist][a.warmup:]
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        return {"steps": len(times), "seconds": sum(times), "tokens": sum(toks), "tok_s": sum(toks) / sum(times),
                "pairs_s": a.batch * len(times) / sum(times), "step_s": [round(t, 2) for t in times],
                "threads": a.threads, "precision": AUTOCAST if prec.get("mode") == "bf16_autocast" else FP32,
                "attn": result.summary.get("attn_implementation")}


def profile(bench: Bench, names: list[str], top: int) -> dict:
    """Each variant once under torch.profiler: self CPU seconds per op (top `top`) and the total, so that two
    variants' kernels can be compared op by op. Not for ours_ray (its step runs in a Ray worker process)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for n in names:
        if n.startswith("ours_ray"):
            raise SystemExit("--profile: ours_ray_* runs in a Ray worker; profile ours_direct_* (the same step)")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            res = getattr(bench, n)()
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        ops = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events[:top]]
        out[n] = {"precision": res["precision"], "tokens": res["tokens"], "self_cpu_s": total, "top_ops": ops}
        print(f"\n{n} ({res['precision']}): {total:.1f} s self CPU over all steps, top ops:")
        for o in ops:
            print(f"  {o['op'][:48]:48} {o['self_s']:8.2f} s {100 * o['self_s'] / total:5.1f} %  {o['calls']:7d} calls")
    return out


# ------------------------------------------------------------------------------------------- long sequences
LONG_VARIANTS = ("trl_fp32", "trl_bf16", "ours_full", "ours_chunked", "ours_chunked_gc", "ours_full_padded",
                 "ours_chunked_padded", "ours_chunked_gc_padded")


def make_long_pairs(n: int, seed: int, words: int) -> list[dict]:
    """Like make_pairs, but every answer joins random corpus paragraphs until it has `words` words."""
    builtin = ROOT / "selfalign_ray" / "builtin"
    prompts = [json.loads(x)["instruction"] for x in (builtin / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    paras = [p.split() for p in (builtin / "corpus.txt").read_text().split("\n\n") if p.strip()]
    rng = random.Random(seed)

    def answer():
        out = []
        while len(out) < words:
            out += rng.choice(paras)
        return " ".join(out[:words])

    return [{"prompt": [{"role": "user", "content": prompts[i % len(prompts)]}],
             "chosen": [{"role": "assistant", "content": answer()}],
             "rejected": [{"role": "assistant", "content": answer()}]} for i in range(n)]


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM of its address space. Not ru_maxrss: Linux carries ru_maxrss
    across fork + exec, so a child would report at least its parent's RSS at the time it was started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def long_child(args) -> dict:
    """One long-sequence variant in this (fresh) process; returns its timings and this process's peak RSS."""
    import torch
    from transformers import AutoTokenizer

    from selfalign_ray.cli import compose
    from selfalign_ray.models.resolve import resolve_model_path

    torch.set_num_threads(args.threads)
    cfg = compose([f"model={args.model}"])
    model_path = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
    n_steps = args.steps + args.warmup
    rows = make_long_pairs(n_steps, args.seed, words=int(args.long_tokens * 1.5))
    name, L = args.long_child, args.long_tokens
    tokens, ends, losses = [], [], []
    if name.startswith("trl"):
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        class Counting(CPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                tokens.append(int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()))
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                losses.append(float(out[0] if isinstance(out, tuple) else out))
                return out

        class Stamp(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                ends.append(time.perf_counter())

        bf16 = name == "trl_bf16"
        tcfg = CPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_long_"), loss_type="simpo", cpo_alpha=0.0,
                         beta=10.0, simpo_gamma=3.0, learning_rate=1e-6, max_length=L, per_device_train_batch_size=1,
                         gradient_accumulation_steps=1, max_steps=n_steps, optim=args.trl_optim, max_grad_norm=1.0,
                         lr_scheduler_type="cosine", warmup_steps=0, train_sampling_strategy="sequential",
                         use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
                         dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, bf16=bf16)
        attn = "sdpa"  # TRL's padded rows, is_causal
        trainer = Counting(model=load_model(model_path, attn), args=tcfg, train_dataset=Dataset.from_list(rows),
                           processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[Stamp()])
        precision = "bf16 autocast (fp32 weights)" if bf16 else "fp32"
        start = time.perf_counter()
        trainer.train()
    else:
        from selfalign_ray.train.config import TrainConfig
        from selfalign_ray.train.core import _attn_implementation
        from selfalign_ray.train.data import collate, preference_examples
        from selfalign_ray.train.objectives import run_micro_batch
        from selfalign_ray.train.worker import make_adamw

        chunk = 0 if name.startswith("ours_full") else 1024
        packed = not name.endswith("_padded")
        tcfg = TrainConfig(beta=10.0, gamma_beta_ratio=0.3, learning_rate=1e-6, max_length=L, max_prompt_length=32,
                           per_device_batch_size=1, global_batch_size=1, num_workers=1, logprob_chunk_tokens=chunk,
                           padding_free=packed)
        tok = AutoTokenizer.from_pretrained(model_path)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # The attention the worker picks for this layout (sdpa_packed for packed CPU rows, sdpa for padded ones).
        attn = _attn_implementation(model_path, tcfg)
        model = load_model(model_path, attn)
        if "_gc" in name:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = make_adamw(model.parameters(), tcfg.learning_rate, 0.0)
        precision = "fp32"
        start = time.perf_counter()
        for row in rows:
            c, r = preference_examples(tok, row, tcfg.max_length, tcfg.max_prompt_length)
            batch = collate([c, r], pad_id, padding_free=packed)
            out = run_micro_batch(model, batch, tcfg, "simpo", attn)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens.append(out.tokens)
            losses.append(float(out.loss))
            ends.append(time.perf_counter())
    res = step_stats(ends, tokens, 1, args.warmup, start)
    res.update(variant=name, precision=precision, threads=torch.get_num_threads(), first_loss=losses[0],
               tokens_per_step=tokens[0], peak_rss_mib=_peak_rss_mib(), attn=attn)
    return res


def long_case(args) -> dict:
    import subprocess

    results = {}
    names = args.long_variants.split(",")
    unknown = [n for n in names if n not in LONG_VARIANTS]
    if unknown:  # before the first (minutes-long) variant runs
        raise SystemExit(f"--long-variants: {unknown} not among {', '.join(LONG_VARIANTS)}")
    for name in names:
        cmd = [sys.executable, __file__, "--long-child", name, "--model", args.model, "--threads", str(args.threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--long-tokens", str(args.long_tokens),
               "--seed", str(args.seed), "--trl-path", args.trl_path, "--trl-optim", args.trl_optim]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("LONG_RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[-1][len("LONG_RESULT "):])
        r = results[name]
        print(f"  {name:16} {r['precision']:28} tokens/step {r['tokens_per_step']:6d} tok/s {r['tok_s']:7.2f} "
              f"peak RSS {r['peak_rss_mib']:8.0f} MiB  first loss {r['first_loss']:.4f}  attn {r['attn']}", flush=True)
    base = results.get("trl_fp32")
    if base:
        print(f"\nvs trl_fp32 ({base['tok_s']:.2f} tok/s, {base['peak_rss_mib']:.0f} MiB):")
        for name, r in results.items():
            if name != "trl_fp32":
                r["vs_trl_fp32"] = {"tok_s": r["tok_s"] / base["tok_s"], "peak_rss": r["peak_rss_mib"] / base["peak_rss_mib"]}
                print(f"  {name:16} tok/s x{r['vs_trl_fp32']['tok_s']:.2f} (target >= 1.3)   peak memory "
                      f"x{r['vs_trl_fp32']['peak_rss']:.2f} (target <= 0.5)")
    return results


def memory_curve(args) -> list[dict]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfalign_ray.cli import compose
    from selfalign_ray.models.resolve import resolve_model_path
    from selfalign_ray.train.config import TrainConfig
    from selfalign_ray.train.data import Example, collate
    from selfalign_ray.train.objectives import run_micro_batch
    from selfalign_ray.train.tensor_memory import LiveTensorPeak

    torch.set_num_threads(args.threads)
    cfg = compose([f"model={args.model}"])
    mcfg = AutoConfig.from_pretrained(resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype))
    mcfg.num_hidden_layers = args.curve_layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32, attn_implementation="sdpa").train()
    rng = random.Random(args.seed)
    rows = []
    for L in [int(x) for x in args.curve_lengths.split(",")]:
        exs = []
        for _ in range(2):  # chosen, rejected: 32 prompt tokens, L - 32 answer tokens
            ids = [rng.randrange(mcfg.vocab_size) for _ in range(L)]
            exs.append(Example(ids, [-100] * 32 + ids[32:]))
        batch = collate(exs, 0, padding_free=True)
        row = {"tokens_per_sequence": L}
        for label, chunk in (("full_logits", 0), ("chunked", 1024)):
            model.zero_grad(set_to_none=True)
            with LiveTensorPeak() as mem:
                run_micro_batch(model, batch, TrainConfig(logprob_chunk_tokens=chunk), "simpo").loss.backward()
            row[f"{label}_mib"] = mem.peak_bytes / 2**20
        row["ratio"] = row["chunked_mib"] / row["full_logits_mib"]
        rows.append(row)
        print(f"  L={L:5d}  full logits {row['full_logits_mib']:8.1f} MiB   chunked {row['chunked_mib']:8.1f} MiB   "
              f"ratio {row['ratio']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (2x sequences)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps at the start of each run")
    ap.add_argument("--min-words", type=int, default=15)
    ap.add_argument("--max-words", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every variant")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default="trl_fp32,ours_direct_fp32,trl_bf16,ours_direct_bf16,trl_default",
                    help=f"comma-separated, among {', '.join(VARIANTS)} (ours_ray_* start Ray: slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-path", default="/tmp/trl_pkg")
    ap.add_argument("--trl-optim", default="adamw_torch_fused",
                    help="HF Trainer optim for TRL; fused like ours by default, so the ratio is not an optimizer gap")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ours-attn", default="auto",
                    help="ours_direct_*: auto = the worker's choice (sdpa_packed on CPU); sdpa = transformers' SDPA "
                         "with the packed row's block-diagonal mask (the layout before sdpa_packed)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of timing: run each variant once under torch.profiler, print its top N ops by "
                         "self CPU time (warmup and timed steps both recorded)")
    ap.add_argument("--long", action="store_true", help="the long-sequence case (one subprocess per variant)")
    ap.add_argument("--long-tokens", type=int, default=2048, help="tokens per sequence in the long case")
    ap.add_argument("--long-variants", default=",".join(LONG_VARIANTS))
    ap.add_argument("--long-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-curve", action="store_true", help="peak tensor memory vs sequence length")
    ap.add_argument("--curve-lengths", default="512,1024,2048,4096")
    ap.add_argument("--curve-layers", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, args.trl_path)
    if args.long_child:
        print("LONG_RESULT " + json.dumps(long_child(args)), flush=True)
        return
    if args.long or args.memory_curve:
        import torch

        report = {"versions": versions(), "uptime_start": uptime("start"), "loadavg_start": loadavg(),
                  "args": vars(args), "machine": machine(args.threads), "torch_threads": args.threads}
        if args.memory_curve:
            print(f"memory curve ({args.model} architecture, {args.curve_layers} layers, one pair, fp32):")
            report["memory_curve"] = memory_curve(args)
        if args.long:
            print(f"long sequences: {args.long_tokens} tokens per sequence, 1 pair per step, {args.steps} timed "
                  f"steps + {args.warmup} warmup, {args.threads} torch thread(s), torch {torch.__version__}")
            report["long"] = long_case(args)
        report["uptime_end"], report["loadavg_end"] = uptime("end"), loadavg()
        write_json(args.json, report)
        return

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: {unknown} not among {', '.join(VARIANTS)}")
    start_load, start_avg = uptime("start"), loadavg()
    bench = Bench(args)
    if args.profile:
        write_json(args.json, {"versions": versions(), "machine": machine(args.threads), "loadavg_start": start_avg,
                               "profile": profile(bench, names, args.profile), "loadavg_end": loadavg()})
        return
    if any(n.startswith("ours_ray") for n in names):
        init_ray(num_cpus=2)
    runs = interleave({n: getattr(bench, n) for n in names}, args.reps)
    end_load, end_avg = uptime("end"), loadavg()
    med = {n: {k: median([r[k] for r in rs]) for k in ("tok_s", "pairs_s", "tokens")} for n, rs in runs.items()}
    for n, rs in runs.items():
        med[n]["precision"] = rs[0]["precision"]
        if any(r["precision"] != rs[0]["precision"] for r in rs):
            raise SystemExit(f"{n}: precision changed between repetitions: {[r['precision'] for r in rs]}")
    report = {"versions": versions(), "machine": machine(args.threads), "loadavg_start": start_avg,
              "loadavg_end": end_avg, "uptime_start": start_load, "uptime_end": end_load, "args": vars(args),
              "model": bench.model_path, "first_step_loss": bench.first_loss,
              "run_mean_loss": bench.run_loss, "median": med, "runs": runs}
    # Like for like: each of ours against the TRL row of the same precision; TRL's default configuration apart.
    trl_by_precision = {med[n]["precision"]: n for n in ("trl_fp32", "trl_bf16") if n in med}
    ratios = {}
    for n in med:
        if n in TRL_VARIANTS:
            continue
        peer = trl_by_precision.get(med[n]["precision"])
        ratios[n] = {"same_precision_peer": peer}
        for label, ref in (("vs_same_precision", peer), ("vs_trl_default", "trl_default" if "trl_default" in med
                                                            else None)):
            if ref:
                ratios[n][label] = {"tok_s": med[n]["tok_s"] / med[ref]["tok_s"],
                                    "pairs_s": med[n]["pairs_s"] / med[ref]["pairs_s"]}
    report["ratios"] = ratios
    write_json(args.json, report)

    m = report["machine"]
    print(f"\n{bench.model_path}: {args.batch} pairs/step, {args.steps} timed steps (+{args.warmup} warmup) per run, "
          f"{args.threads} torch thread(s); medians of {args.reps} interleaved runs")
    print(f"CPU {m['cpu_model']}, bf16 flags {m['bf16_flags'] or 'none'}, torch capability {m['cpu_capability']}; "
          f"loadavg {start_avg} -> {end_avg}")
    print("first-step SimPO loss: " + ", ".join(f"{k} {v:.4f}" for k, v in bench.first_loss.items()))
    print("mean step loss over the run (every pair once, any order): "
          + ", ".join(f"{k} {v:.4f}" for k, v in bench.run_loss.items())
          + ("  [ours_ray_* read the pairs in Ray Train's seeded permutation: their first step is another batch]"
             if any(k.startswith("ours_ray") for k in bench.run_loss) else ""))
    trl_runs = [r for n in TRL_VARIANTS for r in runs.get(n, [])]
    if trl_runs:
        print(f"TRL padded batch: pad waste {median([r['pad_waste'] for r in trl_runs]):.2f} of the padded tokens")
    print(f"{'variant':17} {'precision':29} {'tok/s':>8} {'pairs/s':>8} {'vs TRL same precision':>22} "
          f"{'vs TRL default':>15}")
    for n in names:
        r = ratios.get(n, {})
        same, dflt = r.get("vs_same_precision"), r.get("vs_trl_default")
        same_s = f"{same['tok_s']:.2f} ({r['same_precision_peer']})" if same else "-"
        dflt_s = f"{dflt['tok_s']:.2f}" if dflt else "-"
        print(f"{n:17} {med[n]['precision']:29} {med[n]['tok_s']:8.2f} {med[n]['pairs_s']:8.3f} {same_s:>22} "
              f"{dflt_s:>15}")
    for n, r in ratios.items():
        if r.get("vs_same_precision"):
            x = r["vs_same_precision"]["tok_s"]
            print(f"target {n} / {r['same_precision_peer']} tokens/s >= 1.3: {x:.2f} -> {'met' if x >= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
