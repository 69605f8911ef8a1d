"""DIR/report.md and DIR/report/*.png for one run (SAO or SynPO: same shard and manifest schema)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from selfalign_ray.data import storage
from selfalign_ray.report import plots
from selfalign_ray.report.collect import NEAR_DUP_JACCARD, Run, load_run

log = logging.getLogger(__name__)


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 10 and digits == 3 else f"{x:.{digits}f}"
    return str(x)


def _mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _median(xs) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return float(s[len(s) // 2]) if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows] + [""]


def throughput_rates(run: Run) -> dict[int, dict[str, float]]:
    """{iteration: {stage: tokens/s}}: generation stages (manifest) and training (train summaries)."""
    rates = {}
    for it in run.iterations:
        r = dict((it.manifest.get("generation") or {}).get("tokens_per_s_by_stage") or {})
        if it.train and it.train.get("mean_tokens_per_s"):
            r["train (SimPO)"] = it.train["mean_tokens_per_s"]
        improver = (it.manifest.get("improver") or {}).get("summary") or {}
        if improver.get("mean_tokens_per_s"):
            r["train (improver SFT)"] = improver["mean_tokens_per_s"]
        rates[it.k] = r
    return rates


def cut_section(run: Run) -> list[str]:
    """Per iteration and generation stage: completions that stopped at max_tokens (manifest `cut`), and what
    mode.truncation did with them (drop: the truncated_* rejects; keep_without_eos: kept, marked in shards)."""
    stages = sorted({stage for it in run.iterations for stage in (it.manifest.get("cut") or {})})
    md = ["## Cut at max_tokens, per stage", "",
          "Completions that stopped at their token limit (finish_reason `length`) over all completions of the "
          "stage. `truncation`: drop sends such rows to rejects/ (`truncated_*` reasons); keep_without_eos keeps "
          "them, marked in the shard, and trains them without the end-of-turn token.", ""]
    if not stages:
        return md + ["No cut counts in the manifests (written before they were recorded).", ""]
    rows = []
    for it in run.iterations:
        cut = it.manifest.get("cut") or {}
        cells = []
        for stage in stages:
            c = cut.get(stage)
            cells.append(f"{c['length']}/{c['completions']} ({_f(c.get('rate'))})" if c and c["completions"] else "–")
        dropped = sum(n for r, n in (it.manifest.get("drops") or {}).items() if r.startswith("truncated_"))
        rows.append([it.k, it.manifest.get("truncation", "–"), dropped] + cells)
    return md + _table(["iteration", "truncation", "rows dropped as truncated"] + stages, rows)


# Model weights are not read by the report: left out of the local mirror of a run on object storage.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _build_remote(out: str) -> str:
    """A run on object storage: its files (weights left out) mirrored under the local storage cache, the report
    built there and report.md + report/ uploaded next to the run's files."""
    mirror = storage.staging_dir(out, "report")
    shutil.rmtree(mirror, ignore_errors=True)
    storage.download_dir(out, mirror, skip_suffixes=_WEIGHT_SUFFIXES)
    path = build_report(mirror)
    storage.upload_dir(mirror / "report", storage.join(out, "report"))
    storage.write_bytes(storage.join(out, "report.md"), path.read_bytes())
    return storage.join(out, "report.md")


