"""The SGLang engine against the real SGLang server and sglang-router (the ``sglang`` tier), launched by the project's
own launcher on SGLang's CPU engine: generation through the router, every weight-sync mode, colocated release and
resume, the API key, the TP check, and a server killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from luffy_megatron.config import FaultToleranceConfig
from luffy_megatron.rollout.base import RolloutError, SamplingParams
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.launcher import check_server_tp
from luffy_megatron.rollout.sglang.supervisor import probe_health
from tests.fixtures_models import save_tiny_model, tiny_model
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python

pytestmark = pytest.mark.slow
KEY_ENV = "LUFFY_TEST_SGLANG_KEY"
PROMPTS = [[5, 6, 7], [9, 3], [4, 4, 4, 4, 2]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
#: Log-probs of SGLang's CPU engine (fp32, torch-native attention) vs transformers' fp32 forward.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sglang_model") / "m", scale=4.0)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    """One real server behind a real router, both launched by the engine, with an API key."""
    python = sglang_python()
    os.environ[KEY_ENV] = "test-key-" + os.urandom(4).hex()
    weights = str(tmp_path_factory.mktemp("weights"))
    cfg = cpu_server_config(
        python,
        free_port_block(),
        use_router=True,
        api_key_env=KEY_ENV,
        weight_sync_dir=weights,
        weight_sync_backend="gloo",
    )
    eng = SGLangEngine.from_config(cfg, model_dir, log_dir=str(tmp_path_factory.mktemp("logs")))
    yield eng
    eng.close()
    del os.environ[KEY_ENV]


def hf_reference(model: torch.nn.Module, params: SamplingParams = GREEDY) -> list:
    return HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, params)


def assert_same_greedy(got: list, ref: list) -> None:
    assert [[o.output_ids for o in r] for r in got] == [[o.output_ids for o in r] for r in ref]
    gap = max(abs(a - b) for g, f in zip(got, ref) for x, y in zip(g, f) for a, b in zip(x.logprobs, y.logprobs))
    assert gap < LOGPROB_TOL, gap


def post(url: str, path: str, body: dict, key: str | None) -> int:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_generation_through_the_router_equals_transformers_greedy(engine, model_dir):
    (router,) = engine.client.generate_urls
    assert router not in engine.client.server_urls  # the samples went through sglang-router
    assert_same_greedy(engine.generate(PROMPTS, GREEDY), hf_reference(tiny_model(scale=4.0)))


def test_requests_without_the_api_key_get_401_from_server_and_router(engine):
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    (router,) = engine.client.generate_urls
    for url in (router, *engine.client.server_urls):
        assert post(url, "/generate", body, None) == 401, url
        assert post(url, "/generate", body, os.environ[KEY_ENV]) == 200, url


@pytest.mark.parametrize("mode", ["disk", "tensor", "distributed"])
def test_every_weight_sync_mode_reaches_the_server(engine, mode):
    """After the sync the server's greedy tokens and log-probs are the new model's, and no longer the old one's."""
    old, new = tiny_model(scale=4.0), tiny_model(seed=7 + len(mode), scale=4.0)
    engine.weight_sync = mode
    engine.bucket_bytes = 20_000  # several buckets
    version = (engine.weight_version or 0) + 1
    engine.update_weights(((k, v.clone()) for k, v in new.state_dict().items()), version=version)
    got = engine.generate(PROMPTS, GREEDY)
    assert_same_greedy(got, hf_reference(new))
    assert [[o.output_ids for o in r] for r in got] != [[o.output_ids for o in r] for r in hf_reference(old)]
    assert {o.meta["server_weight_version"] for r in got for o in r} == {str(version)}


