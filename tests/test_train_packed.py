"""Packed sequences (THD): the packed micro-batch, the per-sample attention and the packed policy update.

The update with ``parallel.pack_sequences=true`` (one packed row per micro-batch, variable shapes under pipeline
parallelism) must equal the right-padded update (loss, grad norm, updated weights and log-probs; fp32, relative
1e-5) at TP=1, TP=2, PP=2, PP=2 x VPP=2 and DP=2, on a length mix shaped like LUFFY's (short prompts, log-normal
responses, long traces).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from luffy_megatron.train.batch import (
    FlatMicroBatch,
    flatten_padded,
    make_micro_batch,
    micro_batch_tokens,
    pack_micro_batch,
    segment_positions,
)
from luffy_megatron.train.samples import Sample, pack_micro_batches, round_up
from luffy_megatron.train.step_batch import StepBatch, compact_batch
from tests import upstream
from tests.dist_utils import run_distributed
from tests.fixtures_models import tiny_checkpoint

REL_TOL = 1e-5
LR = 1e-2


def luffy_like_samples(vocab: int, prompts: int = 6, n: int = 4, seed: int = 0, scale: float = 1 / 40) -> list[Sample]:
    """LUFFY's length mix scaled by ``scale``: prompts 80-400 tokens, ``n - 1`` on-policy responses log-normal with a
    median of ~1,500 capped at 8,192, one trace of 1,500-8,192 tokens per prompt; advantages and engine log-probs."""
    rng = random.Random(seed)

    def seq(length: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(max(1, round(length * scale)))]

    samples = []
    for g in range(prompts):
        prompt = seq(rng.randint(80, 400))
        for j in range(n):
            off = j == n - 1
            length = rng.randint(1500, 8192) if off else min(8192, int(rng.lognormvariate(7.3, 0.7)))
            response = seq(length)
            logps = None if off else [-rng.random() * 3 for _ in response]
            samples.append(
                Sample(g, g, prompt, response, off, rollout_logprobs=logps, reward=float(rng.random() < 0.4))
            )
    from luffy_megatron.algo import compute_advantages

    adv = compute_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group_id for s in samples]))
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a
        s.old_logprobs = None if s.off_policy else [x - 0.01 for x in s.rollout_logprobs]
    return samples


def response_logprobs(policy, batch: StepBatch) -> list[list[float]]:
    """The policy's log-probs of every sample's response tokens (a forward on every rank), per sample."""
    return [v.tolist() for v in batch.per_response(policy.compute_logprobs(batch))]


# ----------------------------------------------------------------------------------------------------------------
# The packed micro-batch
def test_packed_micro_batch_holds_the_padded_rows_loss_inputs():
    samples = luffy_like_samples(vocab=50)
    ids = [3, 0, 7, 5]
    batch = StepBatch.from_samples(samples)
    packed = pack_micro_batch(batch, ids, pad_id=-1, alignment=8)
    padded = flatten_padded(make_micro_batch(batch, ids, pad_id=-1))
    lengths = [samples[i].num_tokens for i in ids]
    total = round_up(sum(lengths), 8)
    assert packed.tokens.shape == (1, total) and packed.num_tokens == total
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()] + ([total] if total > sum(lengths) else [])
    assert packed.cu_seqlens.tolist() == cu and packed.cu_seqlens.dtype == torch.int32
    assert packed.position_ids[0].tolist() == [t for a, b in zip(cu, cu[1:]) for t in range(b - a)]
    assert packed.tokens[0, sum(lengths) :].eq(-1).all()
    # Token by token, the padded rows' response positions (in row order) are the packed row's.
    keep = padded.response_mask
    assert packed.response_mask.sum() == keep.sum() == sum(len(samples[i].response_ids) for i in ids)
    for name in ("targets", "advantages", "old_logprobs", "rollout_logprobs", "multiplicity"):
        assert torch.equal(getattr(packed, name)[packed.response_mask], getattr(padded, name)[keep]), name
    for name in ("off_policy_mask", "has_rollout_logprobs"):
        assert torch.equal(getattr(packed, name)[packed.response_mask], getattr(padded, name)[keep]), name
    assert torch.equal(packed.seq_index[packed.response_mask], padded.seq_index[keep])
    # Nothing outside the responses carries a loss input.
    for name in ("advantages", "old_logprobs", "rollout_logprobs", "multiplicity"):
        assert getattr(packed, name)[~packed.response_mask].eq(0).all(), name
    # The last token of a sample predicts nothing (never the next sample's first token).
    ends = torch.tensor(cu[1 : len(ids) + 1]) - 1
    assert packed.targets[ends].eq(-1).all() and not packed.response_mask[ends].any()


def cuts(batch: StepBatch, ids: list[int]) -> dict[str, FlatMicroBatch]:
    """Samples ``ids`` of ``batch`` as a packed and as a right-padded micro-batch."""
    return {
        "packed": pack_micro_batch(batch, ids, pad_id=-1, alignment=8),
        "padded": flatten_padded(make_micro_batch(batch, ids, pad_id=-1)),
    }


def differing_fields(a: FlatMicroBatch, b: FlatMicroBatch) -> list[str]:
    return [
        name
        for name, x in vars(a).items()
        if not (torch.equal(x, getattr(b, name)) if isinstance(x, torch.Tensor) else x == getattr(b, name))
    ]


def test_a_micro_batch_cut_from_a_selection_equals_one_cut_directly():
    """Mini-batches and the compacted batch are index selections: a micro-batch cut out of one holds what the same
    samples cut out of the whole batch hold (its ``sample_ids`` index the selection; compaction sets multiplicities)."""
    batch = StepBatch.from_samples(luffy_like_samples(vocab=50))
    mini = batch.select(batch.mini_batch_ids(3)[1])
    assert mini.group_id.tolist() == [2] * 4 + [3] * 4
    for layout, mb in cuts(mini, [1, 6, 3]).items():
        direct = cuts(batch, [9, 14, 11])[layout]
        assert mb.sample_ids == [1, 6, 3] and differing_fields(mb, direct) == ["sample_ids"], layout
    compacted = compact_batch(batch.select([9, 14, 9, 11, 14, 14]), drop_zero_advantage=False)
    assert compacted.multiplicity.tolist() == [2, 3, 1]
    for layout, mb in cuts(compacted, [0, 1, 2]).items():
        direct = cuts(batch, [9, 14, 11])[layout]
        assert differing_fields(mb, direct) == ["sample_ids", "multiplicity"], layout
        assert torch.equal(mb.multiplicity, direct.multiplicity * torch.tensor([2.0, 3.0, 1.0, 0.0])[mb.seq_index])


def test_old_logprobs_written_into_the_batch_reach_the_micro_batches():
    """The policy's old log-probs, written into the step batch's per-token tensor, are what every selection and both
    micro-batch layouts hand to the loss: at each response position, the log-prob of the token it predicts."""
    batch = StepBatch.from_samples(luffy_like_samples(vocab=50))
    batch.old_logprobs = -torch.arange(batch.num_tokens, dtype=torch.float32) * batch.response_token_mask()
    mini = batch.select(batch.mini_batch_ids(2)[1])
    want = torch.cat([mini.per_response(mini.old_logprobs)[i] for i in (4, 0, 2)])
    assert torch.equal(want, torch.cat([batch.per_response(batch.old_logprobs)[i] for i in (16, 12, 14)]))
    for layout, mb in cuts(mini, [4, 0, 2]).items():
        assert torch.equal(mb.old_logprobs[mb.response_mask], want), layout
        assert mb.old_logprobs[~mb.response_mask].eq(0).all(), layout


def test_an_empty_packed_micro_batch_is_one_aligned_row_of_padding():
    mb = pack_micro_batch(StepBatch.from_samples(luffy_like_samples(vocab=50)), [], pad_id=0, alignment=4)
    assert mb.tokens.shape == (1, 4) and mb.cu_seqlens.tolist() == [0, 4] and not mb.response_mask.any()


def test_segment_positions_restart_per_segment():
    assert segment_positions(torch.tensor([0, 3, 5, 9])).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_packed_plan_fills_the_budget_and_pads_only_to_the_alignment(ranks):
    samples = luffy_like_samples(vocab=50, prompts=64, n=8, scale=1.0)
    lengths = [s.num_tokens for s in samples]
    plan = pack_micro_batches(lengths, 16384, ranks, packed=True, alignment=8)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(samples)))
    assert len({len(rank) for rank in plan}) == 1  # the same number of micro-batches on every rank
    sizes = micro_batch_tokens(plan, lengths, packed=True, alignment=8)
    assert max(sizes) <= 16384
    assert sum(sizes) - sum(lengths) <= 7 * len(sizes)  # at most the alignment remainder per micro-batch
    # The padded plan under pipeline parallelism computes several times the real tokens (the measurement).
    padded = pack_micro_batches(lengths, 16384, ranks)
    assert sum(micro_batch_tokens(padded, lengths, packed=False, common_shape=True)) > 2 * sum(lengths)


def test_a_sample_longer_than_the_budget_is_its_own_micro_batch():
    plan = pack_micro_batches([50, 10, 30, 25], 40, 1, packed=True)
    assert sorted(map(sorted, plan[0])) == [[0], [1, 2], [3]]  # first fit, longest first: 50 | 30 + 10 | 25


def test_interleaved_pipeline_gets_a_multiple_of_pp_micro_batches():
    lengths = [30, 20, 20, 10, 10]
    for packed in (True, False):
        plan = pack_micro_batches(lengths, 40, 2, packed=packed, count_multiple=2)
        assert [len(rank) for rank in plan] == [2, 2]
        assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(5))
    assert len(pack_micro_batches(lengths, 100, 1, packed=True, count_multiple=4)[0]) == 4


# ----------------------------------------------------------------------------------------------------------------
# The contract with megatron-core 0.19.2 (installed) and transformer-engine 2.20.2 (pinned wheel)
def test_packed_seq_params_reach_transformer_engine_as_it_expects():
    from megatron.core.packed_seq_params import PackedSeqParams

    from luffy_megatron.platform.packed_attention import packed_seq_params

    params = packed_seq_params(torch.tensor([0, 5, 7, 12]))
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == params.cu_seqlens_kv.dtype == torch.int32
    assert (params.max_seqlen_q, params.max_seqlen_kv) == (5, 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_seq_params(torch.tensor([0, 5, 5, 9]))
    # megatron's TEDotProductAttention.forward passes every PackedSeqParams field as a keyword of TE's
    # DotProductAttention.forward, except those it discards.
    # (Read as text: without TE installed megatron replaces the class by a placeholder.)
    mte_src = Path(importlib.util.find_spec("megatron.core.extensions.transformer_engine").origin).read_text()
    te_dpa = next(
        n for n in ast.parse(mte_src).body if isinstance(n, ast.ClassDef) and n.name == "TEDotProductAttention"
    )
    assert "getattr(packed_seq_params, key) for key in self.kept_packed_seq_params" in ast.unparse(te_dpa)

    def discards(node: ast.AST) -> set[str]:
        calls = (n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "discard")
        return {c.args[0].value for c in calls}

    # Discards under `if get_te_version() < X` concern older TE releases than the pinned one.
    old_te = set()
    for node in ast.walk(te_dpa):
        if isinstance(node, ast.If) and "get_te_version() <" in ast.unparse(node.test):
            [bound] = [c.args[0].value for c in ast.walk(node.test) if isinstance(c, ast.Call) and c.args]
            assert Version(bound) <= Version(upstream.pinned_version("transformer-engine"))
            old_te |= discards(node)
    discarded = discards(te_dpa) - old_te
    kept = {f.name for f in dataclasses.fields(PackedSeqParams)} - discarded
    te_src = upstream.source(
        "transformer-engine", "transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py"
    )
    cls = next(n for n in ast.parse(te_src).body if isinstance(n, ast.ClassDef) and n.name == "DotProductAttention")
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    te_args = {a.arg for a in forward.args.args + forward.args.kwonlyargs}
    ours = {f.name for f in dataclasses.fields(params) if getattr(params, f.name) is not None}
    assert {"qkv_format", "cu_seqlens_q", "cu_seqlens_kv", "max_seqlen_q", "max_seqlen_kv"} <= ours & kept
    assert kept <= te_args, sorted(kept - te_args)
    doc = ast.get_docstring(forward) or ""
    assert "cu_seqlens_q" in doc and "torch.int32" in doc  # TE documents int32 offsets
    assert '"thd"' in te_src or "'thd'" in te_src


# ----------------------------------------------------------------------------------------------------------------
# The model: a packed row computes what each sample computes alone
def packed_forward(rank: int, world: int, hf_dir: str) -> dict:
    from luffy_megatron.config import read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.platform.packed_attention import packed_seq_params

    setup_platform()
    init_model_parallel(1, 1, None, seed=1)
    spec = model_spec(read_hf_config(hf_dir), 1)
    [model] = build_gpt_model(spec, build_transformer_config(spec), use_transformer_engine=False)
    load_hf_weights([model], spec, hf_dir)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 5]
    seqs = [torch.randint(0, spec.vocab_size, (n,), generator=gen) for n in lengths]
    row = torch.cat(seqs).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        alone = [model(s.unsqueeze(0), torch.arange(len(s)).unsqueeze(0), attention_mask=None)[0] for s in seqs]
        packed = model(
            row, segment_positions(cu).unsqueeze(0), attention_mask=None, packed_seq_params=packed_seq_params(cu)
        )
        plain = model(row, torch.arange(row.shape[1]).unsqueeze(0), attention_mask=None)
        syncs = packed_forward_syncs(model, row, cu)
    # numpy arrays travel by value (torch tensors would be shared through files the finished worker removes)
    return {"alone": torch.cat(alone).numpy(), "packed": packed[0].numpy(), "plain": plain[0].numpy(), "syncs": syncs}


def packed_forward_syncs(model, row: torch.Tensor, cu: torch.Tensor) -> list[str]:
    """The host syncs of a packed forward outside the core attention (TE's kernel on a GPU, the per-segment CPU
    stand-in here): embedding, RoPE, norms, MLPs, output layer."""
    from luffy_megatron.platform.packed_attention import PackedDotProductAttention, packed_seq_params
    from tests.test_hot_path_syncs import HostSyncs

    params, positions = packed_seq_params(cu), segment_positions(cu).unsqueeze(0)
    core = PackedDotProductAttention.forward
    with HostSyncs() as rec:

        def core_unrecorded(self, *args, **kwargs):
            rec.paused = True
            try:
                return core(self, *args, **kwargs)
            finally:
                rec.paused = False

        PackedDotProductAttention.forward = core_unrecorded
        try:
            model(row, positions, attention_mask=None, packed_seq_params=params)
        finally:
            PackedDotProductAttention.forward = core
    return rec.calls


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_packed_row_equals_each_sample_alone(family):
    got = {
        k: v if k == "syncs" else torch.from_numpy(v)
        for k, v in run_distributed(packed_forward, 1, str(tiny_checkpoint(family)))[0].items()
    }
    syncs = got.pop("syncs")
    torch.testing.assert_close(got["packed"], got["alone"], rtol=1e-5, atol=1e-5)
    assert syncs == [], f"host syncs in a packed forward outside the core attention: {syncs}"
    # Without the packing parameters later samples attend to earlier ones: the comparison can fail.
    assert (got["plain"] - got["alone"]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# The update: packed equals padded at every layout
def update_overrides(hf_dir: str, tp: int, pp: int, pack: bool, *extra: str) -> list[str]:
    """The config of the equality tests' one update (fp32, micro-batches of 400 tokens, lr 1e-2), plus ``extra``."""
    return [
        f"model.hf_path={hf_dir}",
        "model.dtype=float32",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        "parallel.max_tokens_per_micro_batch=400",
        f"parallel.pack_sequences={str(pack).lower()}",
        "algorithm.loss_agg_mode=seq_mean_token_mean",
        "algorithm.entropy_coeff=0.01",
        f"optimizer.lr={LR}",
        # Adam's first step moves a weight by lr * g / (|g| + eps), whatever the size of g: near-zero gradients, whose
        # fp32 rounding differs between any two summation orders, move their weights by up to lr / 2. eps = 1e-6 damps
        # that; the weights are then compared to 1e-4 of the step lr, the gradients themselves to rel 1e-5.
        "optimizer.adam_eps=1e-6",
        "data.max_response_length=256",
        *extra,
    ]


