"""Contract tests: every call into SGLang, sglang-router and megatron-core's TE spec, checked against the real
upstream code of the pinned versions (``tests/upstream.py``: wheels downloaded once, read as zip files, never
installed). A version bump in ``setup.py``'s ``[gpu]`` extra re-checks everything here.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import os
import pickle
import subprocess
import sys
import textwrap
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from luffy_megatron.config import SGLangConfig
from luffy_megatron.platform.ports import free_port
from luffy_megatron.rollout.base import SamplingParams
from luffy_megatron.rollout.hf_engine import HFEngine
from luffy_megatron.rollout.sglang import client as client_mod
from luffy_megatron.rollout.sglang import engine as engine_mod
from luffy_megatron.rollout.sglang import launcher
from luffy_megatron.rollout.sglang.client import SGLangClient, sampling_params_body
from luffy_megatron.rollout.sglang.engine import SGLangEngine
from luffy_megatron.rollout.sglang.sync import SYNC_MODES
from luffy_megatron.rollout.sglang.weights import init_weights_update_group, serialize_named_tensors
from tests import upstream
from tests.fixtures_models import tiny_model
from tests.sglang_test_server import SGLangTestServer

pytestmark = pytest.mark.registry

SGLANG_PKG = "sglang/srt/"


# ---------------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------------
def sglang_server_flags() -> dict[str, tuple[bool, list | None]]:
    """``{flag: (takes_no_value, choices)}`` of ``python -m sglang.launch_server``: the ``A[T, ...]`` fields of the
    config namespaces (``arg_groups/fields``, named ``--field-name`` unless ``Arg(cli_name=...)``, plus aliases, minus
    ``no_cli``) and the flags ``server_args.py`` registers by hand."""
    flags: dict[str, tuple[bool, list | None]] = {}
    for src in upstream.sources_under("sglang", SGLANG_PKG + "arg_groups/fields/").values():
        for cls in (n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                    continue
                ann = stmt.annotation
                if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "A"):
                    continue
                parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
                meta = next((p for p in parts[1:] if isinstance(p, ast.Call)), None)
                kw = {k.arg: k.value for k in meta.keywords} if meta is not None else {}
                if meta is not None and getattr(meta.func, "id", "") == "Derived":
                    continue
                if "no_cli" in kw and ast.literal_eval(kw["no_cli"]):
                    continue
                name = ast.literal_eval(kw["cli_name"]) if "cli_name" in kw else "--" + stmt.target.id.replace("_", "-")
                aliases = ast.literal_eval(kw["aliases"]) if "aliases" in kw else []
                type_src = ast.unparse(parts[0])
                is_bool = type_src in ("bool", "Optional[bool]") and "action" not in kw
                choices = None  # literal choices only (a few are computed from other modules)
                if "choices" in kw and isinstance(kw["choices"], (ast.List, ast.Tuple)):
                    with contextlib.suppress(ValueError):
                        choices = ast.literal_eval(kw["choices"])
                for flag in [name, *aliases]:
                    flags[flag] = (is_bool, choices)
    server_args = upstream.source("sglang", SGLANG_PKG + "server_args.py")
    for node in ast.walk(ast.parse(server_args)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for a in node.args:
                if isinstance(a, ast.Constant) and str(a.value).startswith("--"):
                    flags.setdefault(a.value, (False, None))
    return flags


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_server_command_flags_exist_in_sglang_arguments(device: str) -> None:
    flags = sglang_server_flags()
    assert len(flags) > 300 and flags["--skip-tokenizer-init"][0] and not flags["--tp-size"][0]  # the parse found them
    cfg = SGLangConfig(context_length=8192, colocate=True, tp_size=2, device=device)
    cmd = launcher.server_command(cfg, "/models/qwen", 1, api_key="secret")
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "def " in upstream.source("sglang", "sglang/launch_server.py")
    args = cmd[3:]
    seen = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        seen.append(arg)
        assert arg in flags, f"{arg} is not an argument of sglang {upstream.pinned_version('sglang')}"
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        switch, choices = flags[arg]
        assert has_value != switch, f"{arg}: {'a switch' if switch else 'takes a value'} in SGLang"
        assert choices is None or args[i + 1] in choices, f"{arg} {args[i + 1]}: SGLang accepts {choices}"
    cpu_flags = {"--device", "--attention-backend", "--cuda-graph-backend-decode", "--sleep-on-idle"}
    on_device = {"cuda": {"--enable-memory-saver", "--base-gpu-id"}, "cpu": cpu_flags}
    assert {"--context-length", "--api-key", "--dtype", *on_device[device]} <= set(seen)
    assert flags["--dtype"][1] and "bfloat16" in flags["--dtype"][1]


def test_router_command_parses_with_sglang_router_args(monkeypatch) -> None:
    """``sglang_router.launch_router``'s own parser (``RouterArgs.add_cli_args``), run on our command line."""
    import argparse

    src = upstream.source("sglang-router", "sglang_router/router_args.py")
    rs = types.ModuleType("sglang_router.sglang_router_rs")  # the compiled extension, only asked for parser names
    rs.get_available_tool_call_parsers = lambda: []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sglang_router", types.ModuleType("sglang_router"))
    monkeypatch.setitem(sys.modules, "sglang_router.sglang_router_rs", rs)
    mod = types.ModuleType("upstream_router_args")
    monkeypatch.setitem(sys.modules, "upstream_router_args", mod)
    exec(compile(src, "router_args.py", "exec"), mod.__dict__)  # noqa: S102
    parser = argparse.ArgumentParser(exit_on_error=False)
    mod.RouterArgs.add_cli_args(parser, use_router_prefix=False)
    urls = ["http://10.0.0.1:30000", "http://10.0.0.2:30010"]
    cmd = launcher.router_command(SGLangConfig(router_port=29123, host="0.0.0.0"), urls, api_key="sk-job")
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"]
    assert "parse_router_args" in upstream.source("sglang-router", "sglang_router/launch_router.py")
    parsed = mod.RouterArgs.from_cli_args(parser.parse_args(cmd[3:]), use_router_prefix=False)
    assert parsed.worker_urls == urls and parsed.port == 29123 and parsed.host == "0.0.0.0"
    # The key reaches the router, which demands it of clients and sends it to the workers of --worker-urls.
    assert parsed.api_key == "sk-job" and "sk-job" not in launcher.redact(cmd)
    meta = upstream.wheel_metadata("sglang-router")
    assert "Initial workers declared via CLI inherit the router key" in meta
    assert "Provide `--api-key`; clients must present the key" in meta
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args(["--workers-url", urls[0]])  # the parser is strict: a misspelt flag fails