def build_report(out: str | Path) -> Path:
    """Write DIR/report.md and DIR/report/*.png from DIR's files; return the path of report.md."""
    if storage.is_uri(out):
        return _build_remote(str(out))
    run = load_run(out)
    figs = run.dir / "report"
    figs.mkdir(exist_ok=True)
    its = run.iterations
    s = run.summary
    md = [f"# selfalign-ray report: {run.mode}", "",
          f"- output dir: `{run.dir}`",
          f"- base model: `{s.get('base_model') or its[0].manifest.get('model', '?')}`",
          f"- iterations: {len(its)}" + ("" if s else " (no summary.json: the run did not finish)"),
          f"- wall time: {_f(s.get('wall_s'), 1)} s" if s.get("wall_s") is not None else "- wall time: –",
          f"- report built {time.strftime('%Y-%m-%d %H:%M:%S')} from the files on disk "
          f"(`python -m selfalign_ray.report {run.dir}` rebuilds it)", ""]

    md += ["## Pairs kept and drops by reason", ""]
    rows = []
    for it in its:
        m = it.manifest
        drops = ", ".join(f"{r}: {n}" for r, n in sorted(m.get("drops", {}).items(), key=lambda kv: -kv[1])) or "none"
        row = [it.k, m.get("inputs"), m.get("prompts_kept"), m.get("pairs_kept"), m.get("yield"), drops]
        if run.mode == "synpo":
            row += [(m.get("added") or {}).get("rows"), m.get("cumulative_pairs")]
        rows.append(row)
    header = ["iteration", "inputs", "prompts kept", "pairs kept", "yield", "drops (reason: count)"]
    if run.mode == "synpo":
        header += ["pairs added", "cumulative pairs"]
    md += _table(header, rows)
    md += [f"![pairs and drops]({plots.pairs_and_drops(run, figs / 'pairs_and_drops.png').relative_to(run.dir)})", ""]

    md += cut_section(run)

    md += ["## Prompt repetition", "",
           f"Exact: same text after lower-casing and dropping punctuation. Near: word-trigram Jaccard ≥ "
           f"{NEAR_DUP_JACCARD} (exact included). Manifest rate: exact duplicates dropped by the pipeline.", ""]
    md += _table(["iteration", "prompts", "manifest rate", "exact duplicates", "near-duplicates",
                  "near-duplicates of earlier iterations"],
                 [[it.k, it.repetition["prompts"], it.manifest.get("prompt_repetition_rate"),
                   it.repetition["exact_dup_rate"],
                   _f(it.repetition["near_dup_rate"]) + (" (sampled)" if it.repetition["sampled"] else ""),
                   it.repetition["repeated_from_earlier_rate"]] for it in its])
    md += [f"![prompt repetition]({plots.prompt_repetition(run, figs / 'prompt_repetition.png').relative_to(run.dir)})", ""]

    md += ["## Response lengths (tokens), chosen vs rejected", "",
           "SimPO normalises by length, yet a judge that prefers longer answers still teaches length; "
           "the last column shows how often the chosen response is the longer one.", ""]
    rows = []
    for it in its:
        longer = [c > r for c, r in zip(it.chosen_tokens, it.rejected_tokens)]
        rows.append([it.k, len(it.chosen_tokens), _mean(it.chosen_tokens), _median(it.chosen_tokens),
                     _mean(it.rejected_tokens), _median(it.rejected_tokens), _mean(longer)])
    md += _table(["iteration", "pairs", "chosen mean", "chosen median", "rejected mean", "rejected median",
                  "chosen longer"], rows)
    md += [f"![response lengths]({plots.response_lengths(run, figs / 'response_lengths.png').relative_to(run.dir)})", ""]

    md += ["## Judge", "",
           "Every pair is judged in both presentation orders; agreement is the share of judged pairs whose two "
           "orders prefer the same response: a judge that always picks the first position gets 0, a coin flip about "
           "0.5.", ""]
    md += _table(["iteration", "judge", "judged pairs", "both orders agree", "mean confidence (kept pairs)"],
                 [[it.k, it.manifest.get("judge") or ("logprob score gap" if run.mode == "synpo" else None),
                   it.manifest.get("judged_pairs"), it.manifest.get("judge_position_agreement"),
                   _mean(it.confidence)] for it in its])
    md += [f"![judge]({plots.judge(run, figs / 'judge.png').relative_to(run.dir)})", ""]

    md += ["## Training", ""]
    rows = []
    for it in its:
        t = it.train or {}
        if not t:
            continue
        before, after = t.get("before") or {}, t.get("after") or {}
        losses = [h["loss"] for h in it.history if h.get("loss") is not None]
        rows.append([it.k, t.get("rows"), t.get("steps"), losses[0] if losses else None,
                     losses[-1] if losses else None,
                     f"{_f(before.get('preference_accuracy'))} → {_f(after.get('preference_accuracy'))}",
                     f"{_f(before.get('mean_margin'), 4)} → {_f(after.get('mean_margin'), 4)}",
                     t.get("mean_tokens_per_s"), t.get("wall_s")])
    if rows:
        md += ["Accuracy and margin: the model on its own training pairs before → after the iteration's training.", ""]
        md += _table(["iteration", "pairs", "steps", "first loss", "last loss", "preference accuracy",
                      "mean margin", "tokens/s", "wall s"], rows)
    else:
        md += ["No training recorded (train.enabled=false).", ""]
    for name, t in run.extra_train.items():
        md += [f"- {name}: {t.get('steps')} steps on {t.get('rows')} examples, "
               f"{_f(t.get('mean_tokens_per_s'), 1)} tokens/s, {_f(t.get('wall_s'), 1)} s", ""]
    md += [f"![training]({plots.training(run, figs / 'training.png').relative_to(run.dir)})", ""]

    rates = throughput_rates(run)
    stages = sorted({st for r in rates.values() for st in r})
    md += ["## Throughput (tokens/s, prompt + output)", "",
           "Generation stages: tokens of the stage over the wall time of the iteration's generation (stages run "
           "concurrently in the pipeline); training: the mean over optimizer steps.", ""]
    rows = []
    for it in its:
        gen = it.manifest.get("generation") or {}
        rows.append([it.k, gen.get("pairs_per_min"), gen.get("output_tokens_per_s")] +
                    [rates[it.k].get(st) for st in stages])
    md += _table(["iteration", "pairs/min", "generation output tokens/s"] + stages, rows)
    md += [f"![throughput]({plots.throughput(run, figs / 'throughput.png', rates).relative_to(run.dir)})", ""]

    vs_base = [(it.k, it.manifest["eval_vs_base"]) for it in its if it.manifest.get("eval_vs_base")]
    md += ["## Evaluation against the base model", ""]
    if vs_base:
        r0 = vs_base[0][1]
        md += [f"{r0.get('prompts')} prompts ({r0.get('dataset')}), judge `{r0.get('judge')}` ({r0.get('judge_kind')}), "
               "both orders: a win needs both orders, a split is a tie (counted half); "
               f"{r0.get('level', 0.95):.0%} {r0.get('ci_method')} interval.", ""]
        md += _table(["iteration", "win rate", "CI low", "CI high", "wins", "ties", "losses", "unjudged",
                      "mean P(new better)", "orders agree"],
                     [[k, r.get("win_rate"), r.get("ci_low"), r.get("ci_high"), r.get("wins"), r.get("ties"),
                       r.get("losses"), r.get("unjudged"), r.get("mean_p_a"), r.get("orders_agree")]
                      for k, r in vs_base])
        md += [f"![evaluation]({plots.evaluation(vs_base, figs / 'eval_vs_base.png', 'Win rate vs base model').relative_to(run.dir)})", ""]
    else:
        md += ["Not run (eval.enabled=false, or no trained model).", ""]
    heldout = [(it.k, it.manifest["eval"]) for it in its if isinstance(it.manifest.get("eval"), dict)]
    if heldout:
        md += ["## SynPO held-out evaluation (answers vs gold answers)", ""]
        base = s.get("eval_base")
        rows = ([["base", base.get("win_rate"), base.get("mean_preference"), base.get("judged")]] if base else []) + \
               [[k, e.get("win_rate"), e.get("mean_preference"), e.get("judged")] for k, e in heldout]
        md += _table(["model", "win rate vs gold", "mean preference", "judged"], rows)
        md += [f"![held-out]({plots.evaluation(heldout, figs / 'heldout_eval.png', 'Held-out win rate vs gold').relative_to(run.dir)})", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def write_report_safely(out: str | Path) -> Path | None:
    """build_report, for the end of a run: a report that cannot be built never fails the run."""
    try:
        path = build_report(out)
        log.info("report: %s", path)
        return path
    except Exception as err:  # noqa: BLE001
        log.warning("could not write the run report for %s (%s: %s); rebuild it with "
                    "`python -m selfalign_ray.report %s`", out, type(err).__name__, err, out, exc_info=True)
        return None
