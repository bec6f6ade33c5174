"""SGLang client and engine against the protocol-faithful local test server (tests/sglang_test_server.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
import torch

from luffy_megatron.config import RolloutConfig, SGLangConfig
from luffy_megatron.rollout import RolloutError, SamplingParams, WeightSyncError, sample_seed
from luffy_megatron.rollout.factory import build_rollout_engine
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang.client import (
    SAMPLING_KEYS,
    RequestRejected,
    RetryableError,
    SampleRequest,
    SGLangClient,
    parse_sample,
)
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.weights import iter_buckets
from tests.sglang_test_server import SGLangTestServer, schema, tiny_model

PROMPTS = [[3, 4, 5], [7, 8], [9, 10, 11, 12], [13]]


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
    client_kw = {k: kw.pop(k) for k in list(kw) if k in ("api_key", "max_retries", "backoff_s", "request_timeout_s",
                                                           "samples_per_request")}  # fmt: skip
    client_kw.setdefault("backoff_s", 0.01)
    client = SGLangClient([s.url for s in servers], **client_kw)
    return SGLangEngine(client, weight_sync_dir=str(tmp_path) if tmp_path else None,
                        weight_sync=kw.pop("weight_sync", "disk" if tmp_path else "tensor"), eos_token_ids=[1],
                        **kw)  # fmt: skip


def _generate_bodies(server: SGLangTestServer) -> list[dict]:
    return [r.body for r in server.requests if r.path == "/generate"]


def test_generate_matches_in_process_engine_and_request_bodies(servers, model) -> None:
    (server,) = servers(1)
    engine = _engine([server], samples_per_request=5)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, seed=4)
    out = engine.generate(PROMPTS, params)
    ref = HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, params)
    assert [[o.output_ids for o in row] for row in out] == [[o.output_ids for o in row] for row in ref]
    for row, rrow in zip(out, ref):
        for o, r in zip(row, rrow):
            assert o.finish_reason == r.finish_reason and len(o.logprobs) == len(o.output_ids)
            assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-5)
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


def test_unknown_sampling_key_rejected_by_server_and_client(servers) -> None:
    (server,) = servers(1)
    client = SGLangClient([server.url], max_retries=0)

    async def go() -> None:
        with pytest.raises(RequestRejected, match="400.*unexpected keyword"):
            await client.request(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"temprature": 1}})
        with pytest.raises(RolloutError, match="not in the documented"):
            await client.generate([SampleRequest("a", [1, 2], {"best_of": 2})])
        single = await client.request(server.url, "/generate", {"input_ids": [2, 3], "return_logprob": True,
                                                               "sampling_params": {"max_new_tokens": 3}})  # fmt: skip
        assert isinstance(single, dict) and len(single["meta_info"]["output_token_logprobs"]) == len(
            single["output_ids"]
        )
        await client.close()

    asyncio.run(go())


def test_per_prompt_counts_send_exactly_those_requests_with_the_full_requests_seeds(servers, model) -> None:
    (server,) = servers(1)
    engine = _engine([server], samples_per_request=4)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=9)
    counts = [3, 4, 0, 2]
    out = engine.generate(PROMPTS, params, counts)
    ref = HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, params)
    assert [len(r) for r in out] == counts
    assert [[o.output_ids for o in r] for r in out] == [[o.output_ids for o in r[:c]] for r, c in zip(ref, counts)]
    sent = [sp["sampling_seed"] for b in _generate_bodies(server) for sp in b["sampling_params"]]
    expected = [sample_seed(9, i, j) for i, c in enumerate(counts) for j in range(c)]
    assert sorted(sent) == sorted(expected) and len(sent) == sum(counts)
    engine.close()


def test_async_rollout_generates_from_a_background_thread_then_syncs_at_the_boundary(servers, model) -> None:
    """The asynchronous loop's use of the servers: a batch generated in the rollout thread, then a weight update."""
    from luffy_megatron.train.async_rollout import RolloutPrefetcher

    (server,) = servers(1)
    engine = _engine([server])
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    prefetcher = RolloutPrefetcher()
    try:
        prefetcher.start(2, 0, lambda: ([], {"ids": engine.generate(PROMPTS, params, [2, 1, 2, 1])}))
        batch = prefetcher.take(2)
        ref = HFEngine(model, eos_token_ids=[1]).generate(PROMPTS, params, [2, 1, 2, 1])
        assert [[o.output_ids for o in r] for r in batch.metrics["ids"]] == [[o.output_ids for o in r] for r in ref]
        new = tiny_model(seed=6, scale=4.0)
        engine.update_weights(new.state_dict().items(), version=1)
        prefetcher.start(3, 1, lambda: ([], {"ids": engine.generate(PROMPTS, params)}))
        after = prefetcher.take(3).metrics["ids"]
        assert [[o.output_ids for o in r] for r in after] == [
            [o.output_ids for o in r] for r in HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, params)
        ]
        assert all(o.weight_version == 1 for r in after for o in r)
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