# ---------------------------------------------------------------------------------------------------------------------
# Routes and request bodies
# ---------------------------------------------------------------------------------------------------------------------
def called_routes() -> set[tuple[str, str]]:
    """``(method, path)`` of every HTTP call in the rollout client, engine and weight-sync mode source."""
    calls: set[tuple[str, str]] = set()
    for mod in (client_mod, engine_mod, *{inspect.getmodule(mode) for mode in SYNC_MODES.values()}):
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("post_all", "post_each", "request")
            ):
                continue
            method = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "method"), "POST")
            for a in node.args[:2]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("/"):
                    calls.add((method if isinstance(method, str) else "POST", a.value))
    return calls


def test_every_route_the_client_calls_exists_with_that_method() -> None:
    calls = called_routes()
    assert {
        ("POST", "/begin_weight_update"),
        ("POST", "/update_weights_from_tensor"),
        ("GET", "/health"),
        ("POST", "/generate"),
        ("POST", "/abort_request"),
    } <= calls
    routes = upstream.routes()
    for method, path in sorted(calls):
        assert path in routes, f"{path} is not a route of sglang {upstream.pinned_version('sglang')}"
        assert method in routes[path][0], f"{path} accepts {sorted(routes[path][0])}, not {method}"


@pytest.fixture
def recorded(tmp_path):
    """Every request body the engine sends in each weight-sync mode and for control calls."""
    model = tiny_model(seed=3, scale=4.0)
    server = SGLangTestServer(HFEngine(model, eos_token_ids=[1]))
    server.start()
    client = SGLangClient([server.url], backoff_s=0.01)
    eng = SGLangEngine(
        client, weight_sync="disk", weight_sync_dir=str(tmp_path), colocate=True, tp_size=2, eos_token_ids=[1]
    )
    params = SamplingParams(n=2, max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, seed=1)
    eng.generate([[3, 4], [5, 6, 7]], params, counts=[1, 2])  # per-prompt counts, as the trainer asks
    eng.release_memory()
    eng.resume_memory()
    eng.update_weights(model.state_dict().items(), version=1)
    eng.weight_sync = "tensor"
    eng.update_weights(model.state_dict().items(), version=2)
    eng.weight_sync, eng.group_backend = "distributed", "gloo"
    eng.master_address = "127.0.0.1"
    import luffy_megatron.rollout.sglang.sync.distributed as em

    orig = em.init_weights_update_group
    em.init_weights_update_group = lambda *a, **k: None
    bcast = torch.distributed.broadcast
    torch.distributed.broadcast = lambda *a, **k: None
    try:
        eng.update_weights(model.state_dict().items(), version=3)
    finally:
        em.init_weights_update_group, torch.distributed.broadcast = orig, bcast
    eng.sync.group = None
    eng._run(client.abort(rid="x-1"))
    eng.close()
    server.stop()
    return server.requests


