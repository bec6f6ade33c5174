"""The rollout-engine interface shared by the in-process HF engine and the SGLang servers.

Log-probabilities. Every engine returns, for each sampled token y_t, ``log softmax(logits_t / T)[y_t]``: the
log-probability under the temperature-scaled distribution over the *full* vocabulary, before any top-k / top-p
truncation and renormalisation. This is what verl (and therefore LUFFY's released code) computes as the policy's
log-prob (``logits.div_(temperature)`` then log-softmax) and what SGLang returns in ``output_token_logprobs`` by
default. With ``temperature == 0`` (greedy) the log-probs are those of the untempered distribution (T = 1).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from luffy_megatron.config import RolloutConfig

if TYPE_CHECKING:
    from torch import Tensor

FinishReason = Literal["stop", "length", "abort"]


class RolloutError(RuntimeError):
    """A rollout request could not be served (unreachable servers, rejected requests, lost prompts)."""


class WeightSyncError(RuntimeError):
    """A weight update failed on at least one engine; training must not continue against stale weights."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample ``n`` completions per prompt (or per-prompt counts given to :meth:`RolloutEngine.generate`).

    ``top_k <= 0`` and ``top_p == 1`` disable truncation; ``temperature == 0`` is greedy. ``stop_token_ids`` are added
    to the model's EOS ids. With a ``seed`` the samples are a pure function of (weights, prompts, params): sample ``j``
    of prompt ``i`` uses :func:`sample_seed` ``(seed, i, j)`` whatever the batching.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_config(
        cls, cfg: RolloutConfig, max_new_tokens: int, *, n: int | None = None, seed: int | None = None
    ) -> SamplingParams:
        """Sampling of a rollout step: ``n`` defaults to ``cfg.n`` (the samples of a prompt without a trace; the loop
        passes exact per-prompt counts to :meth:`RolloutEngine.generate`), ``seed`` to ``cfg.seed``."""
        return cls(
            n=cfg.n if n is None else n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=max_new_tokens,
            seed=cfg.seed if seed is None else seed,
        )


@dataclass
class RolloutOutput:
    """One sampled completion.

    ``output_ids`` include the stop token when ``finish_reason == "stop"``; ``logprobs[t]`` is the log-prob of
    ``output_ids[t]`` as defined in this module's docstring. ``weight_version`` is the version that generated it.
    """

    prompt_index: int
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    sample_index: int = 0
    weight_version: int | None = None
    meta: dict = field(default_factory=dict)


def sample_counts(num_prompts: int, params: SamplingParams, counts: Sequence[int] | None) -> list[int]:
    """Samples to draw per prompt: ``counts`` (one non-negative int per prompt) or ``params.n`` for every prompt."""
    if counts is None:
        return [params.n] * num_prompts
    if len(counts) != num_prompts:
        raise ValueError(f"generate: {len(counts)} counts for {num_prompts} prompts")
    bad = [c for c in counts if not isinstance(c, int) or c < 0]
    if bad:
        raise ValueError(f"generate: sample counts must be non-negative ints, got {bad[0]!r}")
    return list(counts)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for sample ``sample_index`` of prompt ``prompt_index``; the same in every engine."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class RolloutEngine(ABC):
    """Generates completions for token-id prompts and receives new weights as an HF-named tensor stream."""

    #: Version of the weights currently served (the ``version`` of the last successful :meth:`update_weights`).
    weight_version: int | None = None

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: Sequence[int] | None = None
    ) -> list[list[RolloutOutput]]:
        """``counts[i]`` outputs for prompt ``i`` (``params.n`` each when None), outer list in prompt order, inner
        list by sample index. Sample ``j`` of prompt ``i`` depends only on (seed, i, j), so asking for fewer samples
        returns a prefix of what asking for more would."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        """Load full HF-named tensors; raises :class:`WeightSyncError` when any engine fails to load them."""

    @abstractmethod
    def health(self) -> dict:
        """``{"ok": bool, ...}`` with per-server details where there are servers."""

    def pause(self) -> None:
        """Stop generating (in-flight requests are aborted) until the next weight update or :meth:`resume`."""
        return None

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        return None

    def release_memory(self) -> None:
        """Free accelerator memory (weights and KV cache) while the trainer runs; no-op where unsupported."""
        return None

    def resume_memory(self) -> None:
        """Re-acquire what :meth:`release_memory` freed."""
        return None

    def close(self) -> None:
        """Release processes, sessions and files owned by the engine."""
        return None

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
