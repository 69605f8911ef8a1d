"""SAO stages. Each is a small picklable object `stage(batch, engine) -> batch` run inside an engine
actor (see generation/pool.py); each documents the columns it reads and adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import pandas as pd

from selfalign_ray.engines.base import SamplingSpec, request_seed
from selfalign_ray.generation.rows import (
    TRUNCATION_DROP,
    check_truncation,
    count_cut,
    drop,
    dumps,
    ensure_columns,
    live,
    loads,
)
from selfalign_ray.sao.judge import JudgeConfig, Verdict, decide, generative_verdict, logprob_verdict
from selfalign_ray.sao.parsing import strip_prompt_prefix
from selfalign_ray.sao.templates import RANKING_ANSWER_PREFIX, instruction_prompt, ranking_prompt


@dataclass
class SamplingConfig:
    """Mirrors the `instruct` / `respond` nodes of conf/mode/sao.yaml."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 128

    def spec(self) -> SamplingSpec:
        return SamplingSpec(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)


def _seeds(df: pd.DataFrame, seed: int, stage: str) -> list[int]:
    # Seeded by row identity, not batch position: a regenerated chunk samples the same text.
    return [request_seed(seed, stage, int(it), sid) for it, sid in zip(df["iteration"], df["source_id"])]


def _normalise(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace()).split())


def _count_tokens(df, idx, stage, prompt_tokens, output_tokens):
    df.loc[idx, f"tok_{stage}_prompt"] = prompt_tokens
    df.loc[idx, f"tok_{stage}_output"] = output_tokens


def generate_for_live_rows(df: pd.DataFrame, engine, stage: str, chats_of, spec: SamplingSpec, seed: int):
    """Run one generation request per live row; count its tokens and its completions cut at max_tokens
    (generation/rows.py count_cut); drop rows the engine could not run (e.g. prompt_too_long). Yields
    (index, GenerationResult) for the rows that got completions."""
    count_cut(df, stage)
    rows = df[live(df)]
    if rows.empty:
        return
    results = engine.generate(chats_of(rows), spec, seeds=_seeds(rows, seed, stage))
    for idx, res in zip(rows.index, results):
        _count_tokens(df, idx, stage, res.prompt_tokens, res.output_tokens)
        count_cut(df, stage, idx, [c.finish_reason for c in res.completions])
        if res.error:
            drop(df, idx, stage, res.error.split(":")[0], res.error)
        else:
            yield idx, res


@dataclass
class InstructStage:
    """Persona -> user prompt (Persona Hub instruction template, "User prompt:" stripped).

    reads: source (persona text), source_id, iteration
    adds:  prompt_text, prompt_finish_reason, tok_instruct_prompt, tok_instruct_output, cut_instruct_*
    drops: truncated_prompt (stopped at max_tokens, with truncation=drop), empty_prompt, missing_prefix,
           echoed_template, too_short, copied_persona, prompt_too_long
    """

    sampling: SamplingConfig
    seed: int
    require_prefix: bool = False
    min_prompt_chars: int = 10
    truncation: str = TRUNCATION_DROP
    name: str = "instruct"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        check_truncation(self.truncation)
        ensure_columns(df, {"prompt_text": "", "prompt_finish_reason": "",
                            "tok_instruct_prompt": 0, "tok_instruct_output": 0})
        chats_of = lambda rows: [[{"role": "user", "content": instruction_prompt(p)}] for p in rows["source"]]  # noqa: E731
        for idx, res in generate_for_live_rows(df, engine, self.name, chats_of, self.sampling.spec(), self.seed):
            raw, finish = res.completions[0].text, res.completions[0].finish_reason
            if finish == "length" and self.truncation == TRUNCATION_DROP:
                drop(df, idx, self.name, "truncated_prompt",
                     f"the prompt stopped at mode.instruct.max_tokens={self.sampling.max_tokens}", raw=raw)
                continue
            df.at[idx, "prompt_finish_reason"] = finish
            prompt, reason = strip_prompt_prefix(raw, self.require_prefix, self.min_prompt_chars)
            if not reason and _normalise(prompt).startswith(_normalise(df.at[idx, "source"])):
                reason = "copied_persona"  # the model restated the persona instead of asking something
            if reason:
                drop(df, idx, self.name, reason, raw=raw)
            else:
                df.at[idx, "prompt_text"] = prompt
        return df