def test_trimmed_stop_token_restored_from_logprobs(servers, model) -> None:
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


def test_abort_request_matches_the_rid_exactly(model) -> None:
    """SGLang looks the rid up exactly (``rid_to_state.get(rid)``): a prefix aborts nothing."""
    server = SGLangTestServer(HFEngine(model, eos_token_ids=[]))  # never stops by itself
    server.start()
    server.faults.step_delay_s = 0.02
    client = SGLangClient([server.url])

    async def go() -> None:
        reqs = [SampleRequest("job-1", [2, 3], {"max_new_tokens": 40}),
                SampleRequest("job-2", [2, 4], {"max_new_tokens": 40})]  # fmt: skip
        task = asyncio.ensure_future(client.generate(reqs))
        await asyncio.sleep(0.3)
        await client.abort(rid="job-")  # a prefix: not a rid, nothing happens
        await client.abort(rid="job-1")
        res = await asyncio.wait_for(task, 30)
        assert res["job-1"].finish_reason == "abort" and 0 < len(res["job-1"].output_ids) < 40
        assert res["job-2"].finish_reason == "length" and len(res["job-2"].output_ids) == 40
        await client.close()

    asyncio.run(go())
    bodies = [r.body for r in server.requests if r.path == "/abort_request"]
    assert bodies == [{"rid": "job-", "abort_all": False}, {"rid": "job-1", "abort_all": False}]
    server.stop()


def test_api_key_required_and_never_logged(servers, caplog) -> None:
    secret = "sk-test-Zq81"
    (server,) = servers(1, api_key=secret)
    server.faults.status_5xx = 1
    bad = _engine([server], api_key="wrong", max_retries=0)
    with pytest.raises(RolloutError, match="401"):
        bad.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    bad.close()
    caplog.set_level(logging.DEBUG)
    engine = _engine([server], api_key=secret)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert len(out) == 4
    assert all(r.authorization == f"Bearer {secret}" for r in server.requests[-2:])
    assert secret not in caplog.text and secret not in repr(engine.client)
    assert "retry" in caplog.text or "failed" in caplog.text  # the 5xx was logged, without the key
    engine.close()


def test_weight_update_from_disk_changes_outputs(servers, tmp_path) -> None:
    a, b = servers(2)
    engine = _engine([a, b], tmp_path)
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    before = engine.generate(PROMPTS, params)
    new = tiny_model(seed=99, scale=4.0)
    engine.bucket_bytes = 20_000  # several shards
    engine.update_weights(new.state_dict().items(), version=7)
    after = engine.generate(PROMPTS, params)
    ref = HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, params)
    assert [[o.output_ids for o in r] for r in after] == [[o.output_ids for o in r] for r in ref]
    assert [[o.output_ids for o in r] for r in after] != [[o.output_ids for o in r] for r in before]
    assert {o.meta["server_weight_version"] for r in after for o in r} == {"7"}
    assert engine.weight_version == 7 and all(o.weight_version == 7 for r in after for o in r)
    for s in (a, b):
        paths = [r.path for r in s.requests if r.path != "/generate"]
        assert paths == ["/pause_generation", "/flush_cache", "/update_weights_from_disk", "/continue_generation"]
        body = next(r.body for r in s.requests if r.path == "/update_weights_from_disk")
        assert body == {"model_path": str(tmp_path / "v7"), "weight_version": "7", "flush_cache": True,
                        "abort_all_requests": False}  # fmt: skip
        assert next(r.body for r in s.requests if r.path == "/pause_generation") == {"mode": "abort"}
    assert len(list((tmp_path / "v7").glob("*.safetensors"))) > 1
    engine.update_weights(new.state_dict().items(), version=8)
    assert not (tmp_path / "v7").exists() and (tmp_path / "v8").is_dir()
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


