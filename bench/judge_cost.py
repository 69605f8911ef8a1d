"""Judge cost: the logprob judge vs the generative judge on the same response pairs, both orders each.

    python bench/judge_cost.py                      # SmolLM2-135M, hf engine, 32 pairs
    python bench/judge_cost.py --pairs 16 --reps 5

Pairs: the first --pairs builtin evaluation prompts (selfalign_ray/builtin/eval_prompts.jsonl), two responses
each sampled by the same model (T=0.6, top_p=0.95, seeded, natural lengths up to --response-tokens); made once,
not timed.

Both judges run through the real JudgeStage (selfalign_ray/sao/stages.py) on the same DataFrame batches
(engine batch size rows per call, as the actor pool hands them), with an in-process hf engine:
  logprob    : conf/judge/logprob.yaml  (P("1") vs P("2") after "ranking: ", one forward pass per order)
  generative : conf/judge/generative.yaml (greedy, up to 32 tokens per order, parsed as `ranking: X > Y`)
Both with min_confidence 0 and require_agreement off, so every pair keeps its verdict for the comparison.
Time per pair = stage seconds / pairs (both orders included). Variants are interleaved and medians reported.

Agreement: among pairs where both judges name a winner, how often it is the same response.
Position consistency: the share of pairs whose two orders prefer the same response (logprob: each order's
P(first) on the same side of 0.5; generative: both orders parsed and name the same response).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, loadavg, machine, median, uptime, versions, write_json  # noqa: E402


def make_pairs(engine, n: int, max_tokens: int, seed: int):
    import pandas as pd

    from selfalign_ray.engines.base import SamplingSpec, request_seed

    path = Path(__file__).resolve().parents[1] / "selfalign_ray" / "builtin" / "eval_prompts.jsonl"
    prompts = [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]
    spec = SamplingSpec(n=2, temperature=0.6, top_p=0.95, max_tokens=max_tokens)
    rows, k, bs = [], 0, engine.cfg.batch_size
    while len(rows) < n and k < len(prompts):
        batch = prompts[k:k + bs]
        results = engine.generate([[{"role": "user", "content": p}] for p in batch], spec,
                                  seeds=[request_seed(seed, "judge_bench", i) for i in range(k, k + len(batch))])
        for i, (p, res) in enumerate(zip(batch, results)):
            texts = [c.text.strip() for c in res.completions]
            if len(texts) == 2 and all(texts) and texts[0] != texts[1]:
                rows.append({"source_id": f"e{k + i}", "iteration": 1, "mode": "sao", "prompt_text": p,
                             "responses_json": json.dumps(texts),
                             "response_tokens_json": json.dumps([c.num_tokens for c in res.completions])})
        k += bs
    return pd.DataFrame(rows[:n])


def run_judge(engine, pairs, cfg, seed: int = 0):
    """JudgeStage over the pairs in engine-batch-size slices; returns (seconds, output DataFrame)."""
    import pandas as pd

    from selfalign_ray.generation.rows import with_status_columns
    from selfalign_ray.sao.stages import JudgeStage

    stage = JudgeStage(cfg, seed)
    bs = engine.cfg.batch_size
    outs, seconds = [], 0.0
    for start in range(0, len(pairs), bs):
        df = with_status_columns(pairs.iloc[start:start + bs].copy().reset_index(drop=True))
        t0 = time.perf_counter()
        df = stage(df, engine)
        seconds += time.perf_counter() - t0
        outs.append(df)
    return seconds, pd.concat(outs, ignore_index=True)


def winners(df):
    """Per pair: 0 / 1 (which response won) or None (no verdict: unparsable, orders split, tie)."""
    out = []
    for row in df.itertuples(index=False):
        if row.status != "ok":
            out.append(None)
            continue
        responses = json.loads(row.responses_json)
        out.append(responses.index(row.chosen_text))
    return out


def logprob_details(df):
    """P(first) of each order from the logprob judge's raw string `P(1)=a; swapped P(1)=b`."""
    firsts, consistent = [], 0
    for raw, agree in zip(df["raw"], df["judge_agreement"]):
        try:
            a = float(raw.split("P(1)=")[1].split(";")[0])
            b = float(raw.split("swapped P(1)=")[1])
        except (IndexError, ValueError):
            continue
        firsts += [a, b]
        consistent += agree == "yes"
    return firsts, consistent