@dataclass
class RespondStage:
    """User prompt -> N sampled responses (SAO: N=2 at T=0.6, top_p 0.95).

    With truncation=drop, responses that stopped at max_tokens are left out; a row with fewer than two
    complete responses is dropped. With keep_without_eos every response stays, its finish reason recorded.

    reads: prompt_text
    adds:  responses_json (JSON list of texts), response_tokens_json, response_finish_json ("stop"/"length"),
           tok_respond_prompt, tok_respond_output, cut_respond_*
    drops: prompt_too_long, truncated_response, empty_response, identical_responses
    """

    sampling: SamplingConfig
    seed: int
    truncation: str = TRUNCATION_DROP
    name: str = "respond"

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        check_truncation(self.truncation)
        ensure_columns(df, {"responses_json": "", "response_tokens_json": "", "response_finish_json": "",
                            "tok_respond_prompt": 0, "tok_respond_output": 0})
        chats_of = lambda rows: [[{"role": "user", "content": p}] for p in rows["prompt_text"]]  # noqa: E731
        for idx, res in generate_for_live_rows(df, engine, self.name, chats_of, self.sampling.spec(), self.seed):
            done = [c for c in res.completions if c.finish_reason != "length" or self.truncation != TRUNCATION_DROP]
            texts = [c.text.strip() for c in done]
            df.at[idx, "responses_json"] = dumps(texts)
            df.at[idx, "response_tokens_json"] = dumps([c.num_tokens for c in done])
            df.at[idx, "response_finish_json"] = dumps([c.finish_reason for c in done])
            if len(done) < 2:
                drop(df, idx, self.name, "truncated_response",
                     f"{len(res.completions) - len(done)} of {len(res.completions)} responses stopped at "
                     f"mode.respond.max_tokens={self.sampling.max_tokens}",
                     raw=dumps([c.text for c in res.completions]))
            elif any(not t for t in texts):
                drop(df, idx, self.name, "empty_response", raw=dumps(texts))
            elif len(set(texts)) < 2:
                drop(df, idx, self.name, "identical_responses", raw=dumps(texts))
        return df


