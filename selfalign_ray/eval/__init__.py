"""Evaluation: answers in AlpacaEval's model_outputs format and a position-swapped pairwise win rate.

    selfalign-ray-eval model_a=DIR/iter_1/model model_b=smollm2_135m     (conf/eval.yaml)

data.py: prompts in, AlpacaEval outputs out; stages.py: answer and pairwise-judge stages for the Ray Data
engine pools; winrate.py: outcomes, win rate, Wilson / bootstrap intervals; run.py: one evaluation, and the
loop's optional evaluation against the base model (eval.enabled); cli.py: the console script.
"""