def test_request_bodies_are_fields_of_the_io_struct_classes(recorded) -> None:
    """Unknown fields are silently ignored by SGLang, so a misspelt key would be invisible there."""
    paths = {r.path for r in recorded}
    assert {
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/update_weights_from_distributed",
        "/init_weights_update_group",
        "/begin_weight_update",
        "/end_weight_update",
        "/pause_generation",
        "/continue_generation",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/abort_request",
        "/generate",
    } <= paths
    for r in recorded:
        if r.body is None:
            assert r.path in ("/flush_cache",), f"{r.path} sent without a body"
            continue
        fields = upstream.route_fields(r.path)
        unknown = set(r.body) - set(fields)
        missing = {k for k, has_default in fields.items() if not has_default} - set(r.body)
        assert not unknown, f"{r.path}: {sorted(unknown)} are not fields of {upstream.routes()[r.path][1]}"
        assert not missing, f"{r.path}: required fields {sorted(missing)} missing"


def test_generate_body_and_sampling_keys_are_sglang_schema(recorded) -> None:
    api = upstream.sampling_api_keys()
    assert {"max_new_tokens", "temperature", "sampling_seed", "stop_token_ids"} <= api and "stop_strs" not in api
    assert api >= client_mod.SAMPLING_KEYS, sorted(client_mod.SAMPLING_KEYS - api)
    body = sampling_params_body(SamplingParams(top_k=3, stop_token_ids=(7,)), seed=5, stop_token_ids=[1])
    assert set(body) <= api
    sent = [sp for r in recorded if r.path == "/generate" for sp in r.body["sampling_params"]]
    for sp in sent:
        assert set(sp) <= api
    # counts=[1, 2]: exactly three samples, each with its own per-sample seed (one sampling_params per rid).
    assert len(sent) == 3 and len({sp["sampling_seed"] for sp in sent}) == 3
    bodies = [r.body for r in recorded if r.path == "/generate"]
    assert all(len(b["rid"]) == len(b["sampling_params"]) == len(b["input_ids"]) for b in bodies)


