"""Per-sequence response log-probs without the full-vocabulary logits.

The plain path (train/data.py response_logps) asks the model for logits at every position: (tokens x vocabulary)
fp32, then the cross-entropy's log-softmax of the same size, both kept for backward. At paper lengths that
dominates memory (Llama-3, 128k vocabulary: 2 GiB per 4k-token sequence before its gradient). Here:

  1. the model runs its usual forward (through the DeepSpeed engine when there is one, so ZeRO-3's hooks and
     the engine's backward bookkeeping see an ordinary forward) with output_hidden_states=True and
     logits_to_keep=1: the final-norm hidden states come back and the LM head projects one position only;
  2. only the positions whose next token carries a loss (response tokens) are kept: prompt positions never
     meet the LM head, so its work shrinks by the prompt share of the tokens;
  3. those hidden states go through the LM head `chunk_tokens` at a time; each chunk's logits -> log-prob of
     the target is wrapped in torch.utils.checkpoint (non-reentrant, the variant that works with ZeRO-3's
     parameter hooks), so no chunk keeps vocabulary-sized tensors for backward: they are recomputed there, one
     chunk at a time. Peak: one chunk's logits (+ its log-softmax and gradient), not the sequence's.

The LM head is called as a module, so under ZeRO-3 its pre-forward hook gathers its partitioned weight (also
when it is tied to the input embeddings, as in SmolLM2 and Gemma). Gemma-2's final logit soft-capping
(config.final_logit_softcapping) is applied to every chunk exactly as the model's own forward does it
(logits / cap -> tanh -> * cap, in the model's dtype), then log-probs are taken in fp32 like the plain path.

Cost: the LM head's forward runs twice for checkpointed chunks (forward + recompute in backward). A row that
fits in one chunk is not checkpointed (its logits are already within the chunk budget), so short sequences pay
nothing extra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from selfalign_ray.train.data import IGNORE


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def token_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                softcap: float | None = None) -> torch.Tensor:
    """log p(target) for each row of `hidden` (n, H) through `head`, `chunk_tokens` rows at a time."""
    n = hidden.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens or not torch.is_grad_enabled():
        if chunk_tokens <= 0 or n <= chunk_tokens:
            return _chunk_logps(head, hidden, targets, softcap)
        # No backward to prepare for (evaluation): chunks bound the memory without any recompute.
        return torch.cat([_chunk_logps(head, hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens], softcap)
                          for s in range(0, n, chunk_tokens)])
    return torch.cat([checkpoint(_chunk_logps, head, hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens],
                                 softcap, use_reentrant=False) for s in range(0, n, chunk_tokens)])


def _unwrapped(model):
    """The HF model behind a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def response_logps_chunked(model, batch: dict[str, torch.Tensor], chunk_tokens: int,
                           inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs, number of response tokens) per sequence, in collate order.

    Same contract as train/data.py response_logps(model(...).logits, batch): padded (N, L) batches or packed
    (1, T) rows with sequence_index; `batch["labels"]` and `batch["sequence_index"]` on the CPU (the trainer's
    collated batch; device copies are accepted and copied back once).
    """
    hf = _unwrapped(model)
    if inputs is None:  # `inputs`: the model's keyword arguments as the trainer built them (objectives.model_inputs)
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}  # a cache would also disable packing
        for key in ("attention_mask", "position_ids"):
            if key in batch:
                inputs[key] = batch[key]
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]  # after the final norm: what the LM head reads
    del out  # the other layers' states (autograd keeps what backward needs)
    # Which positions carry a loss, and their sequences, are read from the CPU labels: masking a device tensor
    # with a device boolean (nonzero) or bincount-ing on the device would wait for the GPU once per micro-batch.
    # The device only gets index tensors, gathered without a host sync.
    targets = batch["labels"][:, 1:].cpu()  # the trainer passes CPU labels: no copy
    counted = targets != IGNORE
    if "sequence_index" in batch:  # packed: tokens -> their sequence
        index = batch["sequence_index"].cpu()
        n_seq = int(index[-1]) + 1
        seq = index[1:][counted[0]]
    else:  # padded: one sequence per row
        n_seq = targets.shape[0]
        seq = torch.arange(n_seq).unsqueeze(1).expand_as(targets)[counted]
    rows, cols = counted.nonzero(as_tuple=True)
    device = hidden.device
    rows, cols = rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    logps = token_logps(hf.get_output_embeddings(), hidden[rows, cols],
                        targets[counted].to(device, non_blocking=True), chunk_tokens, softcap)
    sums = torch.zeros(n_seq, dtype=logps.dtype, device=device).index_add(0, seq.to(device, non_blocking=True), logps)
    counts = torch.bincount(seq, minlength=n_seq).to(device, non_blocking=True)
    return sums, counts