def profile_judges(engine, pairs, judges) -> dict[str, str]:
    """One untimed pass of each judge over one engine batch of pairs under torch.profiler; prints and returns the
    top ops by self CPU time.
    What it answers: how much of a judge's time is the prompt's forward pass (shared by both judges) and how
    much the generative judge's decoding adds."""
    from torch.profiler import ProfilerActivity, profile

    # One engine batch only: the profiler keeps every op event in memory, and a 256-token generative pass over
    # 32 pairs grew this process past 24 GB (OOM-killed here).
    part = pairs.head(engine.cfg.batch_size)
    tables = {}
    for kind, cfg in judges.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_judge(engine, part, cfg)
        tables[kind] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
        print(f"\n--- torch.profiler, {kind} judge, one pass over {len(part)} pairs ---\n{tables[kind]}", flush=True)
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--response-tokens", type=int, default=48, help="max tokens per sampled response")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="override engine.torch_threads")
    ap.add_argument("--batch-size", type=int, default=None, help="override engine.batch_size")
    ap.add_argument("--generative-max-tokens", type=int, default=None,
                    help="override the generative judge's max_tokens (room for a rationale before the ranking)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one pass of each judge under torch.profiler: top ops by self CPU time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from selfalign_ray.cli import compose
    from selfalign_ray.config import typed
    from selfalign_ray.engines.factory import EngineConfig, make_engine
    from selfalign_ray.models.resolve import resolve_model_path
    from selfalign_ray.sao.judge import JudgeConfig

    start_load = uptime("start")
    base = compose([f"model={args.model}", "engine=hf"])
    engine_cfg = typed(EngineConfig, base.engine, "engine")
    if args.threads:
        engine_cfg.torch_threads = args.threads
    if args.batch_size:
        engine_cfg.batch_size = args.batch_size
    model_path = resolve_model_path(base.model.source, base.model.path, base.model.dtype)
    judges = {}
    for kind in ("logprob", "generative"):
        cfg = typed(JudgeConfig, compose([f"model={args.model}", f"judge={kind}"]).judge, "judge")
        cfg.min_confidence, cfg.require_agreement = 0.0, False
        if kind == "generative" and args.generative_max_tokens:
            cfg.max_tokens = args.generative_max_tokens
        judges[kind] = cfg
    engine = make_engine(model_path, engine_cfg)
    threads = engine_cfg.torch_threads or max(1, int(engine_cfg.num_cpus_per_actor))
    t0 = time.time()
    pairs = make_pairs(engine, args.pairs, args.response_tokens, seed=0)
    print(f"{len(pairs)} pairs sampled in {time.time() - t0:.0f} s; {model_path}, batch {engine_cfg.batch_size}, "
          f"{threads} torch threads", flush=True)

    outputs = {}

    def variant(kind):
        def fn():
            seconds, df = run_judge(engine, pairs, judges[kind])
            outputs.setdefault(kind, df)
            return {"seconds": seconds, "s_per_pair": seconds / len(pairs),
                    "judge_prompt_tokens": int(df["tok_judge_prompt"].sum()),
                    "judge_output_tokens": int(df["tok_judge_output"].sum())}
        return fn

    runs = interleave({"logprob": variant("logprob"), "generative": variant("generative")}, args.reps)
    end_load = uptime("end")

    med = {k: median([r["s_per_pair"] for r in v]) for k, v in runs.items()}
    w_lp, w_gen = winners(outputs["logprob"]), winners(outputs["generative"])
    both = [(a, b) for a, b in zip(w_lp, w_gen) if a is not None and b is not None]
    agree = sum(a == b for a, b in both)
    firsts, lp_consistent = logprob_details(outputs["logprob"])
    gen = outputs["generative"]
    gen_parsed_both = int((gen["judge_agreement"].isin(["yes", "no"])).sum())
    gen_consistent = int((gen["judge_agreement"] == "yes").sum())
    gen_reasons = gen.loc[gen["status"] != "ok", "reason"].value_counts().to_dict()
    n = len(pairs)
    report = {
        "versions": versions(), "machine": machine(threads), "loadavg_end": loadavg(), "uptime_start": start_load,
        "uptime_end": end_load, "args": vars(args), "model": model_path,
        # Both judges share one engine, so one weights dtype (engine.dtype; auto = fp32 on CPU).
        "engine_dtype": engine_cfg.dtype, "checkpoint_dtype": base.model.dtype, "threads": threads, "batch_size": engine_cfg.batch_size, "pairs": n,
        "median_s_per_pair": med, "ratio_logprob_over_generative": med["logprob"] / med["generative"],
        "logprob_verdicts": sum(w is not None for w in w_lp), "generative_verdicts": sum(w is not None for w in w_gen),
        "both_verdicts": len(both), "judges_agree": agree,
        "logprob_position_consistent": lp_consistent, "logprob_mean_p_first": sum(firsts) / max(len(firsts), 1),
        "generative_both_orders_parsed": gen_parsed_both, "generative_position_consistent": gen_consistent,
        "generative_no_verdict_reasons": gen_reasons,
        "generative_sample_raw": gen["raw"].head(3).tolist(), "runs": runs,
    }
    write_json(args.json, report)
    if args.profile:  # after the numbers are safe on disk
        report["profiles"] = profile_judges(engine, pairs, judges)
        write_json(args.json, report)

    print(f"\n{n} pairs, both orders; medians of {args.reps} interleaved runs")
    print(f"{'judge':11} {'s/pair':>8} {'prompt tok':>10} {'out tok':>8} {'verdicts':>9} {'pos-consistent':>15}")
    for kind in ("logprob", "generative"):
        r = runs[kind][0]
        verdicts = report[f"{kind}_verdicts"]
        consistent = lp_consistent if kind == "logprob" else gen_consistent
        print(f"{kind:11} {med[kind]:8.3f} {r['judge_prompt_tokens']:10d} {r['judge_output_tokens']:8d} "
              f"{verdicts:5d}/{n:<3d} {consistent:7d}/{n:<3d} ({consistent / n:.0%})")
    print(f"generative: both orders parsed {gen_parsed_both}/{n}; no verdict: {gen_reasons}")
    print(f"logprob: mean P(first position) over both orders {report['logprob_mean_p_first']:.3f}")
    print(f"judges agree on {agree}/{len(both)} pairs where both gave a verdict"
          + (f" ({agree / len(both):.0%})" if both else ""))
    ratio = report["ratio_logprob_over_generative"]
    print(f"ratio logprob/generative time per pair: {ratio:.3f} (target <= 0.1 -> {'met' if ratio <= 0.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
