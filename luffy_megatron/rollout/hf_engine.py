"""In-process rollout engine on ``transformers`` for CPU runs and tests.

Own sampling loop: left-padded batches, one prefill (once per distinct prompt: the ``n`` samples of a prompt share its
cache) and then one-token decode steps with a static KV cache; finished rows are dropped from the batch (and cache)
once half of it has stopped. Each row draws its uniforms from its own ``random.Random`` seeded
with :func:`~luffy_megatron.rollout.base.sample_seed`, and samples by inverse CDF over the (truncated, renormalised)
distribution, so a seeded request gives the same tokens whatever the batch it shares.
"""

from __future__ import annotations

import inspect
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from luffy_megatron.models.family import torch_dtype
from luffy_megatron.models.tokenizer import read_eos_token_ids
from luffy_megatron.rollout.base import (
    FinishReason,
    RolloutEngine,
    RolloutOutput,
    SamplingParams,
    WeightSyncError,
    sample_counts,
    sample_seed,
)


@dataclass
class RowResult:
    """One generated row of :meth:`HFEngine.generate_rows`."""

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    matched_stop: int | None = None


def next_token_distribution(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sampling distribution and reported log-probs for a [B, V] block of fp32 logits.

    Returns ``(cdf, logp, order)``: ``logp = log_softmax(logits / T)`` over the full vocabulary (what is reported);
    ``cdf`` the cumulative sampling probabilities (top-k then top-p truncated, unnormalised: the last column is the
    total mass) over token ids ``order`` (sorted by descending probability), or over the vocabulary when it is None.
    """
    scaled = logits / temperature if temperature > 0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    if top_k <= 0 and top_p >= 1.0:
        return probs.cumsum(dim=-1), logp, None
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if 0 < top_k < sorted_p.shape[-1]:
        sorted_p[:, top_k:] = 0.0
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it already does.
        before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p * sorted_p.sum(dim=-1, keepdim=True), 0.0)
    return sorted_p.cumsum(dim=-1), logp, order


CPU_DECODE_ATTENTION = "luffy_cpu_decode"


def _cpu_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, except for one-token queries (decode steps): two small matmuls, about twice as fast as SDPA's CPU kernel
    with a padding mask at these shapes."""
    if query.shape[2] != 1 or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, H, 1, T]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register_cpu_decode_attention() -> str:
    """Register :func:`_cpu_decode_attention` (with SDPA's masks) with ``transformers``; returns its name."""
    AttentionInterface.register(CPU_DECODE_ATTENTION, _cpu_decode_attention)
    AttentionMaskInterface.register(CPU_DECODE_ATTENTION, sdpa_mask)
    return CPU_DECODE_ATTENTION