def test_weight_update_from_tensor_and_memory_release(servers) -> None:
    (server,) = servers(1)
    engine = _engine([server], colocate=True, tp_size=2)
    engine.bucket_bytes = 20_000  # several buckets, each a partial load on the server
    new = tiny_model(seed=5, scale=4.0)
    engine.release_memory()
    assert server.released == {"kv_cache", "weights", "cuda_graph"}
    engine.resume_memory()
    assert not server.released
    engine.update_weights(((k, v.clone()) for k, v in new.state_dict().items()), version=3)
    params = SamplingParams(n=1, max_new_tokens=6, seed=1)
    ref = HFEngine(new, eos_token_ids=[1]).generate(PROMPTS, params)
    assert [[o.output_ids for o in r] for r in engine.generate(PROMPTS, params)] == [
        [o.output_ids for o in r] for r in ref
    ]
    bodies = [r.body for r in server.requests if r.path == "/update_weights_from_tensor"]
    assert len(bodies) > 2
    assert set(bodies[-1]) == {"serialized_named_tensors", "flush_cache", "abort_all_requests", "weight_version"}
    assert len(bodies[-1]["serialized_named_tensors"]) == 2 and bodies[-1]["weight_version"] == "3"
    assert all("weight_version" not in b and b["flush_cache"] is False for b in bodies[:-1])
    assert bodies[-1]["flush_cache"] is True and server.weight_version == "3"
    assert all(len(set(b["serialized_named_tensors"])) == 2 for b in bodies)  # one serialization per TP rank
    assert [r.body for r in server.requests if r.path == "/release_memory_occupation"] == [{"tags": None}]
    paths = [r.path for r in server.requests if r.path != "/generate"]
    n = len(bodies)
    assert paths == ["/release_memory_occupation", "/resume_memory_occupation", "/pause_generation", "/flush_cache",
                     "/begin_weight_update", *["/update_weights_from_tensor"] * n, "/end_weight_update",
                     "/continue_generation"]  # fmt: skip
    engine.resume_memory()  # nothing released: no request
    assert [r.path for r in server.requests].count("/resume_memory_occupation") == 1
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


@pytest.mark.parametrize("path", ["/update_weights_from_tensor", "/update_weights_from_distributed"])
def test_test_server_rejects_loads_outside_a_session_like_sglang(servers, path) -> None:
    import urllib.error
    import urllib.request

    from tests import upstream

    (server,) = servers(1)
    body = {"serialized_named_tensors": ["x"]} if "tensor" in path else {"names": [], "dtypes": [], "shapes": []}
    if "distributed" in path:
        server.groups["weight_update_group"] = {}
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    answer = json.loads(err.value.read())
    assert err.value.code == 400 and answer["success"] is False
    assert answer["message"] == upstream.session_messages()[path]
    assert "must run between begin_weight_update() and end_weight_update()" in answer["message"]


def test_distributed_sync_http_protocol(servers, model) -> None:
    """The HTTP half of NCCL weight sync; the broadcasts run over gloo here (NCCL needs GPUs)."""
    a, b = servers(2)
    engine = _engine([a, b], weight_sync="distributed", tp_size=2, bucket_mb=1, group_backend="gloo")
    calls: list[tuple[int, int, str]] = []

    def fake_group(addr: str, port: int, rank: int, world: int, name: str, backend: str) -> object:
        calls.append((rank, world, backend))
        return object()

    import luffy_megatron.rollout.sglang.engine as eng

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
        assert set(u["dtypes"]) == {"float32"} and u["group_name"] == "weight_update_group"
    assert updates[-1]["weight_version"] == "4" and all("weight_version" not in u for u in updates[:-1])
    assert a.weight_version == "4" == b.weight_version
    for s in (a, b):
        paths = [r.path for r in s.requests if r.path != "/init_weights_update_group"]
        assert paths == ["/pause_generation", "/flush_cache", "/begin_weight_update",
                         *["/update_weights_from_distributed"] * len(updates), "/end_weight_update",
                         "/continue_generation"]  # fmt: skip
    engine._group = None  # the fake group is not a real process group
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


