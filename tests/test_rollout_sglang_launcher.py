"""SGLang launcher: command lines (host, flags, key redaction), health waiting, and real SGLang servers (the ``sglang``
tier, on SGLang's CPU engine) it starts as subprocesses."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from luffy_megatron.config import SGLangConfig
from luffy_megatron.platform.ports import ephemeral_range, free_port, port_in_use
from luffy_megatron.rollout import RolloutError, SamplingParams, WeightSyncError
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang import launcher
from luffy_megatron.rollout.sglang.client import SGLangClient
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.launcher import (
    launch_router,
    launch_servers,
    redact,
    router_command,
    server_command,
    server_env,
    stop_processes,
    wait_healthy,
)
from tests.fixtures_models import save_tiny_model, tiny_model
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python


def test_server_command_flags_and_redaction() -> None:
    cfg = SGLangConfig(tp_size=2, mem_fraction_static=0.6, context_length=4096, colocate=True, extra_args=["--x"])
    cmd = server_command(cfg, "/m", 1, api_key="sk-secret")
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = {a: b for a, b in zip(cmd, cmd[1:]) if a.startswith("--")}
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "30010" and flags["--base-gpu-id"] == "2"
    assert flags["--tp-size"] == "2" and flags["--mem-fraction-static"] == "0.6" and flags["--dtype"] == "bfloat16"
    assert "--skip-tokenizer-init" in cmd and "--enable-memory-saver" in cmd and cmd[-1] == "--x"
    assert "--context-length" in cmd and "0.0.0.0" not in cmd
    printable = redact(cmd)
    assert "sk-secret" not in printable and "--api-key <redacted>" in printable
    assert redact(["a", "--api-key=abc"]) == "a --api-key=<redacted>"
    no_key = server_command(SGLangConfig(), "/m", 0)
    assert "--api-key" not in no_key and "--enable-memory-saver" not in no_key
    cpu = server_command(SGLangConfig(device="cpu", python="/venv/bin/python", colocate=True), "/m", 1)
    assert cpu[0] == "/venv/bin/python" and "--base-gpu-id" not in cpu and "--enable-memory-saver" not in cpu
    assert {"--device": "cpu", "--attention-backend": "torch_native"}.items() <= dict(zip(cpu, cpu[1:])).items()
    assert {"--cuda-graph-backend-decode": "disabled", "--cuda-graph-backend-prefill": "disabled"}.items() <= dict(
        zip(cpu, cpu[1:])
    ).items()
    rc = router_command(SGLangConfig(router_port=29001), ["http://a:1", "http://b:2"])
    assert rc[1:5] == ["-m", "sglang_router.launch_router", "--worker-urls", "http://a:1"] and "29001" in rc


def test_servers_do_not_inherit_torchruns_environment() -> None:
    """What a torchrun worker has (its agent-store switch above all) is not passed on; the config's env is added."""
    torchrun = "MASTER_ADDR MASTER_PORT RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK ROLE_NAME"
    worker = {name: "1" for name in torchrun.split()}
    worker.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID="x", PATH="/bin", CUDA_VISIBLE_DEVICES="0")
    env = server_env(SGLangConfig(env={"OMP_NUM_THREADS": "4"}), worker)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "4"}
    assert server_env(SGLangConfig(device="cpu"), {})["SGLANG_USE_CPU_ENGINE"] == "1"


def test_wait_healthy_names_the_url() -> None:
    with pytest.raises(RolloutError, match=r"http://127\.0\.0\.1:9 \("):
        wait_healthy(["http://127.0.0.1:9"], timeout_s=0.5, poll_s=0.1)


def test_a_taken_port_is_refused_before_launch_naming_the_key(monkeypatch) -> None:
    """A server that cannot bind its port never exits (it hangs in shutdown) while the health poll talks to whoever
    holds the port: so the launcher checks the port first and names the setting to change."""
    monkeypatch.setattr(launcher, "PORT_WAIT_S", 0.5)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RolloutError, match=rf"sglang_0: port {port} on 127\.0\.0\.1 is in use.*base_port"):
            launch_servers(SGLangConfig(base_port=port), "/m")
        with pytest.raises(RolloutError, match=rf"port {port} .*rollout\.sglang\.router_port"):
            launch_router(SGLangConfig(router_port=port), ["http://127.0.0.1:1"])


