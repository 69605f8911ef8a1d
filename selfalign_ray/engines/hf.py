"""The `hf` engine: transformers `generate` and forward passes, on CPU (here, CI) or GPU.

Sampling is seeded per request, not per batch: a logits processor draws each row's next token with
that row's own `torch.Generator` and hands `generate` a one-hot distribution, so a row's completion
does not depend on which other rows share its batch. That is what lets a resumed run regenerate a
lost shard and get the same prompts back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfalign_ray.engines.base import (
    Chat,
    ChoiceScores,
    Completion,
    GenerationResult,
    SamplingSpec,
    request_seed,
)
from selfalign_ray.engines.config import EngineConfig
from selfalign_ray.engines.templating import (
    encode,
    plan_choice_scoring,
    render_prompt,
    too_long_error,
)
from selfalign_ray.models.attention import resolve_attention
from selfalign_ray.models.loading import load_causal_lm, load_tokenizer


class _PerRowSampler:
    """LogitsProcessor: temperature + top-p, then one draw per row from that row's own random stream.

    Each row gets its uniforms up front from its own seeded generator (one per decoding step), and the
    draw at step t is inverse-CDF sampling with the row's t-th uniform. A row's tokens therefore depend
    only on its seed, never on its batch mates, and the whole batch is sampled in a few vectorised
    kernels: no per-row multinomial call and no device-to-host copy per token (which made GPU decoding
    wait on the host once per row and step).
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float,
                 prompt_width: int, max_new: int, device: torch.device):
        self.temperature = temperature
        self.top_p = top_p
        self.prompt_width = prompt_width
        self.uniforms = torch.stack([torch.rand(max_new, generator=g, dtype=torch.float64) for g in generators]
                                    ).to(device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature == 0:
            chosen = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores / self.temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            if self.top_p < 1.0:
                # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
                outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
                sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            cdf = sorted_probs.double().cumsum(dim=-1)
            step = input_ids.shape[1] - self.prompt_width
            target = self.uniforms[:, step:step + 1] * cdf[:, -1:]
            # The first sorted token whose cumulative mass exceeds u * total mass.
            rank = (cdf <= target).sum(dim=-1).clamp(max=cdf.shape[-1] - 1)
            chosen = order.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


class _StopOnGeneratedText:
    """StoppingCriteria: a row is done once its *generated* text contains a stop string.

    transformers' own `stop_strings` also matches across the prompt/completion boundary (a prompt
    ending in a newline plus a generated newline "contains" a "\\n\\n" stop), which vLLM does not do.
    """

    def __init__(self, tokenizer, prompt_width: int, stops: tuple[str, ...]):
        self.tokenizer, self.prompt_width, self.stops = tokenizer, prompt_width, stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


class HFEngine:
    def __init__(self, model_path: str, cfg: EngineConfig):
        self.model_path = model_path
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor))
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in actors; use the CPUs this actor was budgeted.
            torch.set_num_threads(int(threads))
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        # Safetensors only, remote code only on model.trust_remote_code, the pinned revision (models/loading.py).
        load = cfg.load
        # A hub token given as engine.extra.hf_token reaches the hub calls (vLLM takes the same key itself); the
        # HF_TOKEN environment variable is the better place for it (README "Secrets"). Never written to a file.
        auth = {"token": cfg.extra["hf_token"]} if (cfg.extra or {}).get("hf_token") else {}
        self.tokenizer = load_tokenizer(model_path, load, **auth)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Soft-capped models (Gemma-2) never run SDPA; auto = flash-attention 2 on GPU when installed
        # (selfalign_ray/models/attention.py). `engine.extra.attn_implementation` overrides; the choice is
        # reported with every batch (generation/pool.py) and lands in the manifest.
        self.attention = resolve_attention(model_path, (cfg.extra or {}).get("attn_implementation", "auto"),
                                           use_gpu=self.device.type == "cuda",
                                           where="engine.extra.attn_implementation",
                                           config_kwargs={**load.tokenizer_kwargs(model_path), **auth})
        self.model = load_causal_lm(model_path, load, **auth, dtype=getattr(torch, dtype),
                                    attn_implementation=self.attention.implementation)
        self.model.to(self.device).eval()
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # ----------------------------------------------------------------- helpers
    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions, shape (batch, keep, vocab).

        Only those rows go through the LM head (`logits_to_keep`): a judge reads 1 position of a
        ~500-token prompt, and the full (batch, width, vocab) logits cost a vocab-sized matmul per
        token plus gigabytes of memory traffic — with SmolLM2 most of the logprob judge's time."""
        # Left padding: positions must count real tokens only, or padded rows see shifted RoPE
        # positions and their log-probs differ from the same prompt scored alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
        # The slice is a no-op for models that honour logits_to_keep; one that takes it through **kwargs and
        # ignores it returns every position, and the slice keeps the indexing right for it too.
        return out.logits[:, -keep:, :].float()

    # --------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, chats: Sequence[Chat], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[GenerationResult]:
        """New tokens per row: min(spec.max_tokens, engine.max_model_len - prompt tokens), like vLLM; a
        completion that stops at that cap reports finish_reason "length". Rows are generated in groups of
        equal cap (almost always one group: every prompt leaves room for max_tokens), so no row is decoded
        past the context window."""
        prompts = [encode(self.tokenizer, render_prompt(self.tokenizer, c)) for c in chats]
        results = [GenerationResult(prompt_tokens=len(p)) for p in prompts]
        by_cap: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            err = too_long_error(len(p), self.cfg.max_model_len, reserve=1)
            if err:
                results[i].error = err
                continue
            by_cap.setdefault(min(spec.max_tokens, self.cfg.max_model_len - len(p)), []).append(i)
        for max_new, owners in sorted(by_cap.items(), reverse=True):
            rows, generators, row_owners = [], [], []
            for i in owners:
                base = seeds[i] if seeds is not None else (spec.seed if spec.seed is not None else 0)
                for j in range(spec.n):
                    rows.append(prompts[i])
                    generators.append(torch.Generator().manual_seed(request_seed(base, j)))
                    row_owners.append(i)
            for owner, toks in zip(row_owners, self._generate_rows(rows, generators, spec, max_new)):
                results[owner].completions.append(self._completion(toks, spec, max_new))
        return results

    def _generate_rows(self, rows: list[list[int]], generators: list[torch.Generator], spec: SamplingSpec,
                       max_new: int) -> list[list[int]]:
        """The new token ids of each row (one `generate` call, at most `max_new` tokens each)."""
        from transformers import LogitsProcessorList

        ids, mask = self._left_pad(rows)
        kwargs = dict(
            max_new_tokens=max_new,
            do_sample=False,  # sampling happens in _PerRowSampler; greedy then picks its token
            temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList([_PerRowSampler(generators, spec.temperature, spec.top_p,
                                                                  ids.shape[1], max_new, self.device)]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
        )
        if spec.ignore_eos:
            kwargs["min_new_tokens"] = max_new
        if spec.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnGeneratedText(self.tokenizer, ids.shape[1], spec.stop)])
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out[:, ids.shape[1]:].tolist()

    def _completion(self, toks: list[int], spec: SamplingSpec, max_new: int) -> Completion:
        pad = self.tokenizer.pad_token_id
        kept, finish = [], "length"
        for t in toks:
            if t in self.eos_ids and not spec.ignore_eos:
                kept.append(t)
                finish = "stop"
                break
            kept.append(t)
        # generate pads rows that finished early; pad may equal eos, handled above.
        while kept and finish == "length" and len(kept) > 0 and kept[-1] == pad and pad not in self.eos_ids:
            kept.pop()
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        for s in spec.stop:
            cut = text.find(s)
            if cut >= 0:
                # Like vLLM: the stop string ends the completion and is not part of its text.
                text, finish = text[:cut], "stop"
        return Completion(text=text, num_tokens=len(kept), finish_reason=finish)

    # ------------------------------------------------------------------ score
    @torch.inference_mode()
    def score_choices(self, chats: Sequence[Chat], choices: Sequence[str],
                      answer_prefix: str = "") -> list[ChoiceScores]:
        results, single, multi = plan_choice_scoring(self.tokenizer, chats, choices, answer_prefix,
                                                     self.cfg.max_model_len)
        bs = max(1, self.cfg.batch_size)
        for start in range(0, len(single), bs):
            # One forward pass per prompt: all single-token choices read off the last position.
            part = single[start:start + bs]
            ids, mask = self._left_pad([ctx for _, ctx, _ in part])
            logits = self._forward_logits(ids, mask, keep=1)[:, -1, :]
            logp = torch.log_softmax(logits, dim=-1)
            for row, (i, _, toks) in enumerate(part):
                results[i].logprobs = {c: float(logp[row, t]) for c, t in zip(choices, toks)}
        for i, split in multi:
            ids, mask = self._left_pad([c + t for c, t in split])
            # Left padding: each choice's tokens end its row; token k of a choice of n tokens is
            # predicted at position -(n + 1 - k), so the last max(n) + 1 positions cover them all.
            keep = max(len(t) for _, t in split) + 1
            logp = torch.log_softmax(self._forward_logits(ids, mask, keep=keep), dim=-1)
            scores = {}
            for row, (choice, (_, toks)) in enumerate(zip(choices, split)):
                n = len(toks)
                scores[choice] = float(sum(logp[row, keep - n - 1 + k, t] for k, t in enumerate(toks)))
            results[i].logprobs = scores
        return results

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
