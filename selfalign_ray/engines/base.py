"""The generation-engine interface shared by the `hf` and `vllm` engines.

Both engines take chats (lists of {"role", "content"} dicts), apply the model's own chat template
with a generation prompt, and return plain Python objects, so stages never touch engine types.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. `seed` makes each request reproducible on its own (independent of batching)."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Benchmarks fix output lengths by ignoring EOS; never used for real data.
    ignore_eos: bool = False

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    text: str
    num_tokens: int
    # "stop" (EOS or a stop string) or "length" (hit max_tokens).
    finish_reason: str


@dataclass
class GenerationResult:
    """All completions of one prompt."""

    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)
    # Set when the prompt could not be run (e.g. longer than the context window); completions is empty.
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return sum(c.num_tokens for c in self.completions)


@dataclass
class ChoiceScores:
    """Log-probabilities of each answer choice right after the templated prompt (+ answer prefix)."""

    prompt_tokens: int
    logprobs: dict[str, float] = field(default_factory=dict)
    error: str | None = None


class Engine(Protocol):
    """What every stage may call. Implementations: HFEngine, VLLMEngine."""

    model_path: str

    def generate(self, chats: Sequence[Chat], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[GenerationResult]:
        """Sample `spec.n` completions for each chat. `seeds[i]` (if given) seeds request i alone."""

    def score_choices(self, chats: Sequence[Chat], choices: Sequence[str],
                      answer_prefix: str = "") -> list[ChoiceScores]:
        """Log-prob of each choice string after `template(chat, generation prompt) + answer_prefix`.

        Multi-token choices get the sum of their token log-probs. One forward pass per prompt when
        every choice is a single token.
        """

    def close(self) -> None:
        """Release accelerator memory (engines are also released when their actor dies)."""


def request_seed(base_seed: int, *keys: object) -> int:
    """A stable 31-bit seed for one request, from the run seed and the row's identity."""
    digest = hashlib.sha256(repr((base_seed,) + keys).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
