"""SGLang client and engine. Ordinary behaviour runs against the real SGLang server (the ``sglang`` tier, on SGLang's
CPU engine; one server with an API key shared by this file): generation equal to the in-process engine (greedy: the CPU
engine ignores ``sampling_seed``), per-prompt counts, stop tokens, exact-rid aborts, the API key, disk weight updates,
attaching from a config, the asynchronous loop and the colocated loop. Faults, and the exact requests the client sends,
run against the stand-in (``tests/sglang_test_server.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from luffy_megatron.config import RolloutConfig, SGLangConfig
from luffy_megatron.rollout import RolloutError, SamplingParams, WeightSyncError, sample_seed
from luffy_megatron.rollout.factory import build_rollout_engine
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang import client as client_mod
from luffy_megatron.rollout.sglang.client import (
    SAMPLING_KEYS,
    RequestRejected,
    RetryableError,
    SampleRequest,
    SGLangClient,
    parse_sample,
)
from luffy_megatron.rollout.sglang.engine import MEMORY_TAGS, SGLangEngine
from luffy_megatron.rollout.sglang.launcher import launch_servers, stop_processes
from luffy_megatron.rollout.sglang.weights import iter_buckets, serialize_named_tensors
from tests.fixtures_models import save_tiny_model, tiny_model
from tests.sglang_real import cpu_server_config, free_port_block, sglang_python
from tests.sglang_test_server import SGLangTestServer, schema

PROMPTS = [[3, 4, 5], [7, 8], [9, 10, 11, 12], [13]]
#: The real server's starting model (long enough a context for the abort test's long answers).
REAL_MODEL = dict(seed=21, scale=4.0, max_positions=2048)
GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
#: Log-probs of SGLang's CPU engine (fp32, torch-native attention) vs transformers' fp32 forward.
LOGPROB_TOL = 1e-4
KEY_ENV = "LUFFY_TEST_SGLANG_CLIENT_KEY"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=21, scale=4.0)


def _server(model: torch.nn.Module, **kw) -> SGLangTestServer:
    server = SGLangTestServer(HFEngine(model, eos_token_ids=[1]), **kw)
    server.start()
    return server


@pytest.fixture
def servers(model):
    started: list[SGLangTestServer] = []

    def make(n: int = 1, **kw) -> list[SGLangTestServer]:
        for _ in range(n):
            started.append(_server(model, **kw))
        return started[-n:]

    yield make
    for s in started:
        s.stop()


def _engine(servers: list[SGLangTestServer], tmp_path=None, **kw) -> SGLangEngine:
    client_kw = {
        k: kw.pop(k)
        for k in list(kw)
        if k in ("api_key", "max_retries", "backoff_s", "request_timeout_s", "samples_per_request")
    }
    client_kw.setdefault("backoff_s", 0.01)
    client = SGLangClient([s.url for s in servers], **client_kw)
    return SGLangEngine(
        client,
        weight_sync_dir=str(tmp_path) if tmp_path else None,
        weight_sync=kw.pop("weight_sync", "disk" if tmp_path else "tensor"),
        eos_token_ids=[1],
        **kw,
    )


def _generate_bodies(server: SGLangTestServer) -> list[dict]:
    return [r.body for r in server.requests if r.path == "/generate"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One real SGLang server (CPU engine) started with an API key, shared by this file's real-server tests; a test
    that compares with a model first loads that model (:func:`_load`)."""
    python = sglang_python()
    root = tmp_path_factory.mktemp("real_sglang")
    model_dir = save_tiny_model(root / "model", **REAL_MODEL)
    key = "sk-real-" + os.urandom(6).hex()
    cfg = cpu_server_config(python, free_port_block(), api_key_env=KEY_ENV)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, key)
        (proc,) = launch_servers(cfg, model_dir, log_dir=str(root / "logs"))
    try:
        yield SimpleNamespace(url=proc.url, key=key, model_dir=model_dir, proc=proc)
    finally:
        stop_processes([proc])


def _real_engine(real: SimpleNamespace, **kw) -> SGLangEngine:
    """An engine on the real server (tensor sync unless told otherwise)."""
    client_kw = {k: kw.pop(k) for k in list(kw) if k in ("max_retries", "samples_per_request")}
    client = SGLangClient([real.url], api_key=real.key, backoff_s=0.01, **client_kw)
    return SGLangEngine(
        client, weight_sync=kw.pop("weight_sync", "tensor"), eos_token_ids=[1], hf_path=real.model_dir, **kw
    )


