"""Loss and per-example statistics of one micro-batch, for the SimPO and SFT objectives.

SimPO micro-batches hold the B chosen sequences, then the B rejected ones, in one forward pass (one
gather of the ZeRO-3 partitions instead of two). SFT micro-batches hold B sequences with the prompt masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.data import num_tokens, response_logps
from selfalign_ray.train.logprobs import response_logps_chunked
from selfalign_ray.train.simpo import simpo_loss

OBJECTIVES = ("simpo", "sft")


@dataclass
class MicroBatchOutput:
    loss: torch.Tensor               # scalar, mean over the micro-batch's examples (with grad)
    examples: int                    # pairs (SimPO) or sequences (SFT)
    tokens: int                      # real tokens through the model (prompt + responses, no padding)
    response_tokens: int             # tokens that carry a loss
    reward_chosen: torch.Tensor | None = None    # beta * avg log-prob, per pair (detached)
    reward_rejected: torch.Tensor | None = None
    nll_sum: float = 0.0             # SFT: summed NLL of the response tokens


def run_micro_batch(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, objective: str) -> MicroBatchOutput:
    batch = {k: v.to(model.device) for k, v in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}  # a cache would also disable packing
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            inputs[key] = batch[key]
    if cfg.logprob_chunk_tokens:  # LM head in chunks over the response tokens only (train/logprobs.py)
        sums, counts = response_logps_chunked(model, batch, cfg.logprob_chunk_tokens)
    else:
        sums, counts = response_logps(model(**inputs).logits, batch)
    tokens, response_tokens = num_tokens(batch), int(counts.sum())
    if objective == "sft":
        # Token-mean NLL over the micro-batch, as HF/TRL SFT does.
        loss = -sums.sum() / counts.sum().clamp(min=1)
        return MicroBatchOutput(loss, sums.shape[0], tokens, response_tokens, nll_sum=float(-sums.sum()))
    b = sums.shape[0] // 2
    avg = sums / counts.clamp(min=1)  # SimPO's length normalisation
    losses, r_w, r_l = simpo_loss(avg[:b], avg[b:], cfg.beta, cfg.gamma_beta_ratio, cfg.label_smoothing)
    loss = losses.mean()
    if cfg.sft_weight:
        # The SimPO repo's optional SFT term: token-mean cross-entropy of the chosen responses.
        loss = loss + cfg.sft_weight * (-sums[:b].sum() / counts[:b].sum().clamp(min=1))
    return MicroBatchOutput(loss, b, tokens, response_tokens, r_w, r_l)


class MetricWindow:
    """Sums over the micro-batches of one optimizer step (or of an evaluation pass) on one rank."""

    KEYS = ("loss", "examples", "tokens", "response_tokens", "correct", "reward_chosen", "reward_rejected", "nll")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, out: MicroBatchOutput) -> None:
        s = self.sums
        s["loss"] += float(out.loss) * out.examples
        s["examples"] += out.examples
        s["tokens"] += out.tokens
        s["response_tokens"] += out.response_tokens
        s["nll"] += out.nll_sum
        if out.reward_chosen is not None:
            s["correct"] += float((out.reward_chosen > out.reward_rejected).sum())
            s["reward_chosen"] += float(out.reward_chosen.sum())
            s["reward_rejected"] += float(out.reward_rejected.sum())

    def all_ranks(self) -> dict[str, float]:
        """Sums over every rank (a collective: all ranks must call it together)."""
        import torch.distributed as dist

        t = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return dict(zip(self.KEYS, t.tolist()))


def summarise(totals: dict[str, float], objective: str) -> dict[str, float]:
    """Means per example from all-rank sums: loss, and for SimPO rewards, margin and preference accuracy."""
    n = max(totals["examples"], 1)
    out = {"loss": totals["loss"] / n, "examples": int(totals["examples"])}
    if objective == "simpo":
        out.update(reward_chosen=totals["reward_chosen"] / n, reward_rejected=totals["reward_rejected"] / n,
                   margin=(totals["reward_chosen"] - totals["reward_rejected"]) / n,
                   preference_accuracy=totals["correct"] / n)
    else:
        out["token_nll"] = totals["nll"] / max(totals["response_tokens"], 1)
    return out
