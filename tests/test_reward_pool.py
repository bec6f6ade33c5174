"""RewardPool: order, equality with the in-process scorer, killed and hung workers, adversarial inputs, lifecycle."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from luffy_megatron.config import RewardConfig
from luffy_megatron.reward import RewardPool, score_detailed
from luffy_megatron.reward.math_reward import CORRECT, CRASH, FORMAT_ERROR, HUNG, INCORRECT, TIMEOUT
from tests.test_reward_math import ADVERSARIAL, TABLE, THINK

SLOW = "<think>x</think>\\boxed{10^{10^{10}}}"  # runs until the soft timeout
OK = (CORRECT, INCORRECT, FORMAT_ERROR)

# The CPUs are shared: pools that compare exact statuses get a budget no normal answer reaches even under heavy load;
# the fault tests use a short budget and only compare the items that were not cut off.


@pytest.fixture(scope="module")
def pool():
    with RewardPool(RewardConfig(num_workers=2, timeout_s=60.0)) as p:
        yield p


@pytest.fixture(scope="module")
def short_pool():
    with RewardPool(RewardConfig(num_workers=2, timeout_s=3.0)) as p:
        yield p


def _reference(responses: list[str], truths: list[str], flags: list[bool]) -> list:
    """In-process results without a timer (None for SLOW items, whose outcome depends on the clock)."""
    score_detailed(THINK + "\\boxed{1}", "1", False, None)  # warm imports
    return [score_detailed(r, t, f, None) if r != SLOW else None for r, t, f in zip(responses, truths, flags)]


def _same_where_finished(got: list, expected: list) -> None:
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.status in OK and e is not None:
            assert (g.score, g.status) == (e.score, e.status), i


def _mixed_batch(n: int, seed: int = 0) -> tuple[list[str], list[str], list[bool]]:
    rng = random.Random(seed)
    responses, truths, flags = [], [], []
    for i in range(n):
        answer, truth, _ = TABLE[i % len(TABLE)]
        kind = rng.random()
        if kind < 0.15:
            response, flag = answer, True  # no </think>: format error
        elif kind < 0.5:
            response, flag = "thinking...\n</think>\n" + answer, True  # the prompt's <think> counts
        else:
            response, flag = THINK + answer, False
        responses.append(response)
        truths.append(truth)
        flags.append(flag)
    return responses, truths, flags


def test_pool_matches_serial_scores_in_input_order(pool):
    responses, truths, flags = _mixed_batch(len(TABLE))
    expected = _reference(responses, truths, flags)
    before = pool.stats.items
    got = pool.score_detailed(responses, truths, flags)
    assert [g.status for g in got] == [e.status for e in expected]
    assert [g.score for g in got] == [e.score for e in expected]
    assert pool.score(responses[:7], truths[:7], flags[:7]) == [e.score for e in expected[:7]]
    assert pool.stats.items == before + len(TABLE) + 7
    assert pool.score([], [], []) == []
    # many tiny chunks (one item per message) give the same answer
    with RewardPool(RewardConfig(num_workers=2, timeout_s=60.0), chunk_size=1) as small:
        assert small.score(responses[:10], truths[:10], flags[:10]) == [e.score for e in expected[:10]]


def test_adversarial_inputs_each_finish_within_timeout_plus_one_second():
    timeout = 1.0
    with RewardPool(RewardConfig(num_workers=2, timeout_s=timeout), hard_margin_s=0.3) as fast:
        fast.score(["<think></think>\\boxed{1}"] * 4, ["1"] * 4, [False] * 4)  # workers started and warm
        for name, response in ADVERSARIAL.items():
            times = []
            for _ in range(3):  # other jobs share the 2 CPUs and can starve us: the best of 3 tries must meet the bound
                start = time.monotonic()
                [result] = fast.score_detailed([response], ["3"], [False])
                times.append(time.monotonic() - start)
                if times[-1] < timeout + 1.0:
                    break
            assert min(times) < timeout + 1.0, f"{name}: {times}"
            assert result.score == 0.0 or name in ("1 MB of thinking", "1 MB of latex"), name
        timeouts = fast.stats.timeouts
        got = fast.score_detailed([SLOW, THINK + "\\boxed{3}"], ["3", "3"], [False, False])
        assert [(g.score, g.status) for g in got] == [(0.0, TIMEOUT), (1.0, CORRECT)]
        assert fast.stats.timeouts == timeouts + 1
        assert set(fast.stats.as_dict()) >= {"timeouts", "hung", "crashes", "items", "correct", "format_errors"}


def _kill_soon(pool: RewardPool, sig: int, delay: float) -> threading.Thread:
    pid = pool.worker_pids[0]

    def run() -> None:
        time.sleep(delay)
        os.kill(pid, sig)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.slow
def test_worker_killed_mid_batch_is_replaced_and_batch_returns(short_pool):
    pool = short_pool
    responses, truths, flags = _mixed_batch(40, seed=1)
    responses[0] = responses[20] = SLOW
    truths[0] = truths[20] = "9" * 40  # the longest ground truths: the pool sends them first, to worker 0
    expected = _reference(responses, truths, flags)
    old_pids = set(pool.worker_pids)
    crashes = pool.stats.crashes
    pool.wait_ready()
    killer = _kill_soon(pool, signal.SIGKILL, 1.0)  # worker 0 is on SLOW (item 0) for 3 s
    got = pool.score_detailed(responses, truths, flags)
    killer.join()
    assert len(got) == 40
    assert pool.stats.crashes == crashes + 1
    assert [g.status for g in got].count(CRASH) == 1 and got[0].status == CRASH
    _same_where_finished(got, expected)
    assert set(pool.worker_pids) != old_pids and len(pool.worker_pids) == 2
    _same_where_finished(pool.score_detailed(responses[1:20], truths[1:20], flags[1:20]), expected[1:20])


@pytest.mark.slow
def test_hung_worker_is_killed_after_the_hard_deadline(short_pool):
    pool = short_pool
    responses, truths, flags = _mixed_batch(30, seed=2)
    hung = pool.stats.hung
    pool.wait_ready()  # a worker stopped before it is ready would simply never get work
    stopped = pool.worker_pids[0]
    os.kill(stopped, signal.SIGSTOP)  # a stopped process never answers: the pool must not wait for it
    start = time.monotonic()
    got = pool.score_detailed(responses, truths, flags)
    elapsed = time.monotonic() - start
    # the stopped worker's first item is cut off; the rest of its chunk is rescored by the others
    assert pool.stats.hung == hung + 1 and [g.status for g in got].count(HUNG) == 1
    assert stopped not in pool.worker_pids and len(pool.worker_pids) == 2
    assert elapsed < pool.config.timeout_s + pool.hard_margin_s + 5.0
    _same_where_finished(got, _reference(responses, truths, flags))


def test_bad_arguments_and_lifecycle():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(RewardConfig(num_workers=0))
    p = RewardPool(RewardConfig(num_workers=1, timeout_s=5.0))
    with pytest.raises(TimeoutError, match="not ready"):
        p.wait_ready(timeout_s=0.0)  # nothing has been read from the new worker yet
    p.wait_ready()
    with pytest.raises(ValueError, match="lengths differ"):
        p.score(["a"], ["1", "2"], [True])
    with pytest.raises(TypeError, match="item 0"):
        p.score([None], ["1"], [True])  # type: ignore[list-item]
    pids = p.worker_pids
    p.close()
    p.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["x"], ["1"], [True])