@dataclass
class JudgeStage:
    """The model ranks its own responses with the SAO pairwise ranking prompt, in both orders.

    With N > 2 responses every pair is judged; chosen/rejected are the responses with the highest and
    lowest mean preference, and the verdict of that pair decides whether it is kept.

    The generative judge's own output is never trained on, so mode.truncation does not apply to it: a
    verdict cut before its ranking line is unparsable_judge:no_ranking, one cut after it is complete.
    Its cut completions are still counted (cut_judge_*).

    reads: prompt_text, responses_json, response_tokens_json, response_finish_json
    adds:  chosen_text, rejected_text, chosen_tokens, rejected_tokens, chosen_finish_reason,
           rejected_finish_reason, judge_confidence (float), judge_agreement ("yes" / "no" / "" if only one
           order was judged), tok_judge_prompt, tok_judge_output, cut_judge_*
    drops: unparsable_judge:<reason>, one_order_unparsable:<reason> (require_agreement), orders_disagree, tie,
           below_confidence, prompt_too_long
    """

    cfg: JudgeConfig
    seed: int
    name: str = "judge"

    def _requests(self, prompt: str, responses: list[str]):
        pairs = list(combinations(range(len(responses)), 2))
        chats = []
        for a, b in pairs:
            chats.append([{"role": "user", "content": ranking_prompt(prompt, responses[a], responses[b])}])
            if self.cfg.both_orders:
                chats.append([{"role": "user", "content": ranking_prompt(prompt, responses[b], responses[a])}])
        return pairs, chats

    def _verdicts(self, chats, engine, seeds) -> tuple[list, int, int, list[str | None], list[list[str]]]:
        if self.cfg.kind == "logprob":
            scores = engine.score_choices(chats, ["1", "2"], answer_prefix=RANKING_ANSWER_PREFIX)
            return ([s.logprobs for s in scores], sum(s.prompt_tokens for s in scores), 0,
                    [s.error for s in scores], [[] for _ in scores])
        if self.cfg.kind == "generative":
            spec = SamplingSpec(n=1, temperature=self.cfg.temperature, top_p=1.0, max_tokens=self.cfg.max_tokens)
            results = engine.generate(chats, spec, seeds=seeds)
            return ([r.completions[0].text if r.completions else "" for r in results],
                    sum(r.prompt_tokens for r in results), sum(r.output_tokens for r in results),
                    [r.error for r in results], [[c.finish_reason for c in r.completions] for r in results])
        raise ValueError(f"judge.kind={self.cfg.kind!r} is not one of: logprob, generative")

    def _verdict(self, first, second) -> Verdict:
        if self.cfg.kind == "logprob":
            return logprob_verdict(first, second)
        return generative_verdict(first, second)

    def __call__(self, df: pd.DataFrame, engine) -> pd.DataFrame:
        ensure_columns(df, {"chosen_text": "", "rejected_text": "", "chosen_tokens": 0, "rejected_tokens": 0,
                            "chosen_finish_reason": "", "rejected_finish_reason": "",
                            "judge_confidence": float("nan"), "judge_agreement": "",
                            "tok_judge_prompt": 0, "tok_judge_output": 0})
        if self.cfg.kind == "generative":
            count_cut(df, self.name)
        rows = df[live(df)]
        if rows.empty:
            return df
        # One engine call for the whole batch: every order of every pair of every row.
        plan, all_chats, seeds = [], [], []
        for idx, it, sid in zip(rows.index, rows["iteration"], rows["source_id"]):
            pairs, chats = self._requests(df.at[idx, "prompt_text"], loads(df.at[idx, "responses_json"]))
            plan.append((idx, pairs, len(all_chats), len(chats)))
            seeds += [request_seed(self.seed, self.name, int(it), sid, k) for k in range(len(chats))]
            all_chats += chats
        outputs, prompt_tokens, output_tokens, errors, finishes = self._verdicts(all_chats, engine, seeds)
        per_request_prompt = prompt_tokens / max(1, len(all_chats))
        per_request_output = output_tokens / max(1, len(all_chats))
        step = 2 if self.cfg.both_orders else 1
        for idx, pairs, start, count in plan:
            _count_tokens(df, idx, self.name, round(per_request_prompt * count), round(per_request_output * count))
            if self.cfg.kind == "generative":
                count_cut(df, self.name, idx, [f for fs in finishes[start:start + count] for f in fs])
            errs = [e for e in errors[start:start + count] if e]
            if errs:
                drop(df, idx, self.name, errs[0].split(":")[0], errs[0])
                continue
            responses = loads(df.at[idx, "responses_json"])
            lengths = loads(df.at[idx, "response_tokens_json"])
            # Rows from before finish reasons were recorded (none in a fresh run) count as complete.
            finish = loads(df.at[idx, "response_finish_json"]) if "response_finish_json" in df else []
            finish = finish or ["stop"] * len(responses)
            verdicts = {}
            for k, pair in enumerate(pairs):
                first = outputs[start + k * step]
                second = outputs[start + k * step + 1] if self.cfg.both_orders else None
                verdicts[pair] = self._verdict(first, second)
            best, worst = _extremes(len(responses), verdicts)
            v = verdicts[(min(best, worst), max(best, worst))]
            # Recorded for dropped rows too: the manifest's position agreement covers every judged pair.
            df.at[idx, "judge_agreement"] = "" if v.orders_agree is None else ("yes" if v.orders_agree else "no")
            if v.confidence is not None:
                df.at[idx, "judge_confidence"] = v.confidence
            a_wins, reason = decide(v, self.cfg)
            if reason:
                drop(df, idx, self.name, reason, raw=v.raw)
                continue
            a, b = min(best, worst), max(best, worst)
            win, lose = (a, b) if a_wins else (b, a)
            df.at[idx, "chosen_text"], df.at[idx, "rejected_text"] = responses[win], responses[lose]
            df.at[idx, "chosen_tokens"], df.at[idx, "rejected_tokens"] = lengths[win], lengths[lose]
            df.at[idx, "chosen_finish_reason"], df.at[idx, "rejected_finish_reason"] = finish[win], finish[lose]
            df.at[idx, "raw"] = v.raw
        return df


def _extremes(n: int, verdicts: dict[tuple[int, int], Verdict]) -> tuple[int, int]:
    """Indices of the responses with the highest and lowest mean preference over their pairs."""
    if n == 2:
        return 0, 1
    score = [0.0] * n
    for (a, b), v in verdicts.items():
        p = 0.5 if v.p_a is None else v.p_a
        score[a] += p
        score[b] += 1 - p
    best = max(range(n), key=lambda i: score[i])
    worst = min((i for i in range(n) if i != best), key=lambda i: score[i])
    return best, worst
