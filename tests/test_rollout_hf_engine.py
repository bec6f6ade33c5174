"""In-process HF rollout engine: sampling statistics, seeds, exact log-probs, stopping, weight updates."""

from __future__ import annotations

import math

import pytest
import torch

from luffy_megatron.config import RolloutConfig
from luffy_megatron.rollout import SamplingParams, WeightSyncError
from luffy_megatron.rollout.factory import build_rollout_engine
from luffy_megatron.rollout.hf_engine import CPU_DECODE_ATTENTION, HFEngine, next_token_distribution
from tests.fixtures_models import save_tiny_model, tiny_model

PROMPT = [5, 9, 3, 17]


@pytest.fixture(scope="module")
def peaked() -> HFEngine:
    return HFEngine(tiny_model(seed=1, scale=12.0), eos_token_ids=[1], batch_size=4096)


def _first_token_probs(engine: HFEngine, prompt: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1].float()
    return torch.softmax(logits / temperature, dim=-1)


def _freqs(engine: HFEngine, params: SamplingParams) -> torch.Tensor:
    out = engine.generate([PROMPT], params)[0]
    tokens = torch.tensor([o.output_ids[0] for o in out])
    return torch.bincount(tokens, minlength=engine.model.config.vocab_size).double() / len(out)


def _assert_close_freqs(freqs: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    # 5 sigma per token under the multinomial, plus a tiny floor.
    tol = 5 * torch.sqrt(probs * (1 - probs) / n) + 2e-3
    assert torch.all((freqs - probs).abs() <= tol), (freqs, probs)


def test_first_token_frequencies_match_tempered_softmax(peaked: HFEngine) -> None:
    n = 4000
    probs = _first_token_probs(peaked, PROMPT, 0.7).double()
    assert probs.max() < 0.9 and (probs > 0.02).sum() >= 3, "model distribution should be non-trivial"
    freqs = _freqs(peaked, SamplingParams(n=n, temperature=0.7, max_new_tokens=1, seed=11))
    _assert_close_freqs(freqs, probs, n)


def test_top_p_and_top_k_truncation(peaked: HFEngine) -> None:
    n = 4000
    probs = _first_token_probs(peaked, PROMPT, 1.0).double()
    sorted_p, order = probs.sort(descending=True)
    # top_p: the smallest prefix whose mass reaches top_p.
    top_p = float(sorted_p[:2].sum() + 1e-3)
    keep = order[: int((sorted_p.cumsum(0) - sorted_p < top_p).sum())]
    assert len(keep) == 3
    expected = torch.zeros_like(probs)
    expected[keep] = probs[keep] / probs[keep].sum()
    freqs = _freqs(peaked, SamplingParams(n=n, top_p=top_p, max_new_tokens=1, seed=5))
    assert set(torch.nonzero(freqs).flatten().tolist()) <= set(keep.tolist())
    _assert_close_freqs(freqs, expected, n)
    # top_k = 2
    expected = torch.zeros_like(probs)
    expected[order[:2]] = sorted_p[:2] / sorted_p[:2].sum()
    freqs = _freqs(peaked, SamplingParams(n=n, top_k=2, max_new_tokens=1, seed=6))
    _assert_close_freqs(freqs, expected, n)


def test_distribution_helper_reports_untruncated_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cdf, logp, order = next_token_distribution(logits, 0.5, 0.5, -1)
    assert torch.allclose(logp, torch.log_softmax(logits / 0.5, -1))
    assert order is not None and cdf[0, 0] == cdf[0, -1]  # only the top token survives top_p=0.5


def test_same_seed_same_samples_regardless_of_batching() -> None:
    model = tiny_model(seed=2, scale=5.0)
    prompts = [[3, 4, 5], [7, 8], [9, 10, 11, 12, 13]]
    params = SamplingParams(n=3, max_new_tokens=12, seed=42)
    a = HFEngine(model, eos_token_ids=[1], batch_size=64).generate(prompts, params)
    b = HFEngine(model, eos_token_ids=[1], batch_size=2).generate(prompts, params)
    # The second prompt alone is sample-for-sample the same (seeds depend on the prompt index, so shift it).
    assert [[o.output_ids for o in row] for row in a] == [[o.output_ids for o in row] for row in b]
    c = HFEngine(model, eos_token_ids=[1]).generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=43))
    assert [[o.output_ids for o in row] for row in a] != [[o.output_ids for o in row] for row in c]
    assert len({tuple(o.output_ids) for o in a[0]}) > 1, "the n samples of one prompt must differ"