def train_packing(rank: int, world: int, hf_dir: str, tp: int, pp: int, vpp: int | None, pack: bool) -> dict:
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.convert.load import load_hf_weights
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform
    from luffy_megatron.train.policy import MegatronPolicy

    setup_platform()
    init_model_parallel(tp, pp, vpp, seed=1)
    overrides = update_overrides(hf_dir, tp, pp, pack, *([f"parallel.vpp={vpp}"] if vpp else []))
    cfg = load_config(None, overrides)
    spec = model_spec(read_hf_config(hf_dir), tp)
    policy = MegatronPolicy(cfg, spec, pad_id=0)
    load_hf_weights(policy.modules, spec, hf_dir)
    batch = StepBatch.from_samples(luffy_like_samples(spec.vocab_size))
    before = response_logprobs(policy, batch)
    metrics = policy.train_mini_batch(batch, use_old_logprobs=True)
    stats = policy.take_token_stats()
    after = response_logprobs(policy, batch)
    named = [(n, p) for m in policy.modules for n, p in m.named_parameters()]
    params = {n: p.detach().numpy().copy() for n, p in named}
    grads = {n: p.main_grad.detach().numpy().copy() for n, p in named}  # DDP's buffer: kept until the next update
    return {"metrics": metrics, "stats": stats, "before": before, "after": after, "params": params, "grads": grads}