def test_engine_from_config_attach_and_bad_url(servers, tmp_path, monkeypatch) -> None:
    (server,) = servers(1, api_key="k-123")
    monkeypatch.setenv("MY_SGLANG_KEY", "k-123")
    cfg = SGLangConfig(urls=[server.url], api_key_env="MY_SGLANG_KEY", weight_sync="disk",
                       weight_sync_dir=str(tmp_path), startup_timeout_s=5)  # fmt: skip
    engine = build_rollout_engine(RolloutConfig(backend="sglang", sglang=cfg), str(tmp_path), eos_token_ids=[1])
    assert isinstance(engine, SGLangEngine) and engine.client.server_urls == [server.url]
    assert engine.health()["ok"] and len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 4
    assert "k-123" not in repr(engine.client)
    engine.close()
    cfg = SGLangConfig(urls=["http://127.0.0.1:9"], startup_timeout_s=1.5)
    with pytest.raises(RolloutError, match=r"not healthy after .*http://127\.0\.0\.1:9"):
        SGLangEngine.from_config(cfg, hf_path=str(tmp_path))
    monkeypatch.delenv("MY_SGLANG_KEY")
    with pytest.raises(RolloutError, match="MY_SGLANG_KEY is not set"):
        SGLangEngine.from_config(SGLangConfig(urls=[server.url], api_key_env="MY_SGLANG_KEY"), hf_path=".")


def test_no_thread_leak_after_close(servers) -> None:
    (server,) = servers(1)
    before = threading.active_count()
    engine = _engine([server])
    engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    engine.close()
    time.sleep(0.1)
    assert threading.active_count() <= before + 1  # executor threads of the server may linger


def test_colocated_servers_release_memory_between_generation_and_weight_sync(servers, model, monkeypatch) -> None:
    """The loop's own functions: generation, release; (training); resume, then the session-framed update."""
    from types import SimpleNamespace

    import luffy_megatron.train.loop as loop
    from luffy_megatron.config import RunConfig
    from luffy_megatron.train.loop import generate_groups, sync_weights

    (server,) = servers(1)
    engine = _engine([server], colocate=True)
    cfg = RunConfig()
    cfg.rollout.n, cfg.rollout.n_off, cfg.data.max_response_length = 3, 1, 4
    run = SimpleNamespace(engine=engine, step=1, weight_version=0)
    traces = [[5, 1], None, [6, 1], None]  # two prompts with a trace: 2 samples each, the others 3
    batch = [SimpleNamespace(index=i, prompt_ids=p, trace_ids=t) for i, (p, t) in enumerate(zip(PROMPTS, traces))]
    samples, counts = generate_groups(cfg, run, batch, step=1)
    assert len(samples) == 12 and sum(s.off_policy for s in samples) == 2
    assert counts == {"rollout/samples_generated": 10.0, "rollout/samples_discarded": 0.0}
    assert sum(len(b["rid"]) for b in _generate_bodies(server)) == 10
    assert server.released == {"kv_cache", "weights", "cuda_graph"}
    new = tiny_model(seed=6, scale=4.0)
    monkeypatch.setattr(loop, "iter_hf_weights", lambda modules, spec: iter([list(new.state_dict().items())]))
    sync_weights(run, SimpleNamespace(modules=None, spec=None))
    assert not server.released and server.weight_version == "1"
    paths = [r.path for r in server.requests if r.path != "/generate"]
    assert paths[:5] == ["/release_memory_occupation", "/resume_memory_occupation", "/pause_generation",
                         "/flush_cache", "/begin_weight_update"]  # fmt: skip
    assert paths[-2:] == ["/end_weight_update", "/continue_generation"]
    engine.close()