# ---------------------------------------------------------------------------------------------------------------------
# Weight-update group: our trainer side against SGLang's own init_custom_process_group, two processes over gloo
# ---------------------------------------------------------------------------------------------------------------------
SERVER_SIDE = """
import sys, torch
from datetime import timedelta
from pathlib import Path
from tests import upstream
join = upstream.upstream_common()["init_custom_process_group"]
pg = join(backend="gloo", init_method="tcp://127.0.0.1:{port}", world_size=2, rank=1,
          group_name="{group}", timeout=timedelta(seconds={timeout}))
t = torch.zeros(5)
torch.distributed.broadcast(t, src=0, group=pg)
print("RECEIVED", t.tolist(), flush=True)
torch.distributed.destroy_process_group(pg)
"""


def _server_side(port: int, timeout: float, group: str) -> subprocess.Popen:
    code = textwrap.dedent(SERVER_SIDE).format(port=port, timeout=timeout, group=group)
    env = {**os.environ, "PYTHONPATH": str(upstream.REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=upstream.REPO,
        env=env,
    )


def test_trainer_group_meets_sglang_init_custom_process_group_and_a_broadcast_arrives() -> None:
    upstream.upstream_common()  # the wheel is in the cache before the child starts
    port = free_port()
    group = f"weight_update_group_{port}"  # unique in this process, whatever groups earlier tests left behind
    child = _server_side(port, timeout=60, group=group)
    pg = None
    try:
        pg = init_weights_update_group("127.0.0.1", port, 0, 2, group, "gloo", timeout_s=60)
        torch.distributed.broadcast(torch.arange(5, dtype=torch.float32) * 1.5, src=0, group=pg)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
        if pg is not None:  # the group name must be free for the next test in this process
            torch.distributed.destroy_process_group(pg)
    assert child.returncode == 0, err[-2000:]
    assert "RECEIVED [0.0, 1.5, 3.0, 4.5, 6.0]" in out


def test_a_trainer_side_without_prefix_store_never_meets_sglang() -> None:
    """The negative control: the rendezvous the trainer used before (no ``PrefixStore``) waits on other keys."""
    from torch.distributed import distributed_c10d as c10d

    upstream.upstream_common()
    port = free_port()
    group = f"weight_update_group_{port}"
    child = _server_side(port, timeout=8, group=group)
    try:
        store, rank, world = next(c10d.rendezvous(f"tcp://127.0.0.1:{port}", 0, 2, timeout=timedelta(seconds=8)))
        store.set_timeout(timedelta(seconds=8))
        with pytest.raises(RuntimeError):
            pg, _ = c10d._new_process_group_helper(
                2, 0, [], c10d.Backend("gloo"), store, group_name=group, timeout=timedelta(seconds=8)
            )
            c10d._world.pg_group_ranks[pg] = {0: 0, 1: 1}
            torch.distributed.broadcast(torch.ones(5), src=0, group=pg)
        child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode != 0


# ---------------------------------------------------------------------------------------------------------------------
# Weight-update session and tensor payloads
# ---------------------------------------------------------------------------------------------------------------------
def test_session_routes_and_messages_exist_upstream() -> None:
    routes = upstream.routes()
    for path in ("/begin_weight_update", "/end_weight_update"):
        assert "POST" in routes[path][0] and routes[path][1] is not None
    messages = upstream.session_messages()
    assert set(messages) == {"/update_weights_from_distributed", "/update_weights_from_tensor"}
    assert all("begin_weight_update() and end_weight_update()" in m for m in messages.values())


def test_tensor_payloads_one_per_rank_accepted_by_sglang_safe_unpickler() -> None:
    unpickler = upstream.upstream_common()["SafeUnpickler"]
    named = [("model.embed_tokens.weight", torch.randn(8, 4)), ("lm_head.weight", torch.randn(8, 4).bfloat16())]
    payloads = [serialize_named_tensors(named) for _ in range(2)]
    import base64

    # CPU tensors travel as named shared-memory files, which any process may open (a server died on the default file
    # descriptors); CUDA tensors would be a fresh IPC reference per serialization.
    assert all(b"rebuild_storage_filename" in base64.b64decode(p) for p in payloads)
    for p in payloads:
        got = unpickler(io.BytesIO(base64.b64decode(p))).load()
        assert [n for n, _ in got] == [n for n, _ in named]
        assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(got, named))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(RuntimeError, match="Blocked unsafe global"):  # the allow-list is real
        unpickler(io.BytesIO(pickle.dumps(Evil()))).load()


