"""Rollout servers that die and come back (luffy_megatron.rollout.sglang.supervisor). With the fault-injecting
stand-in (tests/sglang_test_server.py): launched servers SIGKILLed mid-generation (slow answers land the kill) are
restarted and serve again only with the trainer's weights (disk and distributed weight sync, real processes, and under
luffy-train), injected deaths mid-call, every URL server dead past the grace period (a clear failure), and the router
left out once a server died. With the real SGLang server (the ``sglang`` tier): every server dead in disk mode,
restarted and restored from the weights on disk. tests/test_sglang_real.py kills a real server mid-generation."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from luffy_megatron.config import FaultToleranceConfig, SGLangConfig
from luffy_megatron.rollout import RolloutError, SamplingParams
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang.client import SGLangClient
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.supervisor import Server, ServerSupervisor, probe_health
from tests.fixtures_models import save_tiny_model, tiny_model
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python
from tests.sglang_test_server import SGLangTestServer

REPO = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(n=2, max_new_tokens=6, seed=1)
PROMPTS = [[2 + i % 20, 3, 4 + i % 7] for i in range(24)]


def weights(step: int):
    return tiny_model(seed=100 + step, scale=3.0)


def reference(step: int) -> list[list[list[int]]]:
    """What the step's weights generate (same seeds), from the in-process HF engine."""
    out = HFEngine(weights(step), eos_token_ids=[1]).generate(PROMPTS, PARAMS)
    return [[o.output_ids for o in row] for row in out]


def step(engine: SGLangEngine, version: int) -> tuple[list, dict]:
    """Generate with the weights of ``version`` (checked against the reference), then load the next version."""
    out = engine.generate(PROMPTS, PARAMS)
    assert [[o.output_ids for o in row] for row in out] == reference(version), "each sample exactly once, right weights"
    assert {o.meta["server_weight_version"] for row in out for o in row} == {str(version)}
    stats = engine.step_metrics()
    engine.update_weights(weights(version + 1).state_dict().items(), version=version + 1)
    return out, stats


