"""Per-micro-batch sums of the SimPO and SFT objectives, and the per-step window of metric sums.

SimPO micro-batches hold the B chosen sequences, then the B rejected ones, in one forward pass (one
gather of the ZeRO-3 partitions instead of two). SFT micro-batches hold B sequences with the prompt masked.

Sums, not means: a micro-batch returns the sum of its per-pair SimPO losses (SFT: the summed NLL of its
response tokens); the training core (train/core.py) divides by the optimizer step's global count of pairs
(SFT: response tokens), so every pair (token) of a step weighs the same whatever micro-batch or rank it
landed in. Counts are read from the CPU batch before it is copied to the device; the window keeps its sums on
the device and is read once per optimizer step (no host sync per micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfalign_ray.train.collectives import Collectives
from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.data import IGNORE, num_tokens, response_logps
from selfalign_ray.train.logprobs import response_logps_chunked
from selfalign_ray.train.simpo import simpo_loss

OBJECTIVES = ("simpo", "sft")


@dataclass
class BatchCounts:
    """What a collated (CPU) micro-batch holds, counted before it goes to the device."""

    examples: int                 # pairs (SimPO) or sequences (SFT)
    tokens: int                   # real tokens through the model (prompt + responses, no padding)
    response_tokens: int          # tokens that carry a loss
    chosen_response_tokens: int   # SimPO: response tokens of the chosen sequences (SFT: = response_tokens)


def batch_counts(batch: dict[str, torch.Tensor], objective: str) -> BatchCounts:
    # The trainer passes CPU batches (collate's output), so nothing here waits on the device; a caller that
    # already moved its batch pays one copy back.
    labels = batch["labels"].cpu()
    counted = labels[:, 1:] != IGNORE  # position t predicts token t + 1: the first label never counts
    if "sequence_index" in batch:
        seq = batch["sequence_index"].cpu()
        n = int(seq[-1]) + 1
        per_seq = torch.zeros(n, dtype=torch.long).index_add(0, seq[1:], counted[0].long())
    else:
        n, per_seq = labels.shape[0], counted.sum(-1)
    examples = n // 2 if objective == "simpo" else n
    response = int(per_seq.sum())
    chosen = int(per_seq[:examples].sum()) if objective == "simpo" else response
    tokens = num_tokens({k: batch[k].cpu() for k in ("input_ids", "attention_mask") if k in batch})
    return BatchCounts(examples, tokens, response, chosen)


def flash_varlen_kwargs(position_ids: torch.Tensor, device) -> dict:
    """Sequence boundaries of a packed (1, T) row for flash-attention-2, computed once on the CPU.

    transformers (modeling_flash_attention_utils._flash_attention_forward) takes `cu_seq_lens_q/k` (int32
    cumulative starts + total) and `max_length_q/k` (ints) and then skips re-deriving them from position_ids in
    every layer (a nonzero() and a max() on the device, with host syncs, per layer per pass)."""
    if position_ids.device.type != "cpu":
        raise ValueError("flash_varlen_kwargs builds the boundaries from the CPU position_ids")
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    cu = cu.to(device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict[str, torch.Tensor], device, attn_implementation: str = "sdpa") -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "use_cache": False}  # a cache would also disable packing
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            inputs[key] = batch[key].to(device, non_blocking=True)
    # flash-attention 2 and models/packed_sdpa.py read the packed row's boundaries from these keywords.
    if attn_implementation in ("flash_attention_2", "sdpa_packed") and "position_ids" in batch \
            and "attention_mask" not in batch:
        inputs.update(flash_varlen_kwargs(batch["position_ids"], device))
    return inputs


# Device-side statistics of one micro-batch, in this order (all detached; float64).
STATS = ("loss", "correct", "reward_chosen", "reward_rejected", "nll")


@dataclass
class MicroBatchSums:
    counts: BatchCounts
    loss_sum: torch.Tensor            # SimPO: sum of per-pair losses; SFT: summed response NLL (with grad)
    chosen_nll_sum: torch.Tensor      # SimPO: summed NLL of the chosen responses (with grad; the SFT term)
    stats: torch.Tensor               # (len(STATS),) float64 on the device, detached
    reward_chosen: torch.Tensor | None = None  # SimPO: beta * avg log-prob per pair (detached)
    reward_rejected: torch.Tensor | None = None


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def forward_sums(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, objective: str,
                 attn_implementation: str = "sdpa", counts: BatchCounts | None = None) -> MicroBatchSums:
    """One forward pass over a CPU-collated micro-batch; sums of the objective, nothing read back to the host.
    `counts`: the batch's batch_counts when the caller already has them (the core counts a whole window first)."""
    counts = counts or batch_counts(batch, objective)
    device = _device(model)
    inputs = model_inputs(batch, device, attn_implementation)
    if cfg.logprob_chunk_tokens:  # LM head in chunks over the response tokens only (train/logprobs.py);
        # it reads labels and sequence_index on the CPU and sends only index tensors to the device.
        sums, seq_counts = response_logps_chunked(model, batch, cfg.logprob_chunk_tokens, inputs=inputs)
    else:
        targets = {"labels": batch["labels"].to(device, non_blocking=True)}
        if "sequence_index" in batch:
            targets["sequence_index"] = batch["sequence_index"]  # stays on the CPU: read there, copied once
        sums, seq_counts = response_logps(model(**inputs).logits, targets)
    zero = sums.new_zeros(())
    if objective == "sft":
        nll = -sums.sum()
        stats = torch.stack([nll.detach(), zero, zero, zero, nll.detach()]).double()
        return MicroBatchSums(counts, nll, zero, stats)
    b = counts.examples
    avg = sums / seq_counts.clamp(min=1)  # SimPO's length normalisation
    losses, r_w, r_l = simpo_loss(avg[:b], avg[b:], cfg.beta, cfg.gamma_beta_ratio, cfg.label_smoothing)
    loss_sum, chosen_nll = losses.sum(), -sums[:b].sum()
    stats = torch.stack([loss_sum.detach(), (r_w > r_l).sum().to(sums.dtype), r_w.sum(), r_l.sum(),
                         chosen_nll.detach()]).double()
    return MicroBatchSums(counts, loss_sum, chosen_nll, stats, r_w, r_l)


