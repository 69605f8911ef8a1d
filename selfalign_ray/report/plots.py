"""The report's PNG plots. matplotlib's object API on the Agg canvas: no pyplot state, no display needed,
safe inside a Ray driver or a Hydra callback."""

from __future__ import annotations

from pathlib import Path

from selfalign_ray.report.collect import Run


def _figure(ncols: int = 1, width: float = 6.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def pairs_and_drops(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    ks = [it.k for it in run.iterations]
    reasons = sorted({r for it in run.iterations for r in it.manifest.get("drops", {})})
    bottom = [it.manifest.get("pairs_kept", 0) for it in run.iterations]
    ax.bar(ks, bottom, label="pairs kept", color="tab:green")
    for reason in reasons:
        counts = [it.manifest.get("drops", {}).get(reason, 0) for it in run.iterations]
        ax.bar(ks, counts, bottom=bottom, label=f"drop: {reason}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set(xlabel="iteration", ylabel="inputs", title="Pairs kept and drops by reason", xticks=ks)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def prompt_repetition(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    ks = [it.k for it in run.iterations]
    for key, label in (("exact_dup_rate", "exact duplicates"), ("near_dup_rate", "near-duplicates (within iteration)"),
                       ("repeated_from_earlier_rate", "near-duplicates of earlier iterations")):
        ys = [it.repetition.get(key) for it in run.iterations]
        pts = [(k, y) for k, y in zip(ks, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="iteration", ylabel="share of prompts", title="Prompt repetition", xticks=ks, ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)


def response_lengths(run: Run, path: Path) -> Path:
    fig, (ax,) = _figure()
    data, positions, colors, ticks = [], [], [], []
    for i, it in enumerate(run.iterations):
        for j, (values, color) in enumerate(((it.chosen_tokens, "tab:blue"), (it.rejected_tokens, "tab:orange"))):
            if values:
                data.append(values)
                positions.append(3 * i + j)
                colors.append(color)
        ticks.append(3 * i + 0.5)
    if not data:
        _empty(ax, "no pairs")
    else:
        parts = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True)
        for box, color in zip(parts["boxes"], colors):
            box.set_facecolor(color)
        ax.set_xticks(ticks, [str(it.k) for it in run.iterations])
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:blue", label="chosen"), Patch(color="tab:orange", label="rejected")],
                  fontsize=7)
    ax.set(xlabel="iteration", ylabel="response tokens", title="Response lengths: chosen vs rejected")
    return _save(fig, path)


def judge(run: Run, path: Path) -> Path:
    fig, (left, right) = _figure(2)
    ks = [it.k for it in run.iterations]
    agree = [it.manifest.get("judge_position_agreement") for it in run.iterations]
    pts = [(k, a) for k, a in zip(ks, agree) if a is not None]
    if pts:
        bars = left.bar(*zip(*pts), color="tab:purple")
        left.bar_label(bars, fmt="%.2f")  # a 0.00 bar is otherwise invisible
        left.axhline(0.5, color="grey", lw=0.8, ls="--")
    else:
        _empty(left, "no position-swapped verdicts")
    left.set(xlabel="iteration", ylabel="share of judged pairs", title="Both judge orders agree", xticks=ks,
             ylim=(0, 1.02))
    for it in run.iterations:
        if it.confidence:
            right.hist(it.confidence, bins=20, range=(0.5, 1.0), alpha=0.5, label=f"iteration {it.k}")
    if any(it.confidence for it in run.iterations):
        right.legend(fontsize=7)
    else:
        _empty(right, "no judge confidences")
    right.set(xlabel="judge confidence of kept pairs", ylabel="pairs", title="Judge confidence")
    return _save(fig, path)


def training(run: Run, path: Path) -> Path:
    fig, axes = _figure(3, width=4.2)
    keys = (("loss", "loss"), ("margin", "reward margin"), ("preference_accuracy", "preference accuracy"))
    step0 = 0
    any_history = False
    for it in run.iterations:
        if not it.history:
            continue
        any_history = True
        steps = [step0 + h["step"] for h in it.history]
        for ax, (key, _) in zip(axes, keys):
            values = [(s, h[key]) for s, h in zip(steps, it.history) if h.get(key) is not None]
            if values:
                ax.plot(*zip(*values), marker="o", ms=3, label=f"iteration {it.k}")
        step0 = steps[-1]
    for ax, (_, label) in zip(axes, keys):
        if not any_history:
            _empty(ax, "no training (train.enabled=false)")
        else:
            ax.legend(fontsize=7)
        ax.set(xlabel="optimizer step (all iterations)", title=f"SimPO {label}")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def throughput(run: Run, path: Path, rates: dict[int, dict[str, float]]) -> Path:
    """rates: {iteration: {stage: tokens/s}} (build.py collects it from manifests and train summaries)."""
    fig, (ax,) = _figure(width=7.0)
    stages = sorted({s for r in rates.values() for s in r})
    ks = sorted(rates)
    if not stages:
        _empty(ax, "no throughput recorded")
    width = 0.8 / max(1, len(stages))
    for j, stage in enumerate(stages):
        xs = [i + j * width for i in range(len(ks))]
        ax.bar(xs, [rates[k].get(stage, 0) for k in ks], width=width, label=stage)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], [str(k) for k in ks])
    ax.set(xlabel="iteration", ylabel="tokens/s (prompt + output)", title="Throughput by stage")
    if stages:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def evaluation(points: list[tuple[int, dict]], path: Path, title: str) -> Path:
    """points: [(iteration, result with win_rate / ci_low / ci_high)]."""
    fig, (ax,) = _figure()
    pts = [(k, r) for k, r in points if r.get("win_rate") is not None]
    if pts:
        ks = [k for k, _ in pts]
        ys = [r["win_rate"] for _, r in pts]
        low = [y - (r.get("ci_low") if r.get("ci_low") is not None else y) for y, (_, r) in zip(ys, pts)]
        high = [(r.get("ci_high") if r.get("ci_high") is not None else y) - y for y, (_, r) in zip(ys, pts)]
        ax.errorbar(ks, ys, yerr=[low, high], marker="o", capsize=4)
        ax.set_xticks(ks)
    else:
        _empty(ax, "no judged prompts")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="iteration", ylabel="win rate", title=title, ylim=(-0.02, 1.02))
    return _save(fig, path)
