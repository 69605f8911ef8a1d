"""SAO (Self-Alignment Optimization, arXiv 2510.06652): personas -> prompts -> responses -> self-judged pairs."""
