"""A stand-in for an SGLang server, backed by the in-process HF engine, kept only for what the real server cannot do.

Ordinary behaviour (generation, weight sync in every mode, colocated release and resume, the API key, exact-rid
aborts, stop tokens, attaching, launching, restarts) is tested against the real SGLang server and sglang-router: the
``sglang`` test tier (``tests/sglang_real.py``, SGLang's CPU engine). What the real server cannot do, and this one is
for:

1. Fault injection (:class:`Faults`, per server, switched on and off mid-test): 5xx answers, malformed JSON, slow
   answers (before answering, or per decode step, to land a kill mid-generation), a wrong number of answers, dying
   mid-batch (on the N-th ``/generate``, or :meth:`SGLangTestServer.kill`: every connection cut, port closed), failed
   weight loads on one server, and answers whose ``output_ids`` lack the matched stop token (SGLang 0.5.23 keeps it).
2. Request recording: every request (path, body, ``Authorization``) is kept in ``requests``, so that tests check the
   exact requests the client sends and their order, including layouts the CPU server cannot run (``tp_size`` 2: one
   tensor payload per TP rank, weight-group ranks ``1 + i * tp_size``) and a "router" that records what reaches it.

Where those tests rely on the protocol, it follows the pinned SGLang wheel (``tests/upstream.py``): the ``/generate``
and weight request fields (``io_struct``; unknown weight-request fields are answered with 400, where SGLang ignores
them), the ``sampling_params`` keys, SGLang's own API-key decision per route (``decide_request_auth``), the
weight-update session with upstream's rejection message, exact ``rid`` matching of ``/abort_request``, tensor
payloads read with SGLang's own ``SafeUnpickler``, and weight-update groups joined with SGLang's own
``init_custom_process_group``.

In tests: ``server = SGLangTestServer(engine, api_key=...); url = server.start()``. As a process (servers that die
under the supervisor): ``python -m tests.sglang_test_server --model-path DIR --host 127.0.0.1 --port P
[--step-delay-s S] [--join-weight-groups]`` accepts SGLang's launch flags.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.rollout.hf_engine import HFEngine
from tests.fixtures_models import save_tiny_model, tiny_model

# The model helpers live in tests/fixtures_models.py; they are re-exported for the tests that import them from here.
__all__ = ["Faults", "SGLangTestServer", "main", "save_tiny_model", "schema", "tiny_model"]

UNSUPPORTED_HERE = frozenset(
    ["stop", "stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "custom_params"]
)
#: Routes of the weight-update protocol whose request bodies are checked field by field.
WEIGHT_ROUTES = (
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/init_weights_update_group",
    "/update_weights_from_distributed",
    "/destroy_weights_update_group",
    "/begin_weight_update",
    "/end_weight_update",
)


@cache
def schema() -> dict[str, Any]:
    """Request fields, sampling keys and session messages, read from the pinned SGLang wheel."""
    from tests import upstream

    return {
        "generate": set(upstream.route_fields("/generate")),
        "sampling": set(upstream.sampling_api_keys()),
        "weights": {p: upstream.route_fields(p) for p in WEIGHT_ROUTES},
        "session": upstream.session_messages(),
        "common": upstream.upstream_common(),
        "auth": upstream.upstream_auth(),
    }


def auth_decision(method: str, path: str, authorization: str | None, api_key: str) -> Any:
    """SGLang's own decision (allowed, status) for a request to a server started with ``--api-key``."""
    auth = schema()["auth"]
    level = auth["AuthLevel"][auth["levels"].get(path, "NORMAL")]
    return auth["decide_request_auth"](
        method=method,
        path=path,
        authorization_header=authorization,
        api_key=api_key,
        admin_api_key=None,
        auth_level=level,
    )


BODY = web.RequestKey("body", object)


@dataclass
class Faults:
    """Fault injection; counters count down per ``/generate`` request."""

    status_5xx: int = 0  # answer the next N /generate requests with 503
    malformed: int = 0  # answer the next N /generate requests with broken JSON
    wrong_count: int = 0  # answer the next N /generate requests with one answer missing
    delay_s: float = 0.0  # sleep before answering every /generate request
    step_delay_s: float = 0.0  # sleep per decode step (slow generation; abortable)
    die_on_request: int | None = None  # cut all connections and close the port on the N-th /generate (1-based)
    fail_weight_update: bool = False  # weight updates answer 400 {success: false}
    trim_stop: bool = False  # leave the matched stop token out of output_ids (it stays in output_token_logprobs)