def _load(engine: SGLangEngine, model: torch.nn.Module, version: int) -> None:
    """Put ``model`` on the server (tensor sync), whatever mode the engine is in."""
    mode, engine.weight_sync = engine.weight_sync, "tensor"
    try:
        engine.update_weights(model.state_dict().items(), version=version)
    finally:
        engine.weight_sync = mode


def _ids(out: list) -> list:
    return [[o.output_ids for o in row] for row in out]


def _assert_same_greedy(got: list, ref: list) -> None:
    assert _ids(got) == _ids(ref)
    assert [[o.finish_reason for o in r] for r in got] == [[o.finish_reason for o in r] for r in ref]
    gap = max(abs(a - b) for g, f in zip(got, ref) for x, y in zip(g, f) for a, b in zip(x.logprobs, y.logprobs))
    assert gap < LOGPROB_TOL, gap


@pytest.mark.slow
def test_real_server_generation_equals_the_in_process_engine(real) -> None:
    """Batched straight to the server, 5 samples per request: greedy tokens, finish reasons and log-probs are the
    in-process engine's; sampled, every sample comes back once and well formed."""
    model = tiny_model(**REAL_MODEL)
    engine = _real_engine(real, samples_per_request=5)
    try:
        _load(engine, model, 1)
        greedy = SamplingParams(n=3, temperature=0.0, max_new_tokens=10)
        _assert_same_greedy(
            engine.generate(PROMPTS, greedy), HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, greedy)
        )
        params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, seed=4)
        out = engine.generate(PROMPTS, params)
        assert [(o.prompt_index, o.sample_index) for r in out for o in r] == [
            (i, j) for i in range(4) for j in range(3)
        ]
        for o in (o for row in out for o in row):
            assert 0 < len(o.output_ids) == len(o.logprobs) <= 10 and all(lp <= 0 for lp in o.logprobs)
            assert o.finish_reason == "length" or (o.finish_reason == "stop" and o.output_ids[-1] == 1)
            assert o.finish_reason == "stop" or len(o.output_ids) == 10
            assert o.meta == {"url": real.url, "server_weight_version": "1"} and o.weight_version == 1
    finally:
        engine.close()


def test_generate_request_bodies_field_by_field(servers) -> None:
    """What the client sends (request recording): 12 samples, 5 per request, each with its own rid and seed."""
    (server,) = servers(1)
    engine = _engine([server], samples_per_request=5)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, seed=4)
    out = engine.generate(PROMPTS, params)
    assert [o.prompt_index for row in out for o in row] == [i for i in range(4) for _ in range(3)]
    bodies = _generate_bodies(server)
    assert len(bodies) == 3  # 12 samples, 5 per request
    rids = []
    for body in bodies:
        # Field by field against the pinned SGLang's GenerateReqInput / SamplingParams.
        assert set(body) == {"input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len", "stream"}
        assert set(body) <= schema()["generate"]
        assert body["return_logprob"] is True and body["logprob_start_len"] == -1 and body["stream"] is False
        assert isinstance(body["input_ids"], list) and all(isinstance(p, list) for p in body["input_ids"])
        assert all(isinstance(t, int) for p in body["input_ids"] for t in p)
        assert len(body["sampling_params"]) == len(body["input_ids"]) == len(body["rid"])
        for sp in body["sampling_params"]:
            assert set(sp) <= SAMPLING_KEYS <= schema()["sampling"]
            assert sp["max_new_tokens"] == 10 and sp["temperature"] == 0.8 and sp["top_p"] == 0.9
            assert sp["top_k"] == 20 and sp["stop_token_ids"] == [1] and isinstance(sp["sampling_seed"], int)
            assert "n" not in sp  # samples are expanded client-side, one rid each
        rids += body["rid"]
    assert len(set(rids)) == 12
    seeds = [sp["sampling_seed"] for b in bodies for sp in b["sampling_params"]]
    assert seeds == [sample_seed(4, i, j) for i in range(4) for j in range(3)]
    engine.close()


@pytest.mark.slow
def test_unknown_sampling_key_rejected_by_server_and_client(real) -> None:
    client = SGLangClient([real.url], api_key=real.key, max_retries=0)

    async def go() -> None:
        with pytest.raises(RequestRejected, match="400.*unknown field `temprature`"):
            await client.request(real.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"temprature": 1}})
        with pytest.raises(RolloutError, match="not in the documented"):
            await client.generate([SampleRequest("a", [1, 2], {"best_of": 2})])
        single = await client.request(
            real.url,
            "/generate",
            {"input_ids": [2, 3], "return_logprob": True, "sampling_params": {"max_new_tokens": 3}},
        )
        assert isinstance(single, dict) and len(single["meta_info"]["output_token_logprobs"]) == len(
            single["output_ids"]
        )
        await client.close()

    asyncio.run(go())