def test_colocated_release_and_resume_thirty_times_keeps_the_weights(engine):
    """30 x (generate -> release -> weights back -> KV cache back): the weights are intact every time."""
    model = tiny_model(seed=3, scale=4.0)
    engine.weight_sync = "tensor"
    engine.update_weights(model.state_dict().items(), version=(engine.weight_version or 0) + 1)
    ref = hf_reference(model)
    engine.colocate = True
    try:
        for _ in range(30):
            assert_same_greedy(engine.generate(PROMPTS, GREEDY), ref)
            engine.release_memory()
            engine.resume_memory()
        engine.release_memory()  # then a weight update takes the weights back first, the KV cache after
        engine.update_weights(model.state_dict().items(), version=engine.weight_version + 1)
        assert_same_greedy(engine.generate(PROMPTS, GREEDY), ref)
    finally:
        engine.colocate = False


def test_a_server_of_another_tp_size_is_refused_naming_both(engine):
    (url,) = engine.client.server_urls
    check_server_tp([url], 1, os.environ[KEY_ENV])
    with pytest.raises(RolloutError, match=rf"rollout.sglang.tp_size is 2 but the server at {url} runs tp_size 1"):
        check_server_tp([url], 2, os.environ[KEY_ENV])


def test_a_server_killed_mid_run_is_restarted_resynced_and_loses_no_sample(model_dir, tmp_path):
    """Two launched servers; one is SIGKILLed (its whole process group) while generating. Every sample comes back
    exactly once; the next weight update restarts it; once healthy it gets no work until an update reaches it, then
    serves the trainer's weight version."""
    cfg = cpu_server_config(
        sglang_python(),
        free_port_block(),
        num_servers=2,
        weight_sync="distributed",
        weight_sync_backend="gloo",
        retry_backoff_s=0.05,
    )
    ft = FaultToleranceConfig(health_timeout_s=5.0, servers_grace_s=300.0)
    eng = SGLangEngine.from_config(cfg, model_dir, log_dir=str(tmp_path / "logs"), fault_tolerance=ft)
    many = SamplingParams(n=8, max_new_tokens=128, temperature=1.0)  # ~50k tokens: seconds of generation
    try:
        first, second = eng.supervisor.servers
        eng.update_weights(tiny_model(seed=1, scale=4.0).state_dict().items(), version=1)
        killer = threading.Timer(1.0, os.killpg, (first.process.proc.pid, signal.SIGKILL))
        killer.start()
        out = eng.generate(PROMPTS * 16, many)  # the first server dies under this call
        assert killer.finished.is_set(), "the kill came after the generation: make the generation longer"
        killer.join()
        assert [sorted(o.sample_index for o in r) for r in out] == [list(range(8))] * len(PROMPTS) * 16
        eng.update_weights(tiny_model(seed=2, scale=4.0).state_dict().items(), version=2)  # sees the death
        assert first.restarts == 1 and first.process.proc.poll() is None
        assert eng.client.server_urls == [second.url]
        deadline = time.monotonic() + 300
        while probe_health(first.url, 2.0) is not None:
            assert time.monotonic() < deadline, (tmp_path / "logs" / "sglang_0.log").read_text()[-2000:]
            time.sleep(1.0)
        out = eng.generate(PROMPTS * 8, GREEDY)  # healthy again but stale: no work for it yet
        assert {o.meta["url"] for r in out for o in r} == {second.url}
        model = tiny_model(seed=3, scale=4.0)
        eng.update_weights(model.state_dict().items(), version=3)  # reaches the revived server too
        assert first.state == "serving" and sorted(eng.client.server_urls) == sorted([first.url, second.url])
        out = eng.generate(PROMPTS * 8, GREEDY)
        assert {o.meta["url"] for r in out for o in r} == {first.url, second.url}
        assert {o.meta["server_weight_version"] for r in out for o in r} == {"3"}
        assert_same_greedy(out[: len(PROMPTS)], hf_reference(model))
        assert eng.step_metrics() == {"rollout/servers_healthy": 2.0, "rollout/servers_restarted": 1.0}
    finally:
        eng.close()
