"""SynPO stages. Each is a small picklable object `stage(batch, engine) -> batch` run inside an engine actor
(see generation/pool.py and synpo/chain.py); each documents the columns it reads, adds and the reasons it
drops rows for. Stages never remove rows (generation/rows.py).

One iteration's chain (pools of different models, in this order):
    generator G       QuestionStage                keyword list -> prompt_text
    policy π_{t-1}    AnswerStage("policy")        prompt -> policy_text (also rejected_text when π_{t-1} = π_0)
    improver R_t      ImproveStage                 (prompt, policy_text) -> chosen_text
    initial π_0       AnswerStage("rejected")      prompt -> rejected_text (iterations > 1)
    (no engine)       PairFilterStage              identical / repetitive pairs
    judge (π_0)       PreferenceStage              optional score-gap filter
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pandas as pd

from selfalign_ray.generation.rows import TRUNCATION_DROP, check_truncation, drop, ensure_columns, live
from selfalign_ray.sao.judge import logprob_verdict
from selfalign_ray.sao.stages import SamplingConfig, generate_for_live_rows
from selfalign_ray.sao.templates import RANKING_ANSWER_PREFIX, ranking_prompt
from selfalign_ray.synpo.filters import repetition_rate
from selfalign_ray.synpo.parsing import parse_question
from selfalign_ray.synpo.templates import (
    QUESTION_CLOSE,
    generator_prompt,
    improver_prompt,
)


# What ends a question in the generator's output (synpo/parsing.py): </question>, or a <solution> tag.
_QUESTION_END = re.compile(r"<\s*/\s*question\s*>|<\s*/?\s*solution\s*>", re.IGNORECASE)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class QuestionStage:
    """Keyword list -> synthetic prompt: the self-prompt generator fills the paper's template (Figure 3) and
    the text inside <question>…</question> becomes the prompt (its <solution> is not used).

    With `stop_at_question_end` generation stops at "</question>", so no tokens are spent on the solution.

    A question is cut when generation stopped at max_tokens before the question ended (no </question> or
    <solution> after it; a cut inside the solution leaves the question whole). truncation=drop drops it as
    truncated_question; keep_without_eos keeps the text after <question> as the prompt, marked "length".

    reads: source (the keyword list, "kw1, kw2, kw3"), source_id, iteration
    adds:  prompt_text, prompt_finish_reason, tok_question_prompt, tok_question_output, cut_question_*
    drops: truncated_question, no_question_tag, unterminated_question (the model ended without closing the
           question), empty_question, echoed_template, too_short, prompt_too_long
    """

    sampling: SamplingConfig
    seed: int
    stop_at_question_end: bool = True
    require_tags: bool = True
    min_prompt_chars: int = 10
    truncation: str = TRUNCATION_DROP
    name: str = "question"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        check_truncation(self.truncation)
        ensure_columns(df, {"prompt_text": "", "prompt_finish_reason": "",
                            "tok_question_prompt": 0, "tok_question_output": 0})
        spec = self.sampling.spec()
        if self.stop_at_question_end:
            spec = dataclasses.replace(spec, stop=(QUESTION_CLOSE,))
        chats_of = lambda rows: [_user(generator_prompt(k)) for k in rows["source"]]
        for idx, res in generate_for_live_rows(df, engine, self.name, chats_of, spec, self.seed):
            c = res.completions[0]
            # Cut: stopped at max_tokens with the question still open (nothing closes it).
            cut = c.finish_reason == "length" and not _QUESTION_END.search(c.text)
            if cut and self.truncation == TRUNCATION_DROP:
                drop(df, idx, self.name, "truncated_question",
                     f"the question stopped at max_tokens={self.sampling.max_tokens}", raw=c.text)
                continue
            # Engines cut the stop string from the text: "stop" then means </question> was reached (or EOS
            # came first, which leaves a complete, if untidy, question as well). A kept cut question is
            # taken up to where it was cut.
            stopped = (self.stop_at_question_end and c.finish_reason == "stop") or cut
            question, reason = parse_question(c.text, stopped, self.require_tags, self.min_prompt_chars)
            if reason:
                drop(df, idx, self.name, reason, raw=c.text)
            else:
                df.at[idx, "prompt_text"] = question
                df.at[idx, "prompt_finish_reason"] = "length" if cut else "stop"
        return df


@dataclass
class AnswerStage:
    """The pool's model answers each prompt once (paper: T = 0.7); the answer is written to every target.

    Targets: "policy" (π_{t-1}, the text the improver rewrites), "rejected" (π_0), both when π_{t-1} is π_0
    (iteration 1: one generation serves as both), "answer" (evaluation).

    An answer cut at max_tokens is dropped as `cut_reason` with truncation=drop, kept and marked "length"
    with keep_without_eos (evaluation keeps every answer: it is scored, never trained on).

    reads: prompt_text, source_id, iteration
    adds:  <target>_text, <target>_tokens, <target>_finish_reason for each target, tok_<name>_prompt,
           tok_<name>_output, cut_<name>_*
    drops: <cut_reason> (truncated_response), empty_response, prompt_too_long
    """

    sampling: SamplingConfig
    seed: int
    targets: tuple[str, ...]
    name: str = "respond"
    truncation: str = TRUNCATION_DROP
    cut_reason: str = "truncated_response"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        check_truncation(self.truncation)
        defaults = {f"tok_{self.name}_prompt": 0, f"tok_{self.name}_output": 0}
        for t in self.targets:
            defaults.update({f"{t}_text": "", f"{t}_tokens": 0, f"{t}_finish_reason": ""})
        ensure_columns(df, defaults)
        chats_of = lambda rows: [_user(p) for p in rows["prompt_text"]]
        for idx, res in generate_for_live_rows(df, engine, self.name, chats_of, self.sampling.spec(), self.seed):
            c = res.completions[0]
            text = c.text.strip()
            if c.finish_reason == "length" and self.truncation == TRUNCATION_DROP:
                drop(df, idx, self.name, self.cut_reason,
                     f"the answer stopped at max_tokens={self.sampling.max_tokens}", raw=c.text)
                continue
            if not text:
                drop(df, idx, self.name, "empty_response", raw=c.text)
                continue
            for t in self.targets:
                df.at[idx, f"{t}_text"] = text
                df.at[idx, f"{t}_tokens"] = c.num_tokens
                df.at[idx, f"{t}_finish_reason"] = c.finish_reason
        return df


_REWRITTEN_PREFIX = "rewritten answer:"


@dataclass
class ImproveStage:
    """The response improver R_t rewrites π_{t-1}'s answer (paper template, Figure 7); the rewrite is chosen.

    reads: prompt_text, policy_text
    adds:  chosen_text, chosen_tokens, chosen_finish_reason, tok_improve_prompt, tok_improve_output, cut_improve_*
    drops: truncated_refinement (cut at max_tokens, with truncation=drop), empty_refinement,
           unchanged_refinement (the rewrite equals the answer: no preference to learn), prompt_too_long
    """

    sampling: SamplingConfig
    seed: int
    truncation: str = TRUNCATION_DROP
    name: str = "improve"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        check_truncation(self.truncation)
        ensure_columns(df, {"chosen_text": "", "chosen_tokens": 0, "chosen_finish_reason": "",
                            "tok_improve_prompt": 0, "tok_improve_output": 0})
        chats_of = lambda rows: [_user(improver_prompt(q, a)) for q, a in zip(rows["prompt_text"], rows["policy_text"])]
        for idx, res in generate_for_live_rows(df, engine, self.name, chats_of, self.sampling.spec(), self.seed):
            c = res.completions[0]
            if c.finish_reason == "length" and self.truncation == TRUNCATION_DROP:
                drop(df, idx, self.name, "truncated_refinement",
                     f"the rewrite stopped at max_tokens={self.sampling.max_tokens}", raw=c.text)
                continue
            text = c.text.strip()
            # The template ends in "Rewritten Answer:"; a model that repeats the label has not started yet.
            if text.lower().startswith(_REWRITTEN_PREFIX):
                text = text[len(_REWRITTEN_PREFIX):].strip()
            if not text:
                drop(df, idx, self.name, "empty_refinement", raw=c.text)
            elif " ".join(text.split()) == " ".join(df.at[idx, "policy_text"].split()):
                drop(df, idx, self.name, "unchanged_refinement", raw=c.text)
            else:
                df.at[idx, "chosen_text"] = text
                df.at[idx, "chosen_tokens"] = c.num_tokens
                df.at[idx, "chosen_finish_reason"] = c.finish_reason
        return df


@dataclass
class PairFilterStage:
    """Engine-free checks of a (chosen, rejected) pair: identical texts carry no preference, and texts with
    more than `max_repetition` repeated word n-grams are dropped (paper App. C.3; see synpo/filters.py).

    reads: chosen_text, rejected_text
    adds:  chosen_repetition, rejected_repetition (float, 0..1)
    drops: identical_responses, repetitive_chosen, repetitive_rejected
    """

    max_repetition: float = 0.5
    ngram: int = 3
    name: str = "pair_filter"
    needs_engine = False

    def __call__(self, df: pd.DataFrame, engine=None) -> pd.DataFrame:
        ensure_columns(df, {"chosen_repetition": float("nan"), "rejected_repetition": float("nan")})
        for idx in df.index[live(df)]:
            chosen, rejected = df.at[idx, "chosen_text"], df.at[idx, "rejected_text"]
            rc, rr = repetition_rate(chosen, self.ngram), repetition_rate(rejected, self.ngram)
            df.at[idx, "chosen_repetition"], df.at[idx, "rejected_repetition"] = rc, rr
            if " ".join(chosen.split()) == " ".join(rejected.split()):
                drop(df, idx, self.name, "identical_responses")
            elif rc > self.max_repetition:
                drop(df, idx, self.name, "repetitive_chosen", f"{rc:.2f} of the {self.ngram}-grams repeat", raw=chosen)
            elif rr > self.max_repetition:
                drop(df, idx, self.name, "repetitive_rejected", f"{rr:.2f} of the {self.ngram}-grams repeat", raw=rejected)
        return df


@dataclass
class PreferenceStage:
    """The logprob judge (SAO ranking prompt, P("1") vs P("2") after "ranking: ", both orders averaged to
    cancel position bias; sao/judge.py) scores `first` against `second` for the same prompt.

    As SynPO's score-gap filter (paper Sec. 2.2: keep pairs with a large score gap) it compares chosen with
    rejected and drops pairs whose gap P(first) - P(second) = 2 P(first) - 1 is below `min_gap`; with
    `min_gap=None` it only measures (evaluation, improver-data statistics).

    reads: prompt_text, <first>_text, <second>_text
    adds:  judge_confidence (P(first better), float), score_gap (2 P - 1), judge_agreement ("yes" / "no":
           whether both orders prefer the same side), tok_<name>_prompt, tok_<name>_output
    drops: below_score_gap (only with min_gap set), prompt_too_long
    """

    min_gap: float | None = None
    first: str = "chosen"
    second: str = "rejected"
    name: str = "judge"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        ensure_columns(df, {"judge_confidence": float("nan"), "score_gap": float("nan"), "judge_agreement": "",
                            f"tok_{self.name}_prompt": 0, f"tok_{self.name}_output": 0})
        rows = df[live(df)]
        if rows.empty:
            return df
        chats = []
        for idx in rows.index:
            prompt, a, b = df.at[idx, "prompt_text"], df.at[idx, f"{self.first}_text"], df.at[idx, f"{self.second}_text"]
            chats += [_user(ranking_prompt(prompt, a, b)), _user(ranking_prompt(prompt, b, a))]
        scores = engine.score_choices(chats, ["1", "2"], answer_prefix=RANKING_ANSWER_PREFIX)
        for k, idx in enumerate(rows.index):
            ab, ba = scores[2 * k], scores[2 * k + 1]
            df.at[idx, f"tok_{self.name}_prompt"] = ab.prompt_tokens + ba.prompt_tokens
            error = ab.error or ba.error
            if error:
                drop(df, idx, self.name, error.split(":")[0], error)
                continue
            v = logprob_verdict(ab.logprobs, ba.logprobs)
            if v.reason:  # NaN / missing log-probs: counted, never kept with a NaN score
                drop(df, idx, self.name, v.reason, raw=v.raw)
                continue
            gap = 2 * v.p_a - 1
            df.at[idx, "judge_confidence"], df.at[idx, "score_gap"] = v.p_a, gap
            df.at[idx, "judge_agreement"] = "yes" if v.orders_agree else "no"
            df.at[idx, "raw"] = v.raw
            if self.min_gap is not None and gap < self.min_gap:
                drop(df, idx, self.name, "below_score_gap", f"score gap {gap:.4f} < {self.min_gap}", raw=v.raw)
        return df