@pytest.mark.slow
def test_per_prompt_counts_send_exactly_those_requests_with_the_full_requests_seeds(real, monkeypatch) -> None:
    sent: list[SampleRequest] = []

    def recording(chunk, *, batched=True):  # what the client puts in its /generate bodies
        sent.extend(chunk)
        return body(chunk, batched=batched)

    body = client_mod.generate_body
    monkeypatch.setattr(client_mod, "generate_body", recording)
    model = tiny_model(**REAL_MODEL)
    engine = _real_engine(real, samples_per_request=4)
    counts = [3, 4, 0, 2]
    try:
        _load(engine, model, 1)
        out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=9), counts)
        assert [[o.sample_index for o in r] for r in out] == [list(range(c)) for c in counts]
        expected = [sample_seed(9, i, j) for i, c in enumerate(counts) for j in range(c)]
        assert sorted(r.sampling_params["sampling_seed"] for r in sent) == sorted(expected)
        assert len({r.rid for r in sent}) == len(sent) == sum(counts)
        greedy = SamplingParams(n=4, temperature=0.0, max_new_tokens=12)
        ref = HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, greedy)
        assert _ids(engine.generate(PROMPTS, greedy, counts)) == [r[:c] for r, c in zip(_ids(ref), counts)]
    finally:
        engine.close()


@pytest.mark.slow
def test_async_rollout_generates_from_a_background_thread_then_syncs_at_the_boundary(real) -> None:
    """The asynchronous loop's use of the servers: a batch generated in the rollout thread, then a weight update."""
    from luffy_megatron.train.producer import RolloutPrefetcher

    model, new = tiny_model(**REAL_MODEL), tiny_model(seed=6, scale=4.0)
    engine = _real_engine(real)
    prefetcher = RolloutPrefetcher()
    try:
        _load(engine, model, 1)
        prefetcher.start(2, 0, lambda: ([], {"ids": engine.generate(PROMPTS, GREEDY, [2, 1, 2, 1])}))
        batch = prefetcher.take(2)
        assert _ids(batch.metrics["ids"]) == _ids(
            HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, GREEDY, [2, 1, 2, 1])
        )
        engine.update_weights(new.state_dict().items(), version=2)
        prefetcher.start(3, 1, lambda: ([], {"ids": engine.generate(PROMPTS, GREEDY)}))
        after = prefetcher.take(3).metrics["ids"]
        assert _ids(after) == _ids(HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, GREEDY))
        assert all(o.weight_version == 2 for r in after for o in r)
    finally:
        prefetcher.close()
        engine.close()


@pytest.mark.parametrize("fault", ["status_5xx", "malformed", "wrong_count"])
def test_transient_faults_are_retried(servers, fault) -> None:
    (server,) = servers(1)
    setattr(server.faults, fault, 2)
    engine = _engine([server], max_retries=3)
    out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4, seed=1))
    assert sum(len(r) for r in out) == 8
    assert len(_generate_bodies(server)) == 3
    engine.close()


@pytest.mark.slow
def test_a_matched_stop_token_ends_the_sample_and_stays_in_it(real) -> None:
    """A stop token greedy decoding reaches ends the sample there, as in the in-process engine; the real server keeps
    it in ``output_ids`` (the stand-in's ``trim_stop`` fault sends answers without it, checked below)."""
    model = tiny_model(**REAL_MODEL)
    hf = HFEngine(model, eos_token_ids=[1])
    free = hf.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12))
    stop = free[0][0].output_ids[2]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,))
    engine = _real_engine(real)
    try:
        _load(engine, model, 1)
        out = engine.generate(PROMPTS, params)
        _assert_same_greedy(out, hf.generate(PROMPTS, params))
        first = out[0][0]
        assert first.finish_reason == "stop" and first.output_ids[-1] == stop and len(first.output_ids) <= 3
        body = client_mod.generate_body(
            [SampleRequest("raw", PROMPTS[0], {"max_new_tokens": 12, "temperature": 0.0, "stop_token_ids": [stop]})]
        )
        (raw,) = engine._run(engine.client.request(real.url, "/generate", body))
        assert raw["output_ids"] == first.output_ids, "SGLang 0.5.23 does not trim the stop token from output_ids"
    finally:
        engine.close()