PACK_LAYOUTS = {  # name: (world, tp, pp, vpp)
    "tp1": (1, 1, 1, None),
    "tp2": (2, 2, 1, None),
    "pp2": (2, 1, 2, None),
    "pp2_vpp2": (2, 1, 2, 2),
    "dp2": (2, 1, 1, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PACK_LAYOUTS))
def test_packed_update_equals_padded_update(layout):
    world, tp, pp, vpp = PACK_LAYOUTS[layout]
    hf_dir = str(tiny_checkpoint("llama"))
    packed = run_distributed(train_packing, world, hf_dir, tp, pp, vpp, True)
    padded = run_distributed(train_packing, world, hf_dir, tp, pp, vpp, False)
    keys = ("grad_norm", "actor/loss", "actor/pg_loss", "actor/entropy", "actor/ppo_kl", "train_rollout_logprob_gap")
    for key in keys:
        assert packed[0]["metrics"][key] == pytest.approx(padded[0]["metrics"][key], rel=REL_TOL), key
    for a, b in zip(padded[0]["before"] + padded[0]["after"], packed[0]["before"] + packed[0]["after"]):
        assert b == pytest.approx(a, rel=REL_TOL, abs=1e-6)
    for rank in range(world):  # every rank's shard of the gradients and of the updated weights
        for name, p in padded[rank]["params"].items():
            g, g_ref = (torch.from_numpy(r[rank]["grads"][name]) for r in (packed, padded))
            torch.testing.assert_close(g, g_ref, rtol=REL_TOL, atol=REL_TOL * float(g_ref.abs().max()))
            w = torch.from_numpy(packed[rank]["params"][name])
            torch.testing.assert_close(w, torch.from_numpy(p), rtol=REL_TOL, atol=1e-4 * LR)
    moved = max(abs(x - y) for a, b in zip(padded[0]["before"], padded[0]["after"]) for x, y in zip(a, b))
    assert moved > 1e-3  # the update moved the log-probs: the comparison is not vacuous
    # Token accounting: packed computes the real tokens (at TP > 1 each row rounded up to a multiple of TP for
    # sequence parallelism, on by default), padded computes more.
    stats = packed[0]["stats"]
    if tp == 1:
        assert stats["perf/padding_ratio"] == 1.0
    else:  # each row by fewer than tp tokens
        assert stats["perf/update_computed_tokens"] % tp == 0
        assert stats["perf/update_computed_tokens"] - stats["perf/update_real_tokens"] < tp * len(packed[0]["before"])
    assert packed[0]["stats"]["perf/max_micro_batch_tokens"] <= 400
    assert padded[0]["stats"]["perf/padding_ratio"] > 1.0