def test_a_server_that_never_gets_healthy_is_reported_with_its_log(tmp_path) -> None:
    stuck = "import time\nprint('loading, never serving', flush=True)\ntime.sleep(60)\n"
    (tmp_path / "stuck_server.py").write_text(stuck)
    cfg = SGLangConfig(base_port=free_port_block(), startup_timeout_s=2.0, env={"PYTHONPATH": str(tmp_path)})
    with pytest.raises(RolloutError, match=r"not healthy after 2s(.|\n)*log tail:\nloading, never serving"):
        launch_servers(cfg, "/m", log_dir=str(tmp_path / "logs"), module="stuck_server")


def test_free_ports_and_blocks_lie_below_the_ephemeral_range() -> None:
    """Ports from the ephemeral range go to every bind(0) (gloo's sockets, torchrun's store): a server port or a
    rendezvous port (MASTER_PORT) from there can be taken by other process groups before its owner binds it."""
    low = ephemeral_range()[0]
    for _ in range(20):
        base, port = free_port_block(40), free_port()
        assert base + 40 <= low and not any(port_in_use("127.0.0.1", p) for p in range(base, base + 40))
        assert port < low and not port_in_use("127.0.0.1", port)


@pytest.mark.slow
def test_real_processes_gloo_weight_sync_and_kill(tmp_path, monkeypatch, caplog) -> None:
    """Two real SGLang servers (CPU engine) started by the launcher with an API key, never printed: distributed
    weight sync with real broadcasts over gloo (one group, made once and reused), then one server SIGKILLed between
    batches: the other serves every sample, and a weight update refuses to update only some servers."""
    python = sglang_python()
    model = save_tiny_model(tmp_path / "model", seed=3)
    monkeypatch.setenv("TEST_SGLANG_KEY", "sk-proc-77")
    cfg = cpu_server_config(python, free_port_block(), num_servers=2, api_key_env="TEST_SGLANG_KEY")
    caplog.set_level("INFO")
    procs = launch_servers(cfg, model, log_dir=str(tmp_path / "logs"))
    try:
        assert "sk-proc-77" not in caplog.text and "<redacted>" in caplog.text
        client = SGLangClient([p.url for p in procs], api_key="sk-proc-77", backoff_s=0.05, samples_per_request=2)
        engine = SGLangEngine(client, weight_sync="distributed", group_backend="gloo", eos_token_ids=[1])
        engine.bucket_bytes = 20_000  # several buckets
        params = SamplingParams(n=2, max_new_tokens=5, temperature=0.0)  # greedy: the CPU engine ignores seeds
        prompts = [[2 + i, 3] for i in range(10)]
        new = tiny_model(seed=8, scale=4.0)
        ref = [[o.output_ids for o in r] for r in HFEngine(new, eos_token_ids=[1]).generate(prompts, params)]
        groups = []
        for version in (1, 2):  # the group is created once and reused
            engine.update_weights(new.state_dict().items(), version=version)
            groups.append(engine.sync.group)
        assert groups[0] is groups[1] is not None
        first = engine.generate(prompts, params)
        assert [[o.output_ids for o in r] for r in first] == ref
        assert {o.meta["server_weight_version"] for r in first for o in r} == {"2"}
        assert {o.meta["url"] for r in first for o in r} == {p.url for p in procs}
        os.killpg(procs[0].proc.pid, signal.SIGKILL)  # the server and its scheduler
        procs[0].proc.wait(10)
        second = engine.generate(prompts, params)
        assert [[o.output_ids for o in r] for r in second] == ref
        assert {o.meta["url"] for r in second for o in r} == {procs[1].url}
        assert engine.health()["servers"] == {procs[0].url: False, procs[1].url: True}
        with pytest.raises(WeightSyncError, match=procs[0].url):  # never update only some servers
            engine.update_weights(new.state_dict().items(), version=3)
        engine.sync.group = None  # the peer is gone; skip destroying the group
        engine.close()
    finally:
        stop_processes(procs, timeout_s=10)