def test_trimmed_stop_token_restored_from_logprobs(servers, model) -> None:
    """A server that leaves the matched stop token out of ``output_ids`` (a fault only the stand-in sends): the token
    comes back from ``output_token_logprobs``."""
    (server,) = servers(1)
    server.faults.trim_stop = True
    engine = _engine([server])
    params = SamplingParams(n=4, max_new_tokens=12, seed=2)
    out = engine.generate(PROMPTS, params)
    ref = HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, params)
    assert [[o.output_ids for o in r] for r in out] == [[o.output_ids for o in r] for r in ref]
    assert any(o.finish_reason == "stop" and o.output_ids[-1] == 1 for r in out for o in r)
    engine.close()


def test_parse_sample_rejects_inconsistent_answers() -> None:
    meta = {"id": "r", "finish_reason": {"type": "length", "length": 2}, "output_token_logprobs": [[-0.1, 5, None]]}
    with pytest.raises(RetryableError, match="do not match"):
        parse_sample({"output_ids": [5, 6], "meta_info": meta}, "r")
    with pytest.raises(RetryableError, match="does not match rid"):
        parse_sample({"output_ids": [5], "meta_info": meta}, "other")
    with pytest.raises(RetryableError, match="malformed"):
        parse_sample({"output_ids": [5], "meta_info": {**meta, "output_token_logprobs": [[None, 5]]}}, "r")
    with pytest.raises(RetryableError, match="finish_reason"):
        parse_sample({"output_ids": [5], "meta_info": {**meta, "finish_reason": None}}, "r")
    ok = parse_sample({"output_ids": [5], "meta_info": meta}, "r")
    assert ok.output_ids == [5] and ok.logprobs == [-0.1] and ok.finish_reason == "length"


def test_persistent_5xx_fails_loudly_naming_the_url(servers) -> None:
    (server,) = servers(1)
    server.faults.status_5xx = 100
    engine = _engine([server], max_retries=2)
    with pytest.raises(RolloutError, match=f"failed after 3 attempts.*{server.url}.*503"):
        engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4))
    engine.close()


def test_slow_answer_times_out_and_is_resent_elsewhere(servers) -> None:
    slow, fast = servers(2)
    slow.faults.delay_s = 2.0
    engine = _engine([slow, fast], request_timeout_s=0.5, max_retries=2, samples_per_request=100)
    engine.client._failures[fast.url] = 1  # make the client try the slow server first
    t0 = time.perf_counter()
    out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=4, seed=2))
    assert time.perf_counter() - t0 < 1.9
    assert {o.meta["url"] for row in out for o in row} == {fast.url}
    assert len(_generate_bodies(slow)) == 1 and len(_generate_bodies(fast)) == 1
    # The timed-out rids were aborted on the slow server.
    time.sleep(0.2)
    assert [r for r in slow.requests if r.path == "/abort_request"]
    engine.close()