@dataclass
class MicroBatchOutput:
    """A micro-batch on its own, normalised within itself (the benches' single-process step)."""

    loss: torch.Tensor
    examples: int
    tokens: int
    response_tokens: int
    reward_chosen: torch.Tensor | None = None    # SimPO: beta * avg log-prob per pair (detached)
    reward_rejected: torch.Tensor | None = None


def run_micro_batch(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, objective: str,
                    attn_implementation: str = "sdpa") -> MicroBatchOutput:
    """Forward + loss of one micro-batch normalised by its own counts (same compute as a training micro-batch;
    the trainer normalises by the whole step instead, see core.TrainCore.train_step)."""
    out = forward_sums(model, batch, cfg, objective, attn_implementation)
    c = out.counts
    if objective == "sft":
        loss = out.loss_sum / max(c.response_tokens, 1)
    else:
        loss = out.loss_sum / max(c.examples, 1)
        if cfg.sft_weight:
            loss = loss + cfg.sft_weight * out.chosen_nll_sum / max(c.chosen_response_tokens, 1)
    return MicroBatchOutput(loss, c.examples, c.tokens, c.response_tokens, out.reward_chosen, out.reward_rejected)


class MetricWindow:
    """Sums over the micro-batches of one optimizer step (or of an evaluation pass) on one rank.

    Counts are Python numbers (from the CPU batches); objective statistics stay on the device until
    `all_ranks`, which does one reduction and one read per window."""

    COUNTS = ("examples", "tokens", "response_tokens", "chosen_response_tokens", "nonfinite")
    KEYS = STATS + COUNTS

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.stats = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        # The first non-finite micro-batch as (micro index * world + rank), +inf while there is none.
        self.first_bad = torch.full((1,), math.inf, dtype=torch.float64, device=self.device)
        self.bad_flags = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, out: MicroBatchSums, code: float = 0.0) -> None:
        c = out.counts
        for key in ("examples", "tokens", "response_tokens", "chosen_response_tokens"):
            self.counts[key] += getattr(c, key)
        self.stats += out.stats
        bad = ~torch.isfinite(out.stats[0])
        self.bad_flags += bad.double()
        candidate = torch.where(bad, self.first_bad.new_full((), float(code)), self.first_bad.new_full((), math.inf))
        self.first_bad = torch.minimum(self.first_bad, candidate.reshape(1))

    def all_ranks(self, coll: Collectives) -> dict[str, float]:
        """Sums over every rank (a collective: all ranks must call it together); the window's one host read."""
        counts = torch.tensor([self.counts[k] for k in self.COUNTS[:-1]], dtype=torch.float64, device=self.device)
        t = coll.sum_(torch.cat([self.stats, counts, self.bad_flags.reshape(1)]), "metric window")
        return dict(zip(self.KEYS, t.tolist()))

    def first_nonfinite(self, coll: Collectives) -> tuple[int, int]:
        """(micro-batch code // world, rank) of the earliest non-finite micro-batch over all ranks; call only
        when all_ranks reported nonfinite > 0 (then every rank calls it)."""
        code = int(coll.min_(self.first_bad.clone(), "first non-finite micro-batch").item())
        return divmod(code, coll.world_size)


def summarise(totals: dict[str, float], objective: str, sft_weight: float = 0.0) -> dict[str, float]:
    """Means from all-rank sums: SimPO loss, rewards, margin and preference accuracy per pair; SFT loss per
    response token (the quantity the step's gradient is the gradient of)."""
    if objective == "sft":
        per_token = totals["nll"] / max(totals["response_tokens"], 1)
        return {"loss": per_token, "token_nll": per_token, "examples": int(totals["examples"])}
    n = max(totals["examples"], 1)
    loss = totals["loss"] / n
    if sft_weight:
        loss += sft_weight * totals["nll"] / max(totals["chosen_response_tokens"], 1)
    return {"loss": loss, "examples": int(totals["examples"]),
            "reward_chosen": totals["reward_chosen"] / n, "reward_rejected": totals["reward_rejected"] / n,
            "margin": (totals["reward_chosen"] - totals["reward_rejected"]) / n,
            "preference_accuracy": totals["correct"] / n}
