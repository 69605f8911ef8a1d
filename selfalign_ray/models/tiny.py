"""A tiny random Llama with a locally trained byte-level BPE tokenizer, built in seconds offline.

Used by tests and by `model=tiny_random`: it exercises every code path (chat template, sampling,
scoring, ZeRO-3 partitioning, vLLM loading) without downloading anything. head_dim is 32 because
vLLM's CPU attention only supports head sizes in {32, 64, 80, ...}.
"""

from __future__ import annotations

from pathlib import Path

from selfalign_ray.models.cache import build_once, cache_root

# Bump when the architecture or tokenizer recipe changes, so old caches are not reused.
TINY_VERSION = "v1"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Enough English-like text for BPE merges; the tokenizer stays byte-level so any text encodes.
_TOKENIZER_CORPUS = """
Guess a prompt that the following persona may ask you to do. The prompt should be informative and specific.
Your output should start with "User prompt:". You are an impartial judge. Your task is to rank two answers
to a given prompt based on their quality. Response 1 Response 2 ranking: 1 > 2 ranking: 2 > 1
Relevance and specificity to the prompt. Accuracy and correctness of information. Completeness and
comprehensiveness. Clarity and understandability. A retired schoolteacher who volunteers at the library.
A software engineer who maintains a data pipeline written in Python. A nurse working night shifts.
Design one question or instruction and its solution with the given keywords. question solution keywords
Write a short story, explain the concept, summarize the article, fix the bug in this function, plan a trip.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > : ; , . ? !
"""


def _train_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_random(out: Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 2, vocab_size: int = 512) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer into `out` (created if missing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(out, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_random_path() -> Path:
    """The cached tiny random model (built on first use)."""
    target = cache_root() / "models" / f"tiny_random-{TINY_VERSION}"
    return build_once(target, lambda tmp: build_tiny_random(tmp))