def urls_used(out: list) -> set[str]:
    return {o.meta["url"] for row in out for o in row}


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["disk", "distributed"])
def test_a_server_killed_mid_generation_restarts_and_serves_the_trainers_weights(tmp_path, monkeypatch, sync) -> None:
    model = save_tiny_model(tmp_path / "model", seed=3)
    monkeypatch.setenv("LUFFY_TEST_KEY", "sk-supervised")
    cfg = SGLangConfig(
        launch=True,
        num_servers=2,
        base_port=free_port_block(),
        api_key_env="LUFFY_TEST_KEY",
        startup_timeout_s=180,
        weight_sync=sync,
        weight_sync_dir=str(tmp_path / "w"),
        samples_per_request=2,
        retry_backoff_s=0.05,
        extra_args=["--step-delay-s", "0.05", "--join-weight-groups"],
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ft = FaultToleranceConfig(health_timeout_s=2.0, servers_grace_s=120)
    engine = SGLangEngine.from_config(
        cfg,
        model,
        eos_token_ids=[1],
        log_dir=str(tmp_path / "logs"),
        fault_tolerance=ft,
        module="tests.sglang_test_server",
        env=env,
    )
    engine.group_backend = "gloo"
    try:
        first, second = engine.supervisor.servers
        engine.update_weights(weights(1).state_dict().items(), version=1)
        out, stats = step(engine, 1)  # step 1: both serve
        assert urls_used(out) == {first.url, second.url} and stats["rollout/servers_healthy"] == 2

        killer = threading.Timer(0.5, os.kill, (first.process.proc.pid, signal.SIGKILL))
        killer.start()  # step k = 2: the first server dies while generating
        out, stats = step(engine, 2)
        killer.join()
        assert first.process.proc.poll() is None, "restarted by the weight update of step k"
        assert first.restarts == 1 and first.state != "serving" and engine.client.server_urls == [second.url]

        deadline = time.monotonic() + 120  # a real step outlasts a restart; here the test waits for it
        while probe_health(first.url, 1.0) is not None:
            assert time.monotonic() < deadline, (tmp_path / "logs" / "sglang_0.log").read_text()[-2000:]
            time.sleep(0.5)
        out, stats = step(engine, 3)  # step k + 1: healthy again but stale, so it gets no work; this update reaches it
        assert urls_used(out) == {second.url} and stats["rollout/servers_healthy"] == 1
        assert first.state == "serving" and stats["rollout/servers_restarted"] == 1

        out, stats = step(engine, 4)  # step k + 2: it serves again, with the trainer's weight version
        assert urls_used(out) == {first.url, second.url} and stats["rollout/servers_healthy"] == 2
    finally:
        engine.close()
    assert "sk-supervised" not in (tmp_path / "logs" / "sglang_0.log").read_text()


@pytest.mark.slow
def test_every_server_dead_in_disk_mode_restarts_them_with_the_last_weights(tmp_path) -> None:
    """The real SGLang server (CPU engine) SIGKILLed after a disk-mode update: the next generation waits for the
    restarted server, which loads the last weights from disk before it serves."""
    model = save_tiny_model(tmp_path / "model", seed=3)
    cfg = cpu_server_config(
        sglang_python(),
        free_port_block(),
        weight_sync="disk",
        weight_sync_dir=str(tmp_path / "w"),
        samples_per_request=4,
        retry_backoff_s=0.05,
    )
    ft = FaultToleranceConfig(health_timeout_s=2.0, servers_grace_s=300)
    engine = SGLangEngine.from_config(cfg, model, eos_token_ids=[1], log_dir=str(tmp_path / "logs"), fault_tolerance=ft)
    greedy = SamplingParams(n=2, max_new_tokens=6, temperature=0.0)  # the CPU engine ignores sampling seeds
    try:
        engine.update_weights(weights(1).state_dict().items(), version=1)
        for s in engine.supervisor.servers:
            os.killpg(s.process.proc.pid, signal.SIGKILL)  # the server and its scheduler
            s.process.proc.wait(10)
        out = engine.generate(PROMPTS, greedy)  # waits for the restarted server, which loads version 1 from disk
        ref = HFEngine(weights(1), eos_token_ids=[1]).generate(PROMPTS, greedy)
        assert [[o.output_ids for o in row] for row in out] == [[o.output_ids for o in row] for row in ref]
        assert {o.meta["server_weight_version"] for row in out for o in row} == {"1"}
        stats = engine.step_metrics()
        assert stats["rollout/servers_healthy"] == 1 and stats["rollout/servers_restarted"] == 1
    finally:
        engine.close()


def supervised(
    servers: list[SGLangTestServer], grace_s: float, router: str | None = None, max_retries: int = 3
) -> SGLangEngine:
    urls = [s.url for s in servers]
    client = SGLangClient(
        [router] if router else urls, urls, backoff_s=0.01, samples_per_request=4, max_retries=max_retries
    )
    sup = ServerSupervisor(
        client,
        [Server(u, i) for i, u in enumerate(urls)],
        health_timeout_s=1.0,
        grace_s=grace_s,
        router=router is not None,
    )
    return SGLangEngine(client, weight_sync="distributed", eos_token_ids=[1], supervisor=sup)


def test_a_call_broken_by_a_death_runs_again_on_the_servers_left_each_sample_once() -> None:
    """Without client retries the dying server fails the call: the engine notices the death and generates the whole
    batch again (new rids) on the other server; the answer equals the reference, sample by sample."""
    servers = [SGLangTestServer(HFEngine(weights(1), eos_token_ids=[1])) for _ in range(2)]
    for s in servers:
        s.start()
    servers[0].faults.die_on_request = 2
    engine = supervised(servers, grace_s=10.0, max_retries=0)
    try:
        out = engine.generate(PROMPTS, PARAMS)
        assert [[o.output_ids for o in row] for row in out] == reference(1)
        assert urls_used(out) == {servers[1].url} and engine.step_metrics()["rollout/servers_healthy"] == 1
        rids = [r.body["rid"] for r in servers[1].requests if r.path == "/generate"]
        calls = {rid.split("-")[0] for batch in rids for rid in batch}
        assert len(calls) == 2, "the broken call and the one run again"
    finally:
        engine.close()


def test_every_url_server_dead_past_the_grace_period_fails_naming_the_cause() -> None:
    servers = [SGLangTestServer(HFEngine(tiny_model(seed=3), eos_token_ids=[1])) for _ in range(2)]
    for s in servers:
        s.start()
    engine = supervised(servers, grace_s=2.0)
    try:
        assert engine.generate(PROMPTS[:2], PARAMS)  # before any update the servers hold the starting weights
        for s in servers:
            s.kill()
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=r"no rollout server has served for 2 s \(http://127.*no answer"):
            engine.generate(PROMPTS[:2], PARAMS)
        assert 2.0 <= time.monotonic() - t0 < 30
        engine.weight_version = 5  # once the trainer has moved on, only it can restore the weights: fail at once
        with pytest.raises(RolloutError, match="only the trainer holds weight version 5"):
            engine.generate(PROMPTS[:2], PARAMS)
    finally:
        engine.close()