def test_unreachable_server_error_names_url() -> None:
    client = SGLangClient(["http://127.0.0.1:9"], max_retries=1, backoff_s=0.01, connect_timeout_s=1.0)
    engine = SGLangEngine(client, weight_sync="tensor")
    with pytest.raises(RolloutError, match=r"127\.0\.0\.1:9"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert engine.health()["ok"] is False
    engine.close()


def test_server_killed_mid_batch_no_prompt_lost_or_duplicated(servers, tmp_path) -> None:
    a, b = servers(2)
    a.faults.die_on_request = 2  # dies on its 2nd /generate, while others are in flight
    a.faults.step_delay_s = 0.01
    engine = _engine([a, b], samples_per_request=2, max_retries=3)
    prompts = [[2 + i % 20, 3 + i % 7] for i in range(24)]
    params = SamplingParams(n=2, max_new_tokens=6, seed=9)
    out = engine.generate(prompts, params)
    assert a.dead
    got = sorted((o.prompt_index, o.sample_index) for row in out for o in row)
    assert got == [(i, j) for i in range(24) for j in range(2)]
    ref = HFEngine(b.engine.model, eos_token_ids=[1]).generate(prompts, params)
    assert [[o.output_ids for o in r] for r in out] == [[o.output_ids for o in r] for r in ref]
    assert {o.meta["url"] for row in out for o in row} >= {b.url}
    with pytest.raises(WeightSyncError, match=a.url):  # a dead server fails the update until it is removed
        engine.update_weights([], version=1)
    engine.client.remove_server(a.url)
    with pytest.raises(RolloutError, match="only generate URL"):
        engine.client.remove_server(b.url)
    engine.weight_sync, engine.weight_sync_dir = "disk", str(tmp_path)
    engine.update_weights(b.engine.model.state_dict().items(), version=1)
    assert [r.path for r in b.requests][-1] == "/continue_generation"
    engine.close()


@pytest.mark.slow
def test_abort_request_matches_the_rid_exactly(real) -> None:
    """SGLang looks the rid up exactly (``rid_to_state.get(rid)``): a prefix aborts nothing."""
    client = SGLangClient([real.url], api_key=real.key)
    long = {"max_new_tokens": 2000, "ignore_eos": True}  # ~4 s on the CPU engine

    async def go() -> None:
        reqs = [SampleRequest("job-1", [2, 3], dict(long)), SampleRequest("job-2", [2, 4], dict(long))]
        task = asyncio.ensure_future(client.generate(reqs))
        await asyncio.sleep(1.0)
        await client.abort(rid="job-")  # a prefix: not a rid, nothing happens
        await client.abort(rid="job-1")
        res = await asyncio.wait_for(task, 120)
        assert res["job-1"].finish_reason == "abort" and 0 < len(res["job-1"].output_ids) < 2000
        assert res["job-2"].finish_reason == "length" and len(res["job-2"].output_ids) == 2000
        await client.close()

    asyncio.run(go())


@pytest.mark.slow
def test_api_key_required_and_never_logged(real, caplog) -> None:
    bad = SGLangEngine(SGLangClient([real.url], api_key="wrong", max_retries=0), weight_sync="tensor")
    with pytest.raises(RolloutError, match="401"):
        bad.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    bad.close()
    caplog.set_level(logging.DEBUG)
    dead = "http://127.0.0.1:9"  # tried first: its failure is logged, then the server answers
    client = SGLangClient([dead, real.url], [real.url], api_key=real.key, backoff_s=0.01)
    client._failures[real.url] = 1
    engine = SGLangEngine(client, weight_sync="tensor", eos_token_ids=[1])
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert len(out) == 4 and {o.meta["url"] for r in out for o in r} == {real.url}
    assert "generate attempt 1 failed" in caplog.text and dead in caplog.text
    assert real.key not in caplog.text and real.key not in repr(engine.client)
    engine.close()


@pytest.mark.slow
def test_weight_update_from_disk_changes_outputs(real, tmp_path) -> None:
    old, new = tiny_model(**REAL_MODEL), tiny_model(seed=99, scale=4.0)
    engine = _real_engine(real, weight_sync="disk", weight_sync_dir=str(tmp_path))
    try:
        _load(engine, old, 6)
        before = engine.generate(PROMPTS, GREEDY)
        engine.bucket_bytes = 20_000  # several shards
        engine.update_weights(new.state_dict().items(), version=7)
        after = engine.generate(PROMPTS, GREEDY)
        _assert_same_greedy(after, HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, GREEDY))
        assert _ids(after) != _ids(before)
        assert {o.meta["server_weight_version"] for r in after for o in r} == {"7"}
        assert engine.weight_version == 7 and all(o.weight_version == 7 for r in after for o in r)
        assert len(list((tmp_path / "v7").glob("*.safetensors"))) > 1
        engine.update_weights(new.state_dict().items(), version=8)
        assert not (tmp_path / "v7").exists() and (tmp_path / "v8").is_dir()
    finally:
        engine.close()