def test_logprobs_equal_full_forward() -> None:
    model = tiny_model(seed=3, scale=3.0)  # grouped-query attention: 4 heads, 2 KV heads
    engine = HFEngine(model, eos_token_ids=[1])
    # Decode steps use the engine's CPU attention; the reference full forward below goes through SDPA.
    assert model.config._attn_implementation == CPU_DECODE_ATTENTION
    prompts = [[3, 4, 5, 6, 7, 8, 9], [7, 8], [11, 12, 13, 14]]  # different lengths -> left padding
    for temperature in (1.0, 0.6):
        out = engine.generate(prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=16, seed=7))
        for i, row in enumerate(out):
            for o in row:
                ids = torch.tensor([prompts[i] + o.output_ids])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).logits[0].float() / temperature, dim=-1)
                ref = lp[len(prompts[i]) - 1 : -1].gather(-1, ids[0, len(prompts[i]) :, None]).squeeze(-1)
                assert len(o.logprobs) == len(o.output_ids)
                assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-5, rtol=0), (o.logprobs, ref)


def test_stop_on_eos_stop_ids_and_length() -> None:
    model = tiny_model(seed=4, scale=5.0)
    engine = HFEngine(model, eos_token_ids=[1])
    out = engine.generate([[3, 4, 5]], SamplingParams(n=64, max_new_tokens=20, seed=1))[0]
    reasons = {o.finish_reason for o in out}
    for o in out:
        if o.finish_reason == "stop":
            assert o.output_ids[-1] == 1 and 1 not in o.output_ids[:-1]
        else:
            assert o.finish_reason == "length" and len(o.output_ids) == 20 and 1 not in o.output_ids
    assert reasons <= {"stop", "length"}
    # Every token is a stop token -> each sample is exactly one token long.
    stops = tuple(range(32))
    out = engine.generate([[3, 4]], SamplingParams(n=4, max_new_tokens=5, stop_token_ids=stops, seed=1))[0]
    assert all(len(o.output_ids) == 1 and o.finish_reason == "stop" for o in out)
    greedy = engine.generate([[3, 4]], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))[0]
    assert greedy[0].output_ids == greedy[1].output_ids


def test_update_weights_from_stream_and_errors() -> None:
    engine = HFEngine(tiny_model(seed=5), eos_token_ids=[1])
    other = tiny_model(seed=6)
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    engine.update_weights(other.state_dict().items(), version=1)
    assert engine.weight_version == 1
    ref = HFEngine(other, eos_token_ids=[1]).generate([[2, 3]], params)
    got = engine.generate([[2, 3]], params)
    assert [o.output_ids for o in got[0]] == [o.output_ids for o in ref[0]]
    assert all(math.isclose(a, b, abs_tol=1e-6) for o, r in zip(got[0], ref[0]) for a, b in zip(o.logprobs, r.logprobs))

    sd = dict(other.state_dict())
    with pytest.raises(WeightSyncError, match="unknown parameter"):
        engine.update_weights([*sd.items(), ("model.layers.9.mlp.up_proj.weight", torch.zeros(1))], version=2)
    with pytest.raises(WeightSyncError, match="refusing|partial"):
        engine.generate([[2, 3]], params)  # a failed update leaves the engine unusable
    bad = dict(sd)
    bad["model.norm.weight"] = torch.zeros(7)
    with pytest.raises(WeightSyncError, match="shape mismatch"):
        engine.update_weights(bad.items(), version=2)
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(WeightSyncError, match="not in the stream"):
        engine.update_weights(missing.items(), version=2)
    engine.update_weights(sd.items(), version=3)
    assert engine.health()["ok"] and engine.weight_version == 3


