"""SDPA attention for packed (padding-free) rows without the block-diagonal T x T mask: `sdpa_packed`.

Why: a packed (1, T) row of n sequences reaches transformers' `sdpa` path as a dense (1, 1, T, T) block-diagonal
boolean mask (masking_utils.create_causal_mask detects the restarting position_ids). torch's SDPA cannot skip
work for an arbitrary mask: its CPU kernel computes every query x key block of the T x T scores (and its backward
again), while `is_causal` lets it skip the upper triangle. For n sequences of length L that is (nL)^2 score
work instead of n L^2 / 2. Profiled on SmolLM2-135M (bench/RESULTS.md §3) the masked attention was the largest
cost our packed step had over TRL's padded one.

What this does: the attention function splits the packed row at the sequence starts and runs SDPA with
`is_causal=True` on each segment (transformers' own `sdpa_attention_forward`, so GQA handling is unchanged),
then joins the outputs. The boundaries come from the `cu_seq_lens_q` keyword (objectives.model_inputs passes
them, computed once on the CPU per micro-batch) or else from the position_ids every decoder layer receives.
The mask function skips building the T x T mask whenever there is no 2-D padding mask; a padded batch
(attention_mask given) gets transformers' ordinary SDPA mask and kernel, so the implementation is correct for
both layouts. Not for sliding-window models (their window lives in the mask): `usable_for` says so.

Register once per process (`register()`, idempotent) before loading a model with
attn_implementation="sdpa_packed"; saved checkpoints do not record it (transformers keeps the implementation
out of config.json), so they load with any implementation.
"""

from __future__ import annotations

import torch

NAME = "sdpa_packed"


def _boundaries(kwargs: dict, total: int) -> list[int] | None:
    """Sequence start offsets + total for the packed row, or None when it holds one sequence."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        bounds = [int(x) for x in cu.tolist()]
    else:
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape[0] != 1:
            return None
        starts = (pos[0] == 0).nonzero().view(-1).tolist()
        if not starts or starts[0] != 0:
            return None
        bounds = starts + [total]
    if bounds[-1] != total:
        raise ValueError(f"{NAME}: sequence boundaries end at {bounds[-1]}, the row has {total} tokens")
    return bounds if len(bounds) > 2 else None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """transformers attention-function signature: query/key/value (B, heads, T, D) -> ((B, T, heads, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] > 1 and key.shape[2] == query.shape[2]:
        bounds = _boundaries(kwargs, query.shape[2])
    if bounds is None:  # one sequence, a padded batch (mask given), or decoding: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                            "max_length_k", "position_ids")}
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                   dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


def packed_sdpa_mask(*args, **kwargs):
    """No T x T mask for an unpadded row (packed or not: the attention function handles causality); transformers'
    SDPA mask when a 2-D padding mask is given."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make attn_implementation="sdpa_packed" known to transformers in this process (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)


def usable_for(config) -> bool:
    """False for models whose attention pattern is more than causal-within-a-sequence (sliding windows,
    soft-capping, alternating layer types): their pattern lives in transformers' mask functions."""
    text = getattr(config, "text_config", None) or config
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    cap = getattr(text, "attn_logit_softcapping", None)
    layer_types = getattr(text, "layer_types", None) or []
    return not cap and all(t == "full_attention" for t in layer_types)
