"""GPU generation benchmark: our `hf` engine vs bare `model.generate` on the same prompts and token counts.

    python bench/generate_gpu.py                         # Llama-3.2-1B shape, bf16, batch 16 and 64
    python bench/generate_gpu.py --batches 16 --new 128

No download: a random-weight model of the chosen shape and a word-level tokenizer over the full vocabulary
(so the LM head and the sampling work on 128k logits like the real model) are written to a temp dir.
Same prompts (~128 tokens, left-padded), T=0.6, top_p=0.95, EOS ignored so every row makes exactly --new
tokens, in one process, one after the other:

  bare     : model.generate(do_sample=True) (transformers' own sampler; rows share one RNG stream)
  ours     : selfalign_ray HFEngine.generate (per-row seeded sampling: a row's text does not depend on
             its batch mates, which is what lets a resumed run regenerate the same prompts)
  ours_v0  : the same engine with the first per-row sampler (one torch.multinomial per row on the host,
             i.e. one device-to-host copy per row and step); kept to show what the vectorised sampler buys

Ratio = ours tokens/s / bare tokens/s (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }} {{ m['content'] }}<|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant {% endif %}")


def build_model_dir(root: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 4)}
    for j, special in enumerate(["<unk>", "<|start|>", "<|end|>", "<pad>"]):
        words[special] = vocab - 4 + j
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|end|>", bos_token="<|start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(root)
    config = LlamaConfig(**SHAPE, max_position_embeddings=4096, eos_token_id=words["<|end|>"],
                         pad_token_id=words["<pad>"], bos_token_id=words["<|start|>"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root)
    return root


class LegacySampler:
    """The engine's first sampler (one multinomial per row on the host), for the ours_v0 variant."""

    def __init__(self, generators, temperature, top_p, prompt_width=None, max_new=None, device=None):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        scores = scores.float()
        probs = torch.softmax(scores / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        chosen = torch.stack([torch.multinomial(probs[i].cpu(), 1, generator=g)[0]
                              for i, g in enumerate(self.generators)]).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return out


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    ap.add_argument("--new", type=int, default=256, help="new tokens per row (EOS ignored)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt words (~tokens) per row")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import transformers

    import selfalign_ray.engines.hf as hf_mod
    from selfalign_ray.engines.base import SamplingSpec
    from selfalign_ray.engines.factory import EngineConfig
    from selfalign_ray.engines.hf import HFEngine
    from selfalign_ray.engines.templating import encode, render_prompt

    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    root = build_model_dir(Path(tempfile.mkdtemp()), SHAPE["vocab_size"])
    engine = HFEngine(str(root), EngineConfig(num_gpus_per_actor=1, max_model_len=4096))
    model, tok = engine.model, engine.tokenizer
    spec = SamplingSpec(n=1, temperature=0.6, top_p=0.95, max_tokens=args.new, ignore_eos=True)
    rng = random.Random(0)
    rows = []
    current_sampler = hf_mod._PerRowSampler
    for batch in [int(b) for b in args.batches.split(",")]:
        chats = [[{"role": "user", "content": " ".join(f"w{rng.randrange(50000)}" for _ in range(args.prompt))}]
                 for _ in range(batch)]
        seeds = list(range(batch))
        ids, mask = engine._left_pad([encode(tok, render_prompt(tok, c)) for c in chats])

        def bare():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=0.95,
                                  max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=tok.pad_token_id)

        def ours():
            return engine.generate(chats, spec, seeds=seeds)

        bare()  # warm-up (kernels, allocator)
        ours()
        out_bare, t_bare = timed(bare)
        assert out_bare.shape[1] - ids.shape[1] == args.new
        out_ours, t_ours = timed(ours)
        made = sum(c.num_tokens for r in out_ours for c in r.completions)
        assert made == batch * args.new, made
        hf_mod._PerRowSampler = LegacySampler
        try:
            _, t_v0 = timed(ours)
        finally:
            hf_mod._PerRowSampler = current_sampler
        n = batch * args.new
        rows.append({"batch": batch, "new_tokens": args.new, "prompt_tokens": int(ids.shape[1]),
                     "bare_tok_s": n / t_bare, "ours_tok_s": n / t_ours, "ours_v0_tok_s": n / t_v0,
                     "ratio_ours_bare": t_bare / t_ours, "ratio_v0_bare": t_bare / t_v0})

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "shape": "llama3-1b (random weights, bf16, sdpa)",
              "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "generate_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, torch {torch.__version__}, transformers {transformers.__version__}, {report['shape']}")
    print(f"{'batch':>5} {'new':>5} {'bare tok/s':>11} {'ours tok/s':>11} {'v0 tok/s':>9} {'ours/bare':>9} {'v0/bare':>8}")
    for r in rows:
        print(f"{r['batch']:5d} {r['new_tokens']:5d} {r['bare_tok_s']:11.0f} {r['ours_tok_s']:11.0f} "
              f"{r['ours_v0_tok_s']:9.0f} {r['ratio_ours_bare']:9.2f} {r['ratio_v0_bare']:8.2f}")


if __name__ == "__main__":
    main()