class HFEngine(RolloutEngine):
    """Batched sampling from a ``transformers`` causal LM held in this process.

    The engine owns ``model``: it loads weight updates into it and, on CPU, switches its SDPA attention to
    :func:`_cpu_decode_attention`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Sequence[int] = (),
        batch_size: int = 64,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model.eval()
        if next(model.parameters()).device.type == "cpu" and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(register_cpu_decode_attention())
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.weight_version: int | None = 0
        self._stale = False
        self._rng = random.Random()
        self.device = next(model.parameters()).device
        self.stats = {"generated_tokens": 0, "generate_seconds": 0.0}
        # transformers 5 renamed the cache argument ``past_key_values`` -> ``cache``.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed (a prefill's full [B, L, V] logits can take gigabytes).
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @classmethod
    def from_pretrained(
        cls,
        hf_path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
    ) -> HFEngine:
        """Load an HF folder (fp32 on CPU by default)."""
        model = AutoModelForCausalLM.from_pretrained(str(hf_path), dtype=torch_dtype(dtype)).to(device)
        eos = read_eos_token_ids(hf_path) if eos_token_ids is None else list(eos_token_ids)
        pad = getattr(model.config, "pad_token_id", None)
        return cls(model, eos_token_ids=eos, batch_size=batch_size, pad_token_id=int(pad) if pad is not None else 0)

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: Sequence[int] | None = None
    ) -> list[list[RolloutOutput]]:
        """``counts[i]`` (default ``params.n``) samples of prompt ``i`` (see
        :class:`~luffy_megatron.rollout.base.RolloutEngine`)."""
        per_prompt = sample_counts(len(prompts), params, counts)
        rows = [(i, j) for i, c in enumerate(per_prompt) for j in range(c)]
        seeds = [None if params.seed is None else sample_seed(params.seed, i, j) for i, j in rows]
        results = self.generate_rows([prompts[i] for i, _ in rows], params, seeds) if rows else []
        out: list[list[RolloutOutput]] = [[] for _ in prompts]
        for (i, j), res in zip(rows, results):
            out[i].append(
                RolloutOutput(i, res.output_ids, res.logprobs, res.finish_reason, j, weight_version=self.weight_version)
            )
        return out

    def generate_rows(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int | None],
        is_aborted: Callable[[int], bool] | None = None,
    ) -> list[RowResult]:
        """One sample per row with its own seed (``params.n`` is ignored); ``is_aborted(row)`` is polled per step."""
        if self._stale:
            raise WeightSyncError("the last weight update failed; the in-process engine holds partial weights")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        t0 = time.perf_counter()
        results: list[RowResult] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            abort = None if is_aborted is None else (lambda r, s=start: is_aborted(s + r))
            results.extend(self._generate_batch(prompts[start:stop], params, seeds[start:stop], abort))
        self.stats["generated_tokens"] += sum(len(r.output_ids) for r in results)
        self.stats["generate_seconds"] += time.perf_counter() - t0
        return results

    @torch.no_grad()
    def _prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Prefill every prompt into a static cache sized for ``max_new_tokens`` more; one batch row per prompt.

        Returns ``(cache, last logits [B, V] fp32, attention mask [B, width + max_new_tokens], next positions [B, 1],
        width)``, prompts left-padded to ``width``.
        """
        dev = self.device
        # Prefix sharing: each distinct prompt is prefilled once; its cache row is then copied to every sample of it.
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        width = max(len(p) for p in distinct)
        total = width + max_new_tokens
        input_ids = torch.full((len(distinct), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(distinct), total), dtype=torch.long)  # spans the whole static cache
        for r, p in enumerate(distinct):
            input_ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) : width] = 1
        position_ids = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, position_ids = input_ids.to(dev), mask.to(dev), position_ids.to(dev)
        # A static cache is written in place; a dynamic one would copy itself once per token and layer.
        cache = StaticCache(config=self.model.config, max_cache_len=total)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache_position=torch.arange(width, device=dev),
            use_cache=True,
            **{self._cache_kw: cache},
            **self._last_only,
        )
        logits, next_pos = out.logits[:, -1, :].float(), position_ids[:, -1:] + 1
        if len(distinct) < len(prompts):  # one batch row per sample from here on
            expand = torch.tensor(row_of, device=dev)
            _select_cache_rows(cache, expand)
            logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]
        return cache, logits, mask, next_pos, width

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: SamplingParams, rngs: list[random.Random], slots: list[int | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per batch slot (from the slot's row's own generator) and its reported log-prob."""
        cdf, logp, order = next_token_distribution(logits, params.temperature, params.top_p, params.top_k)
        if params.temperature == 0:
            tokens = logits.argmax(dim=-1)
        else:
            u = [0.0 if r is None else rngs[r].random() for r in slots]
            u_t = torch.tensor(u, dtype=cdf.dtype, device=cdf.device)
            idx = torch.searchsorted(cdf, (u_t * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
            tokens = (idx if order is None else order.gather(-1, idx)).squeeze(-1)
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        seeds: Sequence[int | None],
        is_aborted: Callable[[int], bool] | None,
    ) -> list[RowResult]:
        b = len(prompts)
        rngs = [random.Random(self._rng.getrandbits(63) if s is None else s) for s in seeds]
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long)
        dev = self.device
        cache, logits, mask, next_pos, width = self._prefill(prompts, params.max_new_tokens)
        out_ids: list[list[int]] = [[] for _ in range(b)]
        out_lp: list[list[float]] = [[] for _ in range(b)]
        reasons: list[FinishReason | None] = [None] * b
        matched: list[int | None] = [None] * b
        # Batch slot -> original row, None once that row has finished. Finished rows stay in the batch (their tokens
        # are ignored) until at most half the slots are alive: dropping them costs a copy of the whole cache.
        slots: list[int | None] = list(range(b))
        for step in range(params.max_new_tokens):
            tokens, tok_lp = self._sample(logits, params, rngs, slots)
            tokens_l, lp_l = tokens.tolist(), tok_lp.tolist()
            is_stop = torch.isin(tokens.cpu(), stop_ids).tolist()
            last = step == params.max_new_tokens - 1
            for slot, r in enumerate(slots):
                if r is None:
                    continue
                out_ids[r].append(tokens_l[slot])
                out_lp[r].append(lp_l[slot])
                if is_stop[slot]:
                    reasons[r], matched[r] = "stop", tokens_l[slot]
                elif is_aborted is not None and is_aborted(r):
                    reasons[r] = "abort"
                elif last:
                    reasons[r] = "length"
                else:
                    continue
                slots[slot] = None
            alive = [slot for slot, r in enumerate(slots) if r is not None]
            if not alive:
                break
            if len(alive) <= len(slots) // 2:
                sel = torch.tensor(alive, device=dev)
                _select_cache_rows(cache, sel)
                tokens, mask, next_pos = tokens[sel], mask[sel], next_pos[sel]
                slots = [slots[s] for s in alive]
            mask[:, width + step] = 1
            out = self.model(
                input_ids=tokens.unsqueeze(-1),
                attention_mask=mask,
                position_ids=next_pos,
                cache_position=torch.tensor([width + step], device=dev),
                use_cache=True,
                **{self._cache_kw: cache},
            )
            logits, next_pos = out.logits[:, -1, :].float(), next_pos + 1
        return [RowResult(out_ids[r], out_lp[r], reasons[r] or "length", matched[r]) for r in range(b)]

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy a full HF-named stream into the model's parameters and persistent buffers.

        Unknown names, shape mismatches and names never received raise :class:`WeightSyncError`; a tied parameter
        (``lm_head.weight`` sharing the embedding) may be omitted. A failed update leaves the engine refusing to
        generate until a complete update succeeds.
        """
        self._stale = True
        self.load_weights(named_tensors, strict=True)
        self._stale = False
        self.weight_version = version

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, strict: bool = True) -> int:
        """Copy tensors into the model by HF name; returns the bytes received. ``strict``: every name must arrive.

        Non-strict loads (one bucket of a bucketed update) still reject unknown names and shape mismatches.
        """
        targets = self.model.state_dict(keep_vars=True)
        by_storage: dict[int, list[str]] = {}
        for name, t in targets.items():
            by_storage.setdefault(t.data_ptr(), []).append(name)
        seen: set[str] = set()
        expert_parts: dict[str, set[tuple[int, str]]] = {}
        nbytes = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                target, owner = targets.get(name), name  # owner: the parameter complete once this is copied
                if target is None and (slot := fused_expert_slot(targets, name)) is not None:
                    owner, expert, part, target = slot
                    parts = expert_parts.setdefault(owner, set())
                    parts.add((expert, part))
                    if len(parts) < targets[owner].shape[0] * (1 if part == "down" else 2):
                        owner = ""
                if target is None:
                    raise WeightSyncError(f"update_weights: unknown parameter name {name!r}")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise WeightSyncError(
                        f"update_weights: shape mismatch for {name!r}: got {tuple(tensor.shape)}, "
                        f"model has {tuple(target.shape)}"
                    )
                target.data.copy_(tensor)
                nbytes += tensor.numel() * tensor.element_size()
                if owner:
                    seen.update(by_storage[targets[owner].data_ptr()])
        missing = sorted(set(targets) - seen)
        if strict and missing:
            raise WeightSyncError(f"update_weights: {len(missing)} parameters not in the stream, e.g. {missing[:5]}")
        return nbytes

    def health(self) -> dict:
        """Always healthy unless a weight update failed."""
        return {"ok": not self._stale, "weight_version": self.weight_version, "backend": "hf"}


def _select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep batch ``rows`` (in that order, repeats allowed) of every layer of a static KV cache."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        layer.batch_size = len(rows)


_PER_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fused_expert_slot(targets: dict[str, torch.Tensor], name: str) -> tuple[str, int, str, torch.Tensor] | None:
    """Where a per-expert tensor (``mlp.experts.{e}.{gate,up,down}_proj.weight``, as checkpoints and the trainer name
    them) lives in a transformers >= 5 MoE model, which fuses a layer's experts into ``mlp.experts.gate_up_proj``
    ``[E, 2I, H]`` (gate rows first) and ``mlp.experts.down_proj`` ``[E, H, I]``: (fused name, expert, part, the view
    to copy into), or None when ``name`` is no such tensor of this model."""
    m = _PER_EXPERT.match(name)
    if m is None:
        return None
    prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
    fused = f"{prefix}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
    param = targets.get(fused)
    if param is None or param.dim() != 3 or expert >= param.shape[0]:
        return None
    if part == "down":
        return fused, expert, part, param[expert]
    half = param.shape[1] // 2
    return fused, expert, part, param[expert, :half] if part == "gate" else param[expert, half:]
