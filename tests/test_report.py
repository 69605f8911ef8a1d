"""The run report (selfalign_ray/report/): built from files on disk only; plots are real PNGs; the numbers in
report.md are the manifest's. A real tiny_random run writes its report at the end (tests/test_sweep.py)."""

import logging
import subprocess
import sys

import pytest

from report_fixtures import make_run
from selfalign_ray.report import build_report, write_report_safely
from selfalign_ray.report.collect import repetition

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["pairs_and_drops", "prompt_repetition", "response_lengths", "judge", "training", "throughput",
         "eval_vs_base"]


def _assert_pngs(folder, names):
    for name in names:
        data = (folder / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name


@pytest.mark.parametrize("mode", ["sao", "synpo"])
def test_report_plots_and_manifest_numbers(tmp_path, mode):
    manifests = make_run(tmp_path / "run", mode=mode)
    path = build_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report.md"
    _assert_pngs(tmp_path / "run" / "report", PLOTS)
    md = path.read_text()
    for name in PLOTS:
        assert f"(report/{name}.png)" in md
    assert f"# selfalign-ray report: {mode}" in md and "321.5 s" in md
    for k, m in manifests.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {k} | {m['inputs']} |"))
        assert f"| {m['pairs_kept']} |" in row
        for reason, n in m["drops"].items():
            assert f"{reason}: {n}" in row
        assert f"| {m['judge_position_agreement']:.3f} |" in md                     # judge agreement
        assert f"{m['train']['summary']['after']['mean_margin']:.4f}" in md          # margin after training
        assert f"{m['train']['summary']['after']['preference_accuracy']:.3f}" in md
        assert f"| {m['eval_vs_base']['win_rate']:.3f} |" in md
        assert "| 50.0 | 300.0 | 60.0 | 123.4 |" in md                              # tokens/s by stage
    # Cut rate per stage: instruct k of 7, respond 3k of 12; k rows dropped as truncated_response.
    assert "| iteration | truncation | rows dropped as truncated | instruct | respond |" in md
    assert "| 1 | drop | 1 | 1/7 (0.143) | 3/12 (0.250) |" in md and "| 2 | drop | 2 | 2/7 (0.286) | 6/12 (0.500) |" in md
    # chosen 10, 11, 12 tokens vs rejected 5, 6, 7: means 11 and 6, chosen always longer
    assert "| 1 | 3 | 11.0 | 11.0 | 6.000 | 6.000 | 1.000 |" in md


def test_prompt_repetition_counts(tmp_path):
    make_run(tmp_path / "run")
    md = build_report(tmp_path / "run").read_text()
    # iteration 1: 4 prompts, one a near-duplicate (one word added) of another, no exact duplicate;
    # iteration 2: one exact duplicate, and one prompt that iteration 1 asked already.
    assert "| 1 | 4 | 0.250 | 0.000 | 0.250 | – |" in md
    assert "| 2 | 4 | 0.250 | 0.250 | 0.250 | 0.250 |" in md


def test_repetition_by_hand():
    r = repetition(["a b c d", "A b, c d!", "x y z w", "a b c d e"], earlier=["x y z w"])
    # exact: #2 repeats #1 (case/punctuation ignored); near: #2 (Jaccard 1) and #4 (2 of 3 trigrams shared:
    # 2/3 < 0.7, so not near); earlier: #3 is iteration k-1's prompt.
    assert r["exact_dup_rate"] == 0.25 and r["near_dup_rate"] == 0.25 and r["repeated_from_earlier_rate"] == 0.25
    assert repetition([], [])["exact_dup_rate"] is None


def test_killed_run_without_summary_and_eval(tmp_path):
    make_run(tmp_path / "run", iterations=1, with_eval=False, summary=False)
    md = build_report(tmp_path / "run").read_text()
    assert "no summary.json" in md and "Not run (eval.enabled=false" in md
    _assert_pngs(tmp_path / "run" / "report", PLOTS[:-1])


def test_a_failing_report_only_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert write_report_safely(tmp_path / "not_a_run") is None
    assert "could not write the run report" in caplog.text


def test_python_m_selfalign_ray_report(tmp_path):
    make_run(tmp_path / "run", iterations=1)
    proc = subprocess.run([sys.executable, "-m", "selfalign_ray.report", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "report.md").exists() and "report.md" in proc.stdout
