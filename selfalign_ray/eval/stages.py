"""Evaluation stages, run in the same Ray Data engine pools as generation (generation/pool.py).

Unlike generation stages they never drop a row: a missing answer is an outcome (it loses), not a lost row.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from selfalign_ray.engines.base import SamplingSpec, request_seed
from selfalign_ray.eval.winrate import LOSS, TIE, WIN, outcome
from selfalign_ray.generation.rows import ensure_columns
from selfalign_ray.sao.judge import generative_verdict, logprob_verdict
from selfalign_ray.sao.templates import RANKING_ANSWER_PREFIX, ranking_prompt

JUDGE_KINDS = ("logprob", "generative")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@dataclass
class AnswerStage:
    """The pool's model answers every prompt once.

    reads: prompt_text, source_id
    adds:  <target>_text ("" if the engine could not run the prompt), <target>_tokens, <target>_error
    """

    spec: SamplingSpec
    seed: int
    target: str = "a"
    name: str = "answer_a"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        t = self.target
        ensure_columns(df, {f"{t}_text": "", f"{t}_tokens": 0, f"{t}_error": ""})
        # Seeded by prompt and side: A and B sample independently (as two systems would), and the same
        # model answers the same prompt identically in every iteration's evaluation.
        seeds = [request_seed(self.seed, "eval_answer", t, sid) for sid in df["source_id"]]
        results = engine.generate([_user(p) for p in df["prompt_text"]], self.spec, seeds=seeds)
        for idx, res in zip(df.index, results):
            if res.error:
                df.at[idx, f"{t}_error"] = res.error
                continue
            df.at[idx, f"{t}_text"] = res.completions[0].text.strip()
            df.at[idx, f"{t}_tokens"] = res.completions[0].num_tokens
        return df


@dataclass
class PairwiseJudgeStage:
    """The judge compares answer A with answer B in both orders (SAO ranking prompt, sao/judge.py).

    reads: prompt_text, a_text, b_text
    adds:  outcome (1 A wins, 0.5 tie, 0 B wins, NaN unjudged; eval/winrate.py), p_a (debiased P(A better)),
           orders_agree ("yes" / "no" / ""), verdict_raw, judge_note
    """

    kind: str = "logprob"
    seed: int = 0
    max_tokens: int = 32
    name: str = "eval_judge"

    def __post_init__(self):
        if self.kind not in JUDGE_KINDS:
            raise ValueError(f"judge kind {self.kind!r}: use one of {', '.join(JUDGE_KINDS)}")

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        ensure_columns(df, {"outcome": float("nan"), "p_a": float("nan"), "orders_agree": "", "verdict_raw": "",
                            "judge_note": ""})
        todo, chats = [], []
        for idx in df.index:
            a, b = df.at[idx, "a_text"], df.at[idx, "b_text"]
            if not a or not b:
                # Nothing to judge: a present answer beats a missing one, two missing ones tie.
                df.at[idx, "outcome"] = TIE if a == b else (WIN if a else LOSS)
                df.at[idx, "judge_note"] = "missing_answer"
                continue
            q = df.at[idx, "prompt_text"]
            todo.append(idx)
            chats += [_user(ranking_prompt(q, a, b)), _user(ranking_prompt(q, b, a))]
        if not todo:
            return df
        if self.kind == "logprob":
            scores = engine.score_choices(chats, ["1", "2"], answer_prefix=RANKING_ANSWER_PREFIX)
            errors = [s.error for s in scores]
            verdicts = [None if (scores[2 * k].error or scores[2 * k + 1].error) else
                        logprob_verdict(scores[2 * k].logprobs, scores[2 * k + 1].logprobs) for k in range(len(todo))]
        else:
            spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=self.max_tokens)
            seeds = [request_seed(self.seed, self.name, df.at[idx, "source_id"], k) for idx in todo for k in (0, 1)]
            results = engine.generate(chats, spec, seeds=seeds)
            errors = [r.error for r in results]
            texts = [r.completions[0].text if r.completions else "" for r in results]
            verdicts = [None if (errors[2 * k] or errors[2 * k + 1]) else
                        generative_verdict(texts[2 * k], texts[2 * k + 1]) for k in range(len(todo))]
        for k, idx in enumerate(todo):
            v = verdicts[k]
            if v is None:  # the judge prompt did not fit: unjudged, and said why
                df.at[idx, "judge_note"] = (errors[2 * k] or errors[2 * k + 1]).split(":")[0]
                continue
            df.at[idx, "verdict_raw"] = v.raw
            df.at[idx, "judge_note"] = v.reason or ""
            df.at[idx, "orders_agree"] = "" if v.orders_agree is None else ("yes" if v.orders_agree else "no")
            if v.p_a is not None:
                df.at[idx, "p_a"] = v.p_a
            o = outcome(v.p_a, v.orders_agree)
            if o is not None:
                df.at[idx, "outcome"] = o
        return df