# ---------------------------------------------------------------------------------------------------------------------
# Weight names: SGLang's Qwen3-MoE loader
# ---------------------------------------------------------------------------------------------------------------------
def test_exported_moe_names_are_exactly_what_sglang_qwen3_moe_loader_maps() -> None:
    """The export stream of a Qwen3-MoE (what every sync mode sends), run through SGLang's ``load_weights``: every name
    reaches one parameter (the loader silently skips names it does not map), each expert tensor its expert and shard
    of the fused ``w13`` (gate = ``w1``, up = ``w3``) / ``w2``, and every parameter, shard and expert is written once.
    transformers' in-memory form of the experts (``mlp.experts.gate_up_proj``) would be skipped: the stream must
    carry the per-expert checkpoint names."""
    from luffy_megatron.convert import iter_hf_weights
    from luffy_megatron.convert.checkpoint import setup_parallel
    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec
    from luffy_megatron.models.tiny import tiny_hf_config

    setup_parallel(1, 1)
    layers, experts = 2, 4
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, heads=4, kv_heads=2, tie_embeddings=False)
    spec = model_spec(tiny_hf_config("qwen3_moe", layers=layers, moe={"num_experts": experts}, **shape).to_dict())
    chunks = build_gpt_model(spec, build_transformer_config(spec))
    named = [pair for bucket in iter_hf_weights(chunks, spec, bucket_bytes=4096) for pair in bucket]
    params = upstream.sglang_qwen3_moe_params(layers)

    calls = upstream.qwen3_moe_load_calls(named, experts, layers, params)
    assert sorted(c[0] for c in calls) == sorted(n for n, _ in named)  # each name loaded exactly once
    shard_of = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for name, param, shard, expert in calls:
        parts = name.split(".")
        if ".mlp.experts." in name:  # model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
            fused = "w2_weight" if parts[6] == "down_proj" else "w13_weight"
            assert (param, shard, expert) == (
                f"model.layers.{parts[2]}.mlp.experts.{fused}",
                shard_of[parts[6]],
                int(parts[5]),
            )
        elif parts[-2] in ("q_proj", "k_proj", "v_proj"):
            assert (param, shard) == (name.replace(parts[-2], "qkv_proj"), parts[-2][0]), name
        else:
            assert (param, shard, expert) == (name, None, None), name
    targets = [(param, shard, expert) for _, param, shard, expert in calls]
    assert len(set(targets)) == len(targets) and {c[1] for c in calls} == set(params)  # all written, none twice
    w13 = {(s, e) for p, s, e in targets if p.endswith("layers.1.mlp.experts.w13_weight")}
    assert w13 == {(s, e) for s in ("w1", "w3") for e in range(experts)}
    fused_name = [("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(1))]
    assert upstream.qwen3_moe_load_calls(fused_name, experts, layers, params) == []


# ---------------------------------------------------------------------------------------------------------------------
# transformer-engine layer spec of megatron-core
# ---------------------------------------------------------------------------------------------------------------------
def test_te_spec_kwargs_bind_to_megatron_core_signature() -> None:
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core.models.gpt import gpt_layer_specs

    from luffy_megatron.models.builder import layer_spec_kwargs, model_spec

    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"):
        hf = {
            "architectures": [arch],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        spec = model_spec(hf)
        te_sig = inspect.signature(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
        te_sig.bind(**layer_spec_kwargs(spec, True))
        local_sig = inspect.signature(gpt_layer_specs.get_gpt_layer_local_spec)
        local_sig.bind(**layer_spec_kwargs(spec, False))
    with pytest.raises(TypeError):  # the call before the fix
        te_sig.bind(qk_layernorm=False, normalization="RMSNorm")


def test_builder_calls_the_te_spec_with_arguments_it_accepts(monkeypatch) -> None:
    """The builder's own call site, with the TE spec function replaced by one that first binds the arguments to the
    real signature (TE itself is not installed here) and then returns the local spec so the model still builds."""
    from luffy_megatron.convert.checkpoint import setup_parallel

    setup_parallel(1, 1)
    from megatron.core.models.gpt import gpt_layer_specs

    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec

    real = inspect.signature(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
    calls: list[dict] = []

    def checked(**kwargs):
        real.bind(**kwargs)  # TypeError here is what every GPU run hit before the fix
        calls.append(kwargs)
        local = gpt_layer_specs.get_gpt_layer_local_spec
        return local(qk_layernorm=kwargs.get("qk_layernorm"), normalization="RMSNorm")

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", checked)
    hf = {
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    spec = model_spec(hf)
    chunks = build_gpt_model(spec, build_transformer_config(spec), use_transformer_engine=True)
    assert calls == [{"qk_layernorm": True}] and len(chunks) == 1


def test_fused_layer_norm_names_match_megatron_and_transformer_engine() -> None:
    """The local spec maps its norms to the fused TE names; TE's LayerNormLinear registers ``layer_norm_weight``."""
    from luffy_megatron.platform import setup_platform

    setup_platform()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from luffy_megatron.models.family import TE_FUSED_NORM_NAMES

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    assert {k + "weight": v + "weight" for k, v in keys_map.items()} == TE_FUSED_NORM_NAMES
    te_src = upstream.source("transformer-engine", "transformer_engine/pytorch/module/layernorm_linear.py")
    registered = {
        n.args[0].value
        for n in ast.walk(ast.parse(te_src))
        if isinstance(n, ast.Call)
        and getattr(n.func, "attr", "") == "register_parameter"
        and n.args
        and isinstance(n.args[0], ast.Constant)
    }
    for te_name in TE_FUSED_NORM_NAMES.values():
        assert te_name.rsplit(".", 1)[1] in registered, (te_name, sorted(registered))


# ---------------------------------------------------------------------------------------------------------------------
# The [gpu] extra resolves for Python 3.12 manylinux
# ---------------------------------------------------------------------------------------------------------------------
def test_gpu_extra_resolves_for_python312_with_the_torch_sglang_pins(tmp_path) -> None:
    """``pip install --dry-run --no-deps`` of the pinned names for CPython 3.12 manylinux x86-64: each exists as a
    wheel there, accepts Python 3.12, and their requirements on each other (torch, transformer-engine parts) and on
    this package's own requirements agree."""
    import json

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    reqs = upstream.gpu_requirements()
    pins = {canonicalize_name(r.name): upstream.pinned_version(r.name) for r in reqs}
    names = [
        f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}=={pins[canonicalize_name(r.name)]}"
        for r in reqs
    ]
    te = pins[canonicalize_name("transformer-engine")]
    names.append(f"transformer-engine-cu13=={te}")  # the core_cu13 extra's wheel
    report = tmp_path / "report.json"
    upstream.pip_run(
        [
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "--target",
            str(tmp_path / "t"),
            *upstream.PLATFORM_ARGS,
            *names,
        ],
        "resolving the [gpu] extra for Python 3.12",
    )
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in json.loads(report.read_text())["install"]}
    for name, version in pins.items():
        assert name in got and got[name]["version"] == version, (name, version)
    env = {
        **default_environment(),
        "python_version": "3.12",
        "python_full_version": "3.12.0",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
    }
    for meta in got.values():
        rp = meta.get("requires_python")
        assert not rp or Version("3.12.0") in __import__("packaging.specifiers").specifiers.SpecifierSet(rp)
    ours = {canonicalize_name(r.name): r for r in upstream.install_requirements()}
    torch_pin = Version(pins["torch"])
    for name, meta in got.items():
        for dep in map(Requirement, meta.get("requires_dist") or []):
            extras = ("core_cu13", "core-cu13", "pytorch")  # the extras the [gpu] extra asks for
            active = dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in ("", *extras))
            if not active:
                continue
            dn = canonicalize_name(dep.name)
            if dn == "torch":
                assert torch_pin in dep.specifier, f"{name} requires {dep}, the [gpu] extra pins torch=={torch_pin}"
            if dn.startswith("transformer-engine"):
                assert dep.specifier.contains(te), f"{name} requires {dep}, the [gpu] extra pins {te}"
            if dn in ours and name == "sglang":
                exact = [s.version for s in dep.specifier if s.operator == "=="]
                for v in exact:
                    assert Version(v) in ours[dn].specifier, f"sglang pins {dep}, setup.py requires {ours[dn]}"
    assert "torch==" + pins["torch"] in [str(Requirement(d)).replace(" ", "") for d in got["sglang"]["requires_dist"]]


def test_distributed_bucket_metadata_is_what_sglang_receives() -> None:
    """SGLang's receiver allocates ``torch.empty(shape, dtype=getattr(torch, dtype))`` for each name in order and
    receives it by ``broadcast(src=0)``: our dtype strings must name torch dtypes, and rank 0 must send."""
    src = upstream.source("sglang", SGLANG_PKG + "model_executor/model_runner_components/weight_updater.py")
    fn = next(
        n
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.FunctionDef) and n.name == "receive_weights_from_distributed"
    )
    body = ast.unparse(fn)
    assert "zip(names, dtypes, shapes)" in body and "getattr(torch, dtype)" in body and "src=0" in body
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        assert getattr(torch, str(dtype).removeprefix("torch.")) is dtype  # the engine's dtype strings


def test_rope_is_fused_where_transformer_engine_runs_and_te_takes_megatrons_packed_call(monkeypatch) -> None:
    """Where TE runs, the config asks for fused RoPE: megatron-core 0.19.2 then calls TE's ``apply_rotary_pos_emb``
    with ``tensor_format="thd"`` and ``cu_seqlens`` for packed rows. Every keyword of that call is a parameter of
    TE 2.20.2's function, whose fused path goes straight to its kernel (no host read of ``cu_seqlens``)."""
    from luffy_megatron.convert.checkpoint import setup_parallel

    setup_parallel(1, 1)
    from megatron.core.models.common.embeddings import rope_utils

    from luffy_megatron.models import builder

    hf = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
    spec = builder.model_spec({**hf, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert not builder.build_transformer_config(spec).apply_rope_fusion  # no TE here: the sync-free path instead
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)  # what TE provides
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", lambda *a, **k: None)
    assert builder.build_transformer_config(spec).apply_rope_fusion

    import megatron.core

    extension = Path(megatron.core.__file__).parent / "extensions" / "transformer_engine.py"
    tree = ast.parse(extension.read_text())
    thd = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "fused_apply_rotary_pos_emb_thd"
    )
    calls = [c for c in ast.walk(thd) if isinstance(c, ast.Call) and ast.unparse(c.func) == "apply_rotary_pos_emb"]
    passed = {k.arg for k in calls[0].keywords}
    assert {"tensor_format", "fused", "cu_seqlens", "cp_size", "cp_rank"} <= passed
    te_rope = ast.parse(upstream.source("transformer-engine", "transformer_engine/pytorch/attention/rope.py"))
    te_fn = next(n for n in te_rope.body if isinstance(n, ast.FunctionDef) and n.name == "apply_rotary_pos_emb")
    assert passed <= {a.arg for a in te_fn.args.args + te_fn.args.kwonlyargs}
    fused = next(n for n in te_rope.body if isinstance(n, ast.ClassDef) and n.name == "FusedRoPEFunc")
    assert not {"tolist", "item"} & {
        c.func.attr for c in ast.walk(fused) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
    }
