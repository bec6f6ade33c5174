"""The step batch as flat tensors (luffy_megatron.train.transport): rank 0's samples arrive on every rank equal field
by field (types and float bits included) on a realistic length mix, the dtypes are the narrowest exact ones, and a
failure on rank 0 reaches the other ranks as RankFailure before any tensor is sent."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import numpy as np
import pytest
import torch
import torch.distributed as dist

from luffy_megatron.train import transport
from luffy_megatron.train.samples import Sample
from luffy_megatron.train.transport import broadcast_samples, pack_samples, rank0_batch, unpack_samples
from tests.dist_utils import run_distributed
from tools.bench_step_batch import step_batch


def make_batch(seed: int, wide: bool = False) -> list[Sample]:
    """LUFFY's length mix scaled down 4x (prompts 20-100 tokens, responses median ~370 capped at 2,048; one trace
    without log-probs per group of 8, prompt lists shared within a group) plus the corner cases: an empty response,
    multiplicity > 1, old log-probs, a -0.0 advantage, every finish reason. ``wide``: a token id beyond int32 and a
    log-prob that is not exact in fp32 (the int64 / fp64 path)."""
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
        samples[6].rollout_logprobs[0] = 0.1
        samples[9].old_logprobs[-1] = -1 / 3
    return samples


def exact(value):
    """A value with its type and, for floats, its bits (so 0.0 != -0.0 and fp32-rounded values show)."""
    if isinstance(value, list):
        return ("list", tuple(exact(v) for v in value))
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    return (type(value).__name__, value)


def differences(want: list[Sample], got: list[Sample]) -> list[str]:
    if len(want) != len(got):
        return [f"{len(got)} samples, want {len(want)}"]
    return [
        f"sample {i}: {f.name}"
        for i, (a, b) in enumerate(zip(want, got))
        for f in dataclasses.fields(Sample)
        if exact(getattr(a, f.name)) != exact(getattr(b, f.name))
    ]


def shared_prompts(samples: list[Sample]) -> list[bool]:
    return [a.prompt_ids is b.prompt_ids for a, b in zip(samples, samples[1:])]


def test_the_batch_is_realistic_and_has_its_corner_cases():
    samples = make_batch(0)
    on = sorted(len(s.response_ids) for s in samples if not s.off_policy and s.response_ids)
    assert len(samples) == 64 and 200 < on[len(on) // 2] < 550 and max(on) <= 2048
    assert all(20 <= len(s.prompt_ids) <= 100 for s in samples)
    assert sum(s.rollout_logprobs is None for s in samples) == 8 and [] in [s.response_ids for s in samples]
    assert shared_prompts(samples) == [i % 8 != 7 for i in range(63)]


def test_pack_and_unpack_round_trip_with_the_narrowest_exact_dtypes():
    for wide, dtypes in ((False, ["int32", "int64", "float32", "float64"]), (True, ["int64", "float64"])):
        want = make_batch(1, wide)
        packed = pack_samples(make_batch(1, wide))
        assert [str(b.dtype) for b in packed.buffers.values()] == dtypes
        got = unpack_samples(packed.header, packed.buffers)
        assert differences(want, got) == [] and got == want
        assert shared_prompts(got) == shared_prompts(want)
    # The check sees what it claims to: a float off by one ulp, an int as a float, a -0.0 for 0.0.
    got[6].rollout_logprobs[1] = float(np.nextafter(got[6].rollout_logprobs[1], 0))
    got[7].multiplicity, got[3].advantage = 1.0, 0.0
    assert differences(want, got) == ["sample 3: advantage", "sample 6: rollout_logprobs", "sample 7: multiplicity"]
    assert unpack_samples(*dataclasses.astuple(pack_samples([]))) == []


def round_trip_cases(rank: int, world: int) -> dict:
    out = {}
    for seed, wide in ((2, False), (3, True)):
        want = make_batch(seed, wide)
        got = broadcast_samples(want if rank == 0 else None)
        out[wide] = (differences(want, got), shared_prompts(got), got is want)
    out["empty"] = broadcast_samples([] if rank == 0 else None)
    want = make_batch(4)
    got, metrics = rank0_batch(lambda: (make_batch(4), {"rollout/weight_staleness": 0.0}), "step 1: rollout")
    out["rank0_batch"] = (differences(want, got), metrics)
    return out


def test_every_rank_gets_rank0s_samples_exactly():
    rank0, rank1 = run_distributed(round_trip_cases, 2, timeout_s=180)
    for wide in (False, True):
        assert rank0[wide][2] is True and rank1[wide][2] is False  # rank 0 keeps its own list
        assert rank1[wide][0] == [] and rank1[wide][1] == rank0[wide][1] == [i % 8 != 7 for i in range(63)]
    assert rank0["empty"] == rank1["empty"] == []
    assert rank0["rank0_batch"] == rank1["rank0_batch"] == ([], {"rollout/weight_staleness": 0.0})


def _outcome(fn) -> str:
    try:
        samples, metrics = fn()
        return f"ok {len(samples)} {metrics}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def failure_cases(rank: int, world: int) -> list[str]:
    def rollout_fails():
        assert dist.get_rank() == 0, "ran on another rank"
        raise ConnectionError("rollout server 10.0.0.7:30000 refused")

    def unpackable():  # a token id that is no integer: packing fails on rank 0
        bad = make_batch(5)
        bad[3].response_ids[2] = "x"
        return bad, {}

    return [
        _outcome(lambda: rank0_batch(rollout_fails, "step 3: rollout or reward", "nothing was trained")),
        _outcome(lambda: rank0_batch(unpackable, "step 4: rollout or reward")),
        _outcome(lambda: (broadcast_samples(unpackable()[0] if rank == 0 else None), {})),
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
        (rank0[2], rank1[2], "packing the samples"),
    ):
        assert r0.startswith("ValueError: ") and r1 == f"RankFailure: {what} failed on rank 0 ({r0})"
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
    samples = make_batch(7)
    result = (samples, {"a": 1.0})
    if not dist.is_initialized():  # no process group at all
        assert broadcast_samples(samples) is samples and broadcast_samples(None) == []
        assert rank0_batch(lambda: result, "x") is result
    with world_of_one():
        for name in ("broadcast", "broadcast_object_list"):
            monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("a collective at world size 1"))
        assert broadcast_samples(samples) is samples and rank0_batch(lambda: result, "x") is result
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