def test_failed_weight_update_on_one_server_raises_and_blocks_generation(servers, tmp_path, model) -> None:
    a, b = servers(2)
    b.faults.fail_weight_update = True
    engine = _engine([a, b], tmp_path)
    with pytest.raises(WeightSyncError, match=f"1/2 servers.*{b.url}.*injected load failure"):
        engine.update_weights(model.state_dict().items(), version=1)
    with pytest.raises(WeightSyncError, match="stale"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    assert a.paused and b.paused  # nothing generates with mixed weights
    b.faults.fail_weight_update = False
    engine.update_weights(model.state_dict().items(), version=2)
    assert not a.paused and engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    engine.close()


def test_weight_update_and_memory_requests_in_order(servers, tmp_path) -> None:
    """What the engine sends (request recording), at ``tp_size`` 2: a disk update; colocated release (paused and
    flushed first: SGLang asserts an idle scheduler) and resume (weights first, then KV cache and CUDA graphs); then a
    release followed by a tensor update, which takes the weights back before its first bucket and the rest after its
    last, one payload per TP rank."""
    (server,) = servers(1)
    engine = _engine([server], tmp_path, colocate=True, tp_size=2)
    new = tiny_model(seed=5, scale=4.0)

    def sent() -> list[tuple[str, object]]:
        out = [(r.path, r.body) for r in server.requests if r.path != "/generate"]
        server.requests.clear()
        return out

    engine.update_weights(new.state_dict().items(), version=7)
    assert sent() == [
        ("/pause_generation", {"mode": "abort"}),
        ("/flush_cache", None),
        (
            "/update_weights_from_disk",
            {
                "model_path": str(tmp_path / "v7"),
                "weight_version": "7",
                "flush_cache": True,
                "abort_all_requests": False,
            },
        ),
        ("/continue_generation", {}),
    ]
    tags, weights, rest = {"tags": list(MEMORY_TAGS)}, {"tags": ["weights"]}, {"tags": ["kv_cache", "cuda_graph"]}
    engine.release_memory()
    engine.release_memory()  # released already: no request
    assert server.released == set(MEMORY_TAGS) and server.paused
    engine.resume_memory()
    engine.resume_memory()  # nothing released: no request
    assert not server.released and not server.paused
    assert sent() == [
        ("/pause_generation", {"mode": "abort"}),
        ("/flush_cache", None),
        ("/release_memory_occupation", tags),
        ("/resume_memory_occupation", weights),
        ("/resume_memory_occupation", rest),
        ("/continue_generation", {}),
    ]

    engine.release_memory()
    engine.weight_sync = "tensor"
    engine.bucket_bytes = 20_000  # several buckets, each a partial load on the server
    engine.update_weights(((k, v.clone()) for k, v in new.state_dict().items()), version=8)
    requests = sent()
    bodies = [b for p, b in requests if p == "/update_weights_from_tensor"]
    n = len(bodies)
    assert n > 2
    assert [(p, b) for p, b in requests if p != "/update_weights_from_tensor"] == [
        ("/pause_generation", {"mode": "abort"}),
        ("/flush_cache", None),
        ("/release_memory_occupation", tags),
        ("/resume_memory_occupation", weights),
        ("/pause_generation", {"mode": "abort"}),
        ("/flush_cache", None),
        ("/begin_weight_update", {}),
        ("/end_weight_update", {}),
        ("/resume_memory_occupation", rest),
        ("/continue_generation", {}),
    ]
    assert [p for p, _ in requests][7 : 7 + n] == ["/update_weights_from_tensor"] * n  # between begin and end
    assert set(bodies[-1]) == {"serialized_named_tensors", "flush_cache", "abort_all_requests", "weight_version"}
    assert bodies[-1]["weight_version"] == "8" and bodies[-1]["flush_cache"] is True and server.weight_version == "8"
    assert all("weight_version" not in b and b["flush_cache"] is False for b in bodies[:-1])
    assert all(len(b["serialized_named_tensors"]) == 2 for b in bodies)  # one payload per TP rank
    params = SamplingParams(n=1, max_new_tokens=6, seed=1)
    assert _ids(engine.generate(PROMPTS, params)) == _ids(HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, params))
    engine.close()


def test_failed_tensor_update_closes_the_session_and_the_next_one_works(servers, model) -> None:
    a, b = servers(2)
    engine = _engine([a, b])
    b.faults.fail_weight_update = True
    with pytest.raises(WeightSyncError, match=f"{b.url}.*injected load failure"):
        engine.update_weights(model.state_dict().items(), version=1)
    assert not a.session_open and not b.session_open
    b.faults.fail_weight_update = False
    engine.update_weights(model.state_dict().items(), version=2)
    assert a.weight_version == "2" == b.weight_version
    engine.close()


@pytest.mark.parametrize("server_kind", [pytest.param("real", marks=pytest.mark.slow), "stand-in"])
@pytest.mark.parametrize("path", ["/update_weights_from_tensor", "/update_weights_from_distributed"])
def test_loads_outside_a_session_are_refused_with_sglangs_message(servers, request, server_kind, path) -> None:
    """The real server, and the stand-in like it, refuse bucket loads outside ``begin/end_weight_update`` with the
    message of the pinned wheel."""
    import urllib.error
    import urllib.request

    from tests import upstream

    headers = {"Content-Type": "application/json"}
    if server_kind == "real":
        real = request.getfixturevalue("real")
        url, headers["Authorization"] = real.url, f"Bearer {real.key}"
    else:
        (server,) = servers(1)
        url = server.url
        server.groups["weight_update_group"] = {}
    body = (
        {"serialized_named_tensors": [serialize_named_tensors([("model.norm.weight", torch.ones(32))])]}
        if "tensor" in path
        else {"names": [], "dtypes": [], "shapes": []}
    )
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    answer = json.loads(err.value.read())
    assert err.value.code == 400 and answer["success"] is False
    assert answer["message"] == upstream.session_messages()[path]
    assert "must run between begin_weight_update() and end_weight_update()" in answer["message"]