def test_build_rollout_engine_hf(tmp_path) -> None:
    path = save_tiny_model(tmp_path / "m", seed=7)
    engine = build_rollout_engine(RolloutConfig(backend="hf", hf_batch_size=8), path)
    assert isinstance(engine, HFEngine) and engine.eos_token_ids == (1,)
    out = engine.generate([[2, 3], [4]], SamplingParams(n=3, max_new_tokens=4, seed=0))
    assert [len(r) for r in out] == [3, 3] and [o.prompt_index for o in out[1]] == [1, 1, 1]
    with pytest.raises(ValueError, match="backend"):
        build_rollout_engine(RolloutConfig(backend="vllm"), path)
    sp = SamplingParams.from_config(RolloutConfig(n=8, n_off=1, temperature=0.9, seed=5), max_new_tokens=64)
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sp.seed) == (8, 0.9, 1.0, -1, 64, 5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_per_prompt_counts_return_the_same_samples_as_a_full_request() -> None:
    """Exact counts: each prompt's samples are a prefix of what ``n`` per prompt gives (same tokens, log-probs)."""
    model = tiny_model(seed=8, scale=5.0)
    # Mixed prompt lengths and a length limit that some samples reach and others do not (EOS = 1).
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [7, 8], [12, 13, 14, 15], [16]]
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=24, seed=11)
    full = HFEngine(model, eos_token_ids=[1]).generate(prompts, params)
    counts = [5, 6, 0, 3]
    part = HFEngine(model, eos_token_ids=[1], batch_size=3).generate(prompts, params, counts)
    assert [len(row) for row in part] == counts
    lengths = {len(o.output_ids) for row in full for o in row}
    assert len(lengths) > 2, lengths  # a real mix of response lengths
    for row, ref, c in zip(part, full, counts):
        assert [o.output_ids for o in row] == [o.output_ids for o in ref[:c]]
        assert [o.sample_index for o in row] == list(range(c))
        for o, r in zip(row, ref):
            assert o.finish_reason == r.finish_reason
            assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-5, rtol=0)
    # A different count for one prompt leaves the others' samples unchanged.
    other = HFEngine(model, eos_token_ids=[1]).generate(prompts, params, [1, 1, 1, 1])
    assert [row[0].output_ids for row in other] == [row[0].output_ids for row in full]
    assert HFEngine(model, eos_token_ids=[1]).generate(prompts, params, [0, 0, 0, 0]) == [[], [], [], []]


def test_bad_counts_are_rejected() -> None:
    engine = HFEngine(tiny_model(seed=8), eos_token_ids=[1])
    params = SamplingParams(n=2, max_new_tokens=2, seed=1)
    with pytest.raises(ValueError, match="3 counts for 2 prompts"):
        engine.generate([[2], [3]], params, [1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        engine.generate([[2], [3]], params, [1, -1])


def test_per_expert_tensors_reach_a_model_with_fused_experts(tmp_path) -> None:
    """A Qwen3-MoE checkpoint and the trainer's export name one tensor per expert; transformers >= 5 keeps them fused
    (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and ``down_proj``): the stream lands there, and a
    stream that lacks one expert's half is incomplete."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from luffy_megatron.models.tiny import make_tiny_model

    moe = {"num_experts": 4, "num_experts_per_tok": 2}
    first, second = (make_tiny_model(tmp_path / f"m{s}", "qwen3_moe", seed=s, moe=moe) for s in (1, 2))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    engine, other = HFEngine(load(first), eos_token_ids=[1]), load(second)
    stream = load_file(second / "model.safetensors")
    assert (
        "model.layers.0.mlp.experts.3.up_proj.weight" in stream
        and "model.layers.0.mlp.experts.gate_up_proj" in dict(other.named_parameters())
    )
    engine.update_weights(stream.items(), version=1)
    for (name, got), want in zip(engine.model.named_parameters(), other.parameters()):
        assert torch.equal(got, want), name
    params = SamplingParams(n=2, max_new_tokens=6, seed=3)
    ref = HFEngine(other, eos_token_ids=[1]).generate([[2, 3]], params)
    assert [o.logprobs for o in engine.generate([[2, 3]], params)[0]] == [o.logprobs for o in ref[0]]
    stream.pop("model.layers.1.mlp.experts.2.up_proj.weight")
    with pytest.raises(WeightSyncError, match=r"not in the stream, e.g. \['model.layers.1.mlp.experts.gate_up_proj'\]"):
        engine.update_weights(stream.items(), version=2)