@dataclass
class Recorded:
    path: str
    method: str
    body: Any
    authorization: str | None


@dataclass
class SGLangTestServer:
    """One fake SGLang server in a background thread (127.0.0.1, port 0 unless given)."""

    engine: HFEngine
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    faults: Faults = field(default_factory=Faults)
    requests: list[Recorded] = field(default_factory=list)
    weight_version: str = "default"
    paused: bool = False
    released: set[str] = field(default_factory=set)
    groups: dict[str, dict] = field(default_factory=dict)
    session_open: bool = False
    generate_count: int = 0
    dead: bool = False
    join_groups: bool = False  # join weight-update process groups for real (gloo on CPU) instead of recording them
    tp_size: int = 1  # reported by /server_info, as SGLang reports its --tp-size

    def __post_init__(self) -> None:
        self._aborted: set[str] = set()
        self._abort_all = False
        self._active: set[str] = set()
        self._lock = threading.Lock()  # one engine call at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._continue: asyncio.Event | None = None
        self._pgs: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start serving; returns the base URL."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("test server did not start")
        return self.url

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start_site())
        ready.set()
        self._loop.run_forever()

    async def _start_site(self) -> None:
        schema()  # read the upstream wheel before serving
        self._continue = asyncio.Event()
        self._continue.set()
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        routes = {
            "/generate": self._generate,
            "/flush_cache": self._flush_cache,
            "/update_weights_from_disk": self._update_from_disk,
            "/update_weights_from_tensor": self._update_from_tensor,
            "/init_weights_update_group": self._weight_group,
            "/update_weights_from_distributed": self._weight_group,
            "/destroy_weights_update_group": self._weight_group,
            "/begin_weight_update": self._session,
            "/end_weight_update": self._session,
            "/abort_request": self._abort_request,
            "/pause_generation": self._pause,
            "/continue_generation": self._continue_generation,
            "/update_weight_version": self._update_weight_version,
            "/release_memory_occupation": self._memory,
            "/resume_memory_occupation": self._memory,
        }
        for path, handler in routes.items():
            app.router.add_post(path, handler)
        for path in ("/health", "/health_generate", "/flush_cache", "/model_info", "/server_info"):
            app.router.add_get(path, self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Graceful shutdown."""
        if self._loop is None or self.dead:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)  # type: ignore[union-attr]
        self._loop.call_soon_threadsafe(self._loop.stop)
        self.dead = True

    def kill(self) -> None:
        """Die abruptly: cut every open connection and stop listening (like SIGKILL, seen from the client)."""
        if self._loop is None or self.dead:
            return
        self.dead = True
        self._abort_all = True

        def _cut() -> None:
            for tr in list(self._transports):
                tr.abort()
            for srv in self._runner.sites:  # type: ignore[union-attr]
                srv._server.close()  # type: ignore[attr-defined]

        self._loop.call_soon_threadsafe(_cut)

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.dead:
            request.transport.abort()  # type: ignore[union-attr]
            raise ConnectionResetError
        if request.transport is not None:
            self._transports.add(request.transport)
        body: Any = None
        if request.method == "POST" and request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return web.json_response({"error": "invalid JSON body"}, status=400)
        auth = request.headers.get("Authorization")
        self.requests.append(Recorded(request.path, request.method, body, auth))
        if self.api_key:  # SGLang adds its key check only when started with a key
            decision = auth_decision(request.method, request.path, auth, self.api_key)
            if not decision.allowed:
                return web.json_response({"error": "Unauthorized"}, status=decision.error_status_code)
        request[BODY] = body
        return await handler(request)

    # ------------------------------------------------------------------ handlers
    async def _get(self, request: web.Request) -> web.Response:
        if request.path.startswith("/health"):
            return web.Response()
        if request.path == "/flush_cache":
            return await self._flush_cache(request)
        return web.json_response(
            {"weight_version": self.weight_version, "is_generation": True, "tp_size": self.tp_size}
        )

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = request[BODY]
        self.generate_count += 1
        f = self.faults
        if f.die_on_request is not None and self.generate_count >= f.die_on_request:
            self.kill()
            await asyncio.sleep(0.05)
            raise ConnectionResetError
        if f.status_5xx > 0:
            f.status_5xx -= 1
            return web.json_response({"error": "injected"}, status=503)
        try:
            rows, seeds, params, rids = _parse_generate(body)
        except ValueError as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        assert self._continue is not None
        await self._continue.wait()  # paused: hold new requests until /continue_generation
        if f.delay_s:
            await asyncio.sleep(f.delay_s)
        t0 = time.perf_counter()
        self._active.update(rids)
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, self._run, rows, seeds, params, rids)
        finally:
            self._active.difference_update(rids)
        if f.malformed > 0:
            f.malformed -= 1
            return web.Response(text='[{"output_ids": [1, 2', content_type="application/json")
        answers = []
        for rid, row, res in zip(rids, rows, results):
            finish: dict[str, Any] = {"type": res.finish_reason}
            if res.finish_reason == "stop":
                finish["matched"] = res.matched_stop
            elif res.finish_reason == "length":
                finish["length"] = len(res.output_ids)
            else:
                finish.update(message="Abort request", status_code=200, err_type=None)
            meta = {
                "id": rid,
                "finish_reason": finish,
                "prompt_tokens": len(row),
                "completion_tokens": len(res.output_ids),
                "cached_tokens": 0,
                "weight_version": self.weight_version,
                "e2e_latency": time.perf_counter() - t0,
            }
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(res.logprobs, res.output_ids)]
            ids = res.output_ids[:-1] if f.trim_stop and res.finish_reason == "stop" else res.output_ids
            answers.append({"output_ids": ids, "meta_info": meta})
        if f.wrong_count > 0:
            f.wrong_count -= 1
            answers = answers[:-1]
        single = not isinstance(body["input_ids"][0], list)
        return web.json_response(answers[0] if single else answers)

    def _run(self, rows: list[list[int]], seeds: list, params: SamplingParams, rids: list[str]) -> list:
        delay = self.faults.step_delay_s

        def is_aborted(r: int) -> bool:
            if delay and r == 0:
                time.sleep(delay)
            rid = rids[r]
            return self._abort_all or self.dead or rid in self._aborted  # SGLang matches the rid exactly

        with self._lock:
            return self.engine.generate_rows(rows, params, seeds, is_aborted)

    async def _flush_cache(self, request: web.Request) -> web.Response:
        if self._active:
            return web.Response(text="Cache not flushed: there are pending requests.", status=400)
        return web.Response(text="Cache flushed.")

    async def _abort_request(self, request: web.Request) -> web.Response:
        body = request[BODY] or {}
        if body.get("abort_all"):
            self._abort_all = True
            await asyncio.sleep(0.05)
            self._abort_all = False
        elif body.get("rid"):
            self._aborted.add(body["rid"])
        return web.Response()

    async def _pause(self, request: web.Request) -> web.Response:
        mode = (request[BODY] or {}).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return web.json_response({"error": f"bad mode {mode}"}, status=400)
        self.paused = True
        assert self._continue is not None
        self._continue.clear()
        if mode == "abort":
            self._abort_all = True
        return web.json_response({"success": True, "message": "Generation paused."})

    async def _continue_generation(self, request: web.Request) -> web.Response:
        self.paused = False
        self._abort_all = False
        assert self._continue is not None
        self._continue.set()
        return web.json_response({"success": True, "message": "Generation continued."})

    async def _update_weight_version(self, request: web.Request) -> web.Response:
        body = request[BODY] or {}
        if "new_version" not in body:
            return web.json_response({"success": False, "message": "new_version required"}, status=400)
        self.weight_version = str(body["new_version"])
        return web.json_response({"success": True, "message": "ok"})

    async def _memory(self, request: web.Request) -> web.Response:
        tags = (request[BODY] or {}).get("tags") or ["kv_cache", "weights", "cuda_graph"]
        if request.path.startswith("/release"):
            self.released.update(tags)
        else:
            self.released.difference_update(tags)
        return web.json_response({"success": True, "message": "ok"})

    def _check_weight_body(self, request: web.Request) -> tuple[dict, web.Response | None]:
        body = request[BODY]
        if not isinstance(body, dict):
            return {}, web.json_response({"success": False, "message": "JSON object required"}, status=400)
        fields = schema()["weights"][request.path]
        unknown = set(body) - set(fields)
        missing = {k for k, has_default in fields.items() if not has_default} - set(body)
        if unknown or missing:
            msg = f"unknown keys {sorted(unknown)}, missing required keys {sorted(missing)}"
            return body, web.json_response({"success": False, "message": msg}, status=400)
        if request.path in schema()["session"] and not self.session_open:
            return body, web.json_response({"success": False, "message": schema()["session"][request.path]}, status=400)
        if self.faults.fail_weight_update and request.path not in ("/begin_weight_update", "/end_weight_update"):
            return body, web.json_response({"success": False, "message": "injected load failure"}, status=400)
        return body, None

    async def _load(self, body: dict, stream: Any, strict: bool = True) -> web.Response:
        version = body.get("weight_version")
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._load_sync, stream, strict)
        except Exception as e:
            return web.json_response({"success": False, "message": f"{type(e).__name__}: {e}"}, status=400)
        if version is not None:
            self.weight_version = str(version)
        return web.json_response(
            {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        )

    def _load_sync(self, stream: Any, strict: bool) -> None:
        with self._lock:
            if strict:  # a whole checkpoint (from disk)
                self.engine.update_weights(stream(), version=self.engine.weight_version or 0)
            else:  # one bucket of a bucketed update, as SGLang loads them
                self.engine.load_weights(stream(), strict=False)

    async def _update_from_disk(self, request: web.Request) -> web.Response:
        body, err = self._check_weight_body(request)
        if err is not None:
            return err
        path = Path(body.get("model_path", ""))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            return web.json_response({"success": False, "message": f"no safetensors in {path}"}, status=400)

        def stream() -> Any:
            from safetensors import safe_open

            for fname in files:
                with safe_open(str(fname), framework="pt") as fh:
                    for name in fh.keys():  # noqa: SIM118
                        yield name, fh.get_tensor(name)

        return await self._load(body, stream)

    async def _update_from_tensor(self, request: web.Request) -> web.Response:
        body, err = self._check_weight_body(request)
        if err is not None:
            return err
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not blobs:
            return web.json_response({"success": False, "message": "serialized_named_tensors: list"}, status=400)
        unpickler = schema()["common"]["SafeUnpickler"]
        try:  # every TP rank reads its own payload, with SGLang's allow-list
            per_rank = [unpickler(io.BytesIO(base64.b64decode(b, validate=True))).load() for b in blobs]
        except Exception as e:
            return web.json_response({"success": False, "message": f"{type(e).__name__}: {e}"}, status=400)
        named = per_rank[0]
        return await self._load(body, lambda: iter(named), strict=False)

    async def _session(self, request: web.Request) -> web.Response:
        body, err = self._check_weight_body(request)
        if err is not None:
            return err
        opening = request.path == "/begin_weight_update"
        if opening == self.session_open:
            msg = (
                "a weight-update session is already open; call end_weight_update() first"
                if opening
                else "no weight-update session is open; call begin_weight_update() first"
            )
            return web.json_response({"success": False, "message": msg}, status=400)
        self.session_open = opening
        return web.json_response({"success": True, "message": "Success"})

    async def _weight_group(self, request: web.Request) -> web.Response:
        body, err = self._check_weight_body(request)
        if err is not None:
            return err
        name = body.get("group_name", "weight_update_group")
        run = asyncio.get_running_loop().run_in_executor
        if request.path == "/init_weights_update_group":
            self.groups[name] = body
            if self.join_groups:  # really join, with SGLang's own function: rank ``rank_offset`` (one GPU per server)
                join = functools.partial(
                    schema()["common"]["init_custom_process_group"],
                    backend=body.get("backend", "nccl"),
                    init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                    world_size=body["world_size"],
                    rank=body["rank_offset"],
                    group_name=name,
                    timeout=timedelta(seconds=120),
                )
                self._pgs[name] = await run(None, join)
        elif name not in self.groups:
            return web.json_response({"success": False, "message": f"no weight update group {name!r}"}, status=400)
        elif request.path == "/destroy_weights_update_group":
            del self.groups[name]
            if name in self._pgs:
                torch.distributed.destroy_process_group(self._pgs.pop(name))
        else:
            if not (len(body["names"]) == len(body["dtypes"]) == len(body["shapes"])):
                return web.json_response({"success": False, "message": "names/dtypes/shapes differ"}, status=400)
            if name in self._pgs:
                await run(None, self._receive_broadcasts, self._pgs[name], body)
            if body.get("weight_version") is not None:
                self.weight_version = str(body["weight_version"])
        return web.json_response({"success": True, "message": "ok"})

    def _receive_broadcasts(self, group: Any, body: dict) -> None:
        """Receive one bucket from the trainer's rank 0, in the order of ``names``, and load it."""
        named = []
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(t, src=0, group=group)
            named.append((name, t))
        with self._lock:
            self.engine.load_weights(named, strict=False)


def _parse_generate(body: Any) -> tuple[list[list[int]], list[int | None], SamplingParams, list[str]]:
    """Validate a /generate body like SGLang does; expands ``n`` into rows."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - schema()["generate"]
    if unknown:
        raise ValueError(f"unexpected keyword arguments {sorted(unknown)}")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise ValueError("input_ids required (text is not supported with --skip-tokenizer-init)")
    batch = ids if isinstance(ids[0], list) else [ids]
    sp = body.get("sampling_params") or {}
    sps = sp if isinstance(sp, list) else [sp] * len(batch)
    rid = body.get("rid")
    rids = rid if isinstance(rid, list) else [rid or f"auto-{i}-{time.time_ns()}" for i in range(len(batch))]
    if len(sps) != len(batch) or len(rids) != len(batch):
        raise ValueError("sampling_params / rid lists must match input_ids")
    rows, seeds, out_rids, shared = [], [], [], None
    for prompt, p, r in zip(batch, sps, rids):
        if not isinstance(p, dict):
            raise ValueError("sampling_params must be an object")
        bad = set(p) - schema()["sampling"]
        if bad:
            raise ValueError(f"SamplingParams got unexpected keyword arguments {sorted(bad)}")
        if set(p) & UNSUPPORTED_HERE:
            raise ValueError(f"not supported by the test server: {sorted(set(p) & UNSUPPORTED_HERE)}")
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("input_ids must be integers")
        params = SamplingParams(
            n=1,
            temperature=float(p.get("temperature", 1.0)),
            top_p=float(p.get("top_p", 1.0)),
            top_k=int(p.get("top_k", -1)),
            max_new_tokens=int(p.get("max_new_tokens", 128)),
            stop_token_ids=tuple(p.get("stop_token_ids") or ()),
        )
        if shared is not None and params != shared:
            raise ValueError("the test server needs identical sampling_params (except sampling_seed) within a batch")
        shared = params
        for k in range(int(p.get("n", 1))):
            rows.append(list(prompt))
            seed = p.get("sampling_seed")
            seeds.append(None if seed is None else int(seed) + k)
            out_rids.append(r if k == 0 else f"{r}-{k}")
    assert shared is not None
    return rows, seeds, shared, out_rids


def main() -> None:
    """Serve a model folder like ``python -m sglang.launch_server`` (ignores flags it cannot honour)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--join-weight-groups", action="store_true", help="really join weight-update groups (gloo)")
    ap.add_argument("--step-delay-s", type=float, default=0.0, help="sleep per decode step (slow generation)")
    args, _ = ap.parse_known_args()
    torch.set_num_threads(1)
    server = SGLangTestServer(
        HFEngine.from_pretrained(args.model_path),
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        join_groups=args.join_weight_groups,
        tp_size=args.tp_size,
        faults=Faults(step_delay_s=args.step_delay_s),
    )
    server.start()
    print(f"serving on {server.url}", flush=True)
    while not server.dead:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