def test_distributed_sync_http_protocol(servers, model) -> None:
    """What the engine sends for NCCL weight sync (request recording) to two servers at ``tp_size`` 2, a layout the CPU
    server cannot run: ranks ``1 + i * tp_size``, one group name, the buckets' names, dtypes and shapes, the version
    on the last. The group and broadcasts are faked; real ones run in tests/test_sglang_real.py."""
    a, b = servers(2)
    engine = _engine([a, b], weight_sync="distributed", tp_size=2, bucket_mb=1, group_backend="gloo")
    calls: list[tuple[int, int, str]] = []

    def fake_group(addr: str, port: int, rank: int, world: int, name: str, backend: str) -> object:
        calls.append((rank, world, backend))
        return object()

    import luffy_megatron.rollout.sglang.sync.distributed as eng

    broadcasts: list[tuple[int, ...]] = []
    orig_group = eng.init_weights_update_group
    eng.init_weights_update_group = fake_group
    orig_bcast = torch.distributed.broadcast
    torch.distributed.broadcast = lambda t, src, group: broadcasts.append(tuple(t.shape))
    try:
        engine.update_weights(model.state_dict().items(), version=4)
    finally:
        eng.init_weights_update_group = orig_group
        torch.distributed.broadcast = orig_bcast
    assert calls == [(0, 5, "gloo")]
    inits = [next(r.body for r in s.requests if r.path == "/init_weights_update_group") for s in (a, b)]
    assert [i["rank_offset"] for i in inits] == [1, 3] and {i["world_size"] for i in inits} == {5}
    assert set(inits[0]) == {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
    updates = [r.body for r in a.requests if r.path == "/update_weights_from_distributed"]
    names = [n for u in updates for n in u["names"]]
    assert names == list(model.state_dict()) and len(broadcasts) == len(names)
    for u in updates:
        assert [list(model.state_dict()[n].shape) for n in u["names"]] == u["shapes"]
        assert set(u["dtypes"]) == {"float32"} and u["group_name"] == inits[0]["group_name"] == inits[1]["group_name"]
    assert inits[0]["group_name"].startswith("weight_update_group_")  # fresh per group
    assert updates[-1]["weight_version"] == "4" and all("weight_version" not in u for u in updates[:-1])
    assert a.weight_version == "4" == b.weight_version
    for s in (a, b):
        paths = [r.path for r in s.requests if r.path != "/init_weights_update_group"]
        assert paths == [
            "/pause_generation",
            "/flush_cache",
            "/begin_weight_update",
            *["/update_weights_from_distributed"] * len(updates),
            "/end_weight_update",
            "/continue_generation",
        ]
    engine.sync.group = None  # the fake group is not a real process group
    engine.close()


def test_trainer_address_routes_to_remote_servers(monkeypatch) -> None:
    """Debian-style hosts resolve their own name to 127.0.1.1; remote servers need the address of the route."""
    import shutil
    import socket
    import subprocess

    import psutil

    from luffy_megatron.rollout.sglang.weights import trainer_address

    monkeypatch.delenv("LUFFY_WEIGHT_SYNC_ADDR", raising=False)
    assert trainer_address(["http://127.0.0.1:30000", "http://localhost:30010"]) == "127.0.0.1"
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    remote = "192.0.2.10"  # TEST-NET-1: routed by the default route, never answers (nothing is sent anyway)
    try:
        addr = trainer_address([f"http://{remote}:30000"])
    except RolloutError as e:  # a host without any route: the error says what to set
        assert "LUFFY_WEIGHT_SYNC_ADDR" in str(e)
        return
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    assert addr in local and not addr.startswith("127.")
    if shutil.which("ip"):  # the kernel's own answer, independently
        out = subprocess.run(["ip", "-4", "route", "get", remote], capture_output=True, text=True).stdout.split()
        assert addr == out[out.index("src") + 1]
    monkeypatch.setenv("LUFFY_WEIGHT_SYNC_ADDR", "10.9.8.7")
    assert trainer_address([f"http://{remote}:30000"]) == "10.9.8.7"


def test_iter_buckets() -> None:
    ts = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([3, 3, 10, 1, 1])]
    buckets = list(iter_buckets(ts, bucket_bytes=24))
    assert [[n for n, _ in b] for b, _ in buckets] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert [last for _, last in buckets] == [False, False, True]
    assert list(iter_buckets([], 10)) == []