def test_after_a_death_generation_bypasses_the_router() -> None:
    """A router would send work to a revived server before its re-sync: once a server died, the engine talks to the
    serving servers directly (here the "router" is a third test server that records what it gets)."""
    servers = [SGLangTestServer(HFEngine(tiny_model(seed=3), eos_token_ids=[1])) for _ in range(3)]
    for s in servers:
        s.start()
    router, a, b = servers
    engine = supervised([a, b], grace_s=10.0, router=router.url)
    try:
        assert urls_used(engine.generate(PROMPTS[:4], PARAMS)) == {router.url}
        b.kill()
        out = engine.generate(PROMPTS[:4], PARAMS)
        assert urls_used(out) == {a.url} and engine.client.generate_urls == [a.url]
        assert engine.step_metrics()["rollout/servers_healthy"] == 1
    finally:
        engine.close()


@pytest.mark.slow
def test_the_trainer_keeps_training_through_a_server_death_and_logs_servers_healthy(tmp_path) -> None:
    """luffy-train with two launched servers (the test server stands in for ``sglang.launch_server``): one is
    SIGKILLed after step 2, training goes on with the other, the restarted one serves again; SIGTERM then ends the
    run after its step (exit 0)."""
    from tests.fixtures_models import write_train_assets
    from tests.test_train_e2e import metrics, overrides, train_cmd

    assets = write_train_assets(tmp_path / "assets")
    shim = tmp_path / "shim" / "sglang"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("")
    (shim / "launch_server.py").write_text("from tests.sglang_test_server import main\n\nmain()\n")
    port = free_port_block()
    out = tmp_path / "run"
    args = overrides(
        assets,
        out,
        200,
        "rollout.backend=sglang",
        "rollout.sglang.launch=true",
        "rollout.sglang.num_servers=2",
        f"rollout.sglang.base_port={port}",
        "rollout.sglang.weight_sync=disk",
        f"rollout.sglang.weight_sync_dir={tmp_path / 'w'}",
        "rollout.sglang.startup_timeout_s=300",
        "rollout.sglang.samples_per_request=2",
        "rollout.sglang.extra_args=[--step-delay-s,0.02]",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path / 'shim'}:{REPO}"}
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(train_cmd(args), stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: len(metrics(out)) >= 2, proc, 300)
        [pid] = server_pids(port)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: last(out)["rollout/servers_healthy"] == 1, proc, 300)  # noticed: the other server goes on
        wait_for(lambda: last(out)["rollout/servers_healthy"] == 2, proc, 300)  # restarted, re-synced, serving
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    rows = metrics(out)
    steps = sorted(rows)
    assert steps == list(range(1, steps[-1] + 1)), "no step lost"
    healthy = [rows[s]["rollout/servers_healthy"] for s in steps]
    assert healthy[:2] == [2, 2] and 1 in healthy[2:] and healthy[-1] == 2, healthy
    assert rows[steps[-1]]["rollout/servers_restarted"] == 1
    assert "rollout server" in output and "is down (process exited with code -9)" in output, output[-3000:]


def wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (FileNotFoundError, KeyError):
            pass
        assert proc.poll() is None, f"the trainer exited with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def last(out: Path) -> dict:
    from tests.test_train_e2e import metrics

    rows = metrics(out)
    return rows[max(rows)]


def server_pids(port: int) -> list[int]:
    """The server process listening on ``port`` (its command line holds ``--port PORT``)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                args = (p / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "sglang.launch_server" in args and "--port" in args and args[args.index("--port") + 1] == str(port):
                found.append(int(p.name))
    return found
