"""Run reports and sweep summaries, built from the files a run leaves on disk.

    python -m selfalign_ray.report DIR      # (re)build DIR/report.md and DIR/report/*.png

build.py writes one run's report (collect.py reads the run, plots.py draws); sweep.py is the Hydra callback
that writes the summary of a multirun.
"""

from selfalign_ray.report.build import build_report, write_report_safely

__all__ = ["build_report", "write_report_safely"]