@pytest.mark.slow
def test_engine_from_config_attach_and_bad_url(real, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MY_SGLANG_KEY", real.key)
    cfg = SGLangConfig(
        urls=[real.url],
        api_key_env="MY_SGLANG_KEY",
        weight_sync="disk",
        weight_sync_dir=str(tmp_path),
        startup_timeout_s=5,
    )
    engine = build_rollout_engine(RolloutConfig(backend="sglang", sglang=cfg), real.model_dir, eos_token_ids=[1])
    assert isinstance(engine, SGLangEngine) and engine.client.server_urls == [real.url] and not engine.processes
    assert engine.health()["ok"] and len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 4
    assert real.key not in repr(engine.client)
    engine.close()
    assert real.proc.proc.poll() is None, "closing an attached engine leaves the server running"
    cfg = SGLangConfig(urls=["http://127.0.0.1:9"], startup_timeout_s=1.5)
    with pytest.raises(RolloutError, match=r"not healthy after .*http://127\.0\.0\.1:9"):
        SGLangEngine.from_config(cfg, hf_path=str(tmp_path))
    monkeypatch.delenv("MY_SGLANG_KEY")
    with pytest.raises(RolloutError, match="MY_SGLANG_KEY is not set"):
        SGLangEngine.from_config(SGLangConfig(urls=[real.url], api_key_env="MY_SGLANG_KEY"), hf_path=".")


@pytest.mark.slow
def test_no_thread_leak_after_close(real) -> None:
    before = threading.active_count()
    engine = _real_engine(real)
    engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    engine.close()
    time.sleep(0.1)
    assert threading.active_count() <= before


@pytest.mark.slow
def test_colocated_servers_release_memory_between_generation_and_weight_sync(real, monkeypatch) -> None:
    """The loop's own functions on a colocated real server: generation then release; a second dynamic-sampling round
    (resume, generate, release); (training); the weight sync takes the memory back and the new weights serve."""
    import luffy_megatron.train.producer as producer
    from luffy_megatron.config import RunConfig
    from luffy_megatron.train.producer import generate_groups, sync_weights

    engine = _real_engine(real, colocate=True)
    new = tiny_model(seed=6, scale=4.0)
    try:
        _load(engine, tiny_model(**REAL_MODEL), 0)
        cfg = RunConfig()
        cfg.rollout.n, cfg.rollout.n_off, cfg.data.max_response_length = 3, 1, 4
        run = SimpleNamespace(engine=engine, step=1, weight_version=0)
        traces = [[5, 1], None, [6, 1], None]  # two prompts with a trace: 2 samples each, the others 3
        batch = [SimpleNamespace(index=i, prompt_ids=p, trace_ids=t) for i, (p, t) in enumerate(zip(PROMPTS, traces))]
        for round_index in (0, 1):
            samples, counts = generate_groups(cfg, run, batch, step=1, round_index=round_index)
            assert len(samples) == 12 and sum(s.off_policy for s in samples) == 2
            assert counts == {"rollout/samples_generated": 10.0, "rollout/samples_discarded": 0.0}
            assert all(0 < len(s.response_ids) <= 4 for s in samples if not s.off_policy)
            assert engine._released == set(MEMORY_TAGS)
        monkeypatch.setattr(producer, "iter_hf_weights", lambda modules, spec: iter([list(new.state_dict().items())]))
        sync_weights(run, SimpleNamespace(modules=None, spec=None))
        assert not engine._released and engine.weight_version == 1
        out = engine.generate(PROMPTS, GREEDY)
        _assert_same_greedy(out, HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, GREEDY))
        assert {o.meta["server_weight_version"] for r in out for o in r} == {"1"}
    finally:
        if engine._released:  # leave the shared server serving
            engine.resume_memory()
        engine.close()


def test_through_a_router_each_sample_is_its_own_request_and_an_unreadable_answer_is_shown() -> None:
    """sglang-router takes one sampling_params object and one rid per request; an answer the client cannot read is
    reported with its body (here: the router's 422 text is a 4xx, a list is not one answer object)."""
    router, server = "http://router:1", "http://server:2"
    client = SGLangClient([router], [server], max_retries=0)
    sent: list[tuple[str, str, dict]] = []

    async def fake_request(url, path, body=None, **kw):
        sent.append((url, path, body))
        return [{"unexpected": "list"}] if path == "/generate" else {"success": True}

    async def generate_then_close(reqs: list[SampleRequest]) -> None:
        try:
            await client.generate(reqs)
        finally:
            await client.close()

    client.request = fake_request  # type: ignore[method-assign]
    reqs = [SampleRequest(f"r{i}", [5, 6], {"max_new_tokens": 2}) for i in range(2)]
    with pytest.raises(RolloutError, match=r"expected one answer object, got: \[\{'unexpected': 'list'\}\]"):
        asyncio.run(generate_then_close(reqs))
    generated = [(u, b["rid"], b["sampling_params"]) for u, path, b in sent if path == "/generate"]
    assert generated == [(router, "r0", {"max_new_tokens": 2}), (router, "r1", {"max_new_tokens": 2})]
    assert {u for u, path, _ in sent if path == "/abort_request"} <= {server}  # the router has no /abort_request
