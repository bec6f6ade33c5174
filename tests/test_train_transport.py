"""The step batch as tensors (luffy_megatron.train.transport): rank 0's StepBatch arrives on every rank equal field
by field (dtypes, shapes and float bits included) on a realistic length mix, without per-sample work on the
receivers, in the narrowest exact dtypes; a failure on rank 0 reaches the other ranks as RankFailure before any
tensor is sent."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist

from luffy_megatron.train import transport
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.step_batch import StepBatch
from luffy_megatron.train.transport import broadcast_batch, pack_batch, rank0_batch, unpack_batch
from tests.dist_utils import run_distributed
from tools.bench_step_batch import step_batch


def make_samples(seed: int, wide: bool = False) -> list[Sample]:
    """LUFFY's length mix scaled down 4x (prompts 20-100 tokens, responses median ~370 capped at 2,048; one trace
    without log-probs per group of 8) plus the corner cases: an empty response, multiplicity > 1, old log-probs, a
    -0.0 advantage, every finish reason. ``wide``: a token id beyond int32 (the int64 path)."""
    samples = step_batch(8, 8, seed, scale=4)
    rng = np.random.default_rng(seed + 1)
    samples[1].response_ids, samples[1].rollout_logprobs, samples[1].finish_reason = [], [], "abort"
    samples[2].multiplicity = 3
    for s in samples[8:16]:
        s.old_logprobs = (-rng.exponential(0.7, len(s.response_ids))).astype(np.float32).tolist()
    samples[3].advantage = -0.0
    samples[4].finish_reason = "length"
    if wide:
        samples[5].response_ids[0] = 2**40
    return samples


def make_batch(seed: int, wide: bool = False) -> StepBatch:
    return StepBatch.from_samples(make_samples(seed, wide))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits: 0.0 differs from -0.0, a NaN equals itself, a value one ulp away shows."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def differences(want: StepBatch, got: StepBatch) -> list[str]:
    """The fields in which ``got`` is not ``want``: dtype, shape or bits."""
    out = []
    for f in dataclasses.fields(StepBatch):
        a, b = getattr(want, f.name), getattr(got, f.name)
        if isinstance(a, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
        else:
            same = a == b
        if not same:
            out.append(f.name)
    return out


def test_the_batch_is_realistic_and_has_its_corner_cases():
    samples = make_samples(0)
    on = sorted(len(s.response_ids) for s in samples if not s.off_policy and s.response_ids)
    assert len(samples) == 64 and 200 < on[len(on) // 2] < 550 and max(on) <= 2048
    assert all(20 <= len(s.prompt_ids) <= 100 for s in samples)
    assert sum(s.rollout_logprobs is None for s in samples) == 8 and [] in [s.response_ids for s in samples]
    batch = make_batch(0)
    assert batch.num_samples == 64 and batch.num_tokens == sum(s.num_tokens for s in samples)
    assert set(batch.reasons) == {"stop", "abort", "length"} and batch.multiplicity[2] == 3
    assert bool(batch.old_logprobs.any()) and batch.has_rollout_logprobs.sum() == 56


def test_pack_and_unpack_round_trip_with_the_narrowest_exact_dtypes():
    for wide, dtypes in (
        (False, [torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64]),
        (True, [torch.uint8, torch.int64, torch.float32, torch.float64]),
    ):
        want = make_batch(1, wide)
        packed = pack_batch(want)
        assert [b.dtype for b in packed.buffers.values()] == dtypes
        got = unpack_batch(packed.header, packed.buffers)
        assert differences(want, got) == []
    # The check sees what it claims to: a float off by one ulp, -0.0 for 0.0, a wider dtype.
    got.rollout_logprobs = got.rollout_logprobs.clone()
    i = int(got.rollout_logprobs.nonzero()[0])
    got.rollout_logprobs[i] = float(np.nextafter(np.float32(got.rollout_logprobs[i]), np.float32(0)))
    got.advantage, got.multiplicity = got.advantage.abs(), got.multiplicity.int()
    assert differences(want, got) == ["advantage", "multiplicity", "rollout_logprobs"]
    empty = StepBatch.from_samples([])
    assert differences(empty, unpack_batch(*dataclasses.astuple(pack_batch(empty)))) == []
    # Before the policy wrote them, the old log-probs are all +0.0 and do not travel.
    fresh = make_batch(1)
    fresh.old_logprobs = torch.zeros_like(fresh.old_logprobs)
    packed = pack_batch(fresh)
    assert (
        packed.buffers[3].numel() == fresh.num_tokens
        and differences(fresh, unpack_batch(*dataclasses.astuple(packed))) == []
    )


def round_trip_cases(rank: int, world: int) -> dict:
    out = {}
    for seed, wide in ((2, False), (3, True)):
        want = make_batch(seed, wide)
        got = broadcast_batch(want if rank == 0 else None)
        out[wide] = (differences(want, got), got is want)
    out["empty"] = differences(
        StepBatch.from_samples([]), broadcast_batch(StepBatch.from_samples([]) if rank == 0 else None)
    )
    want = make_batch(4)
    got, metrics = rank0_batch(lambda: (make_batch(4), {"rollout/weight_staleness": 0.0}), "step 1: rollout")
    out["rank0_batch"] = (differences(want, got), metrics)
    return out


def test_every_rank_gets_rank0s_batch_exactly():
    rank0, rank1 = run_distributed(round_trip_cases, 2, timeout_s=180)
    for wide in (False, True):
        assert rank0[wide] == ([], True) and rank1[wide] == ([], False)  # rank 0 keeps its own batch
    assert rank0["empty"] == rank1["empty"] == []
    assert rank0["rank0_batch"] == rank1["rank0_batch"] == ([], {"rollout/weight_staleness": 0.0})


def _outcome(fn) -> str:
    try:
        batch, metrics = fn()
        return f"ok {batch.num_samples} {metrics}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def failure_cases(rank: int, world: int) -> list[str]:
    def rollout_fails():
        assert dist.get_rank() == 0, "ran on another rank"
        raise ConnectionError("rollout server 10.0.0.7:30000 refused")

    def unpackable():  # a finish reason that is no text: packing fails on rank 0
        return dataclasses.replace(make_batch(5), reasons=("\ud800",)), {}

    return [
        _outcome(lambda: rank0_batch(rollout_fails, "step 3: rollout or reward", "nothing was trained")),
        _outcome(lambda: rank0_batch(unpackable, "step 4: rollout or reward")),
        _outcome(lambda: (broadcast_batch(unpackable()[0] if rank == 0 else None), {})),
        _outcome(lambda: rank0_batch(lambda: (make_batch(6), {"m": 1.0}), "step 5")),  # the group still works
    ]


def test_a_failure_on_rank0_reaches_rank1_as_rank_failure():
    rank0, rank1 = run_distributed(failure_cases, 2, timeout_s=180)
    assert rank0[0] == "ConnectionError: rollout server 10.0.0.7:30000 refused"
    assert rank1[0] == (
        "RankFailure: step 3: rollout or reward failed on rank 0 (ConnectionError: rollout server 10.0.0.7:30000 "
        "refused); nothing was trained"
    )
    for r0, r1, what in (
        (rank0[1], rank1[1], "step 4: rollout or reward"),
        (rank0[2], rank1[2], "packing the batch"),
    ):
        assert r0.startswith("UnicodeEncodeError: ") and r1 == f"RankFailure: {what} failed on rank 0 ({r0})"
    assert rank0[3] == rank1[3] == "ok 64 {'m': 1.0}"


@contextlib.contextmanager
def world_of_one():
    """A gloo process group of one in this process; an earlier in-process test (e.g. gpu_check's) may have left one."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_process_sends_nothing(monkeypatch):
    batch = make_batch(7)
    result = (batch, {"a": 1.0})
    if not dist.is_initialized():  # no process group at all
        assert broadcast_batch(batch) is batch and broadcast_batch(None).num_samples == 0
        assert rank0_batch(lambda: result, "x") is result
    with world_of_one():
        for name in ("broadcast", "broadcast_object_list"):
            monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("a collective at world size 1"))
        assert broadcast_batch(batch) is batch and rank0_batch(lambda: result, "x") is result
        monkeypatch.undo()


def test_the_buffers_live_where_the_backend_moves_them(monkeypatch):
    with world_of_one():
        assert transport._device() == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert transport._device() == torch.device("cuda", 3)
        monkeypatch.undo()


@pytest.mark.parametrize("arg", [["--prompts", "0"], ["--n", "1"], ["--repeats", "0"], ["--scale", "0"]])
def test_benchmark_rejects_sizes_it_cannot_send(arg, capsys):
    from tools.bench_step_batch import main

    with pytest.raises(SystemExit) as exc:
        main(arg)
    assert exc.value.code == 2 and f"{arg[0]} must be >= " in capsys.readouterr().err
