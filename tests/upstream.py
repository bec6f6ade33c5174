"""The pinned upstream sources (SGLang, sglang-router) as the truth for contract tests.

The versions are the ``[gpu]`` extra of ``setup.py``. Each wheel is fetched once with ``pip download --no-deps`` into
a cache folder (``$LUFFY_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/luffy-megatron/wheels``, else
``~/.cache/luffy-megatron/wheels``) and read as a zip file; nothing is installed. A failed download fails the test
with the pip command and its output. The contract tests need the package registry once (the ``registry`` tier: where
it cannot be reached they are skipped with the reason, and fail under ``LUFFY_REQUIRE_ALL_TIERS=1``, as in CI).

Single definitions (a function, a class) are taken out of a module's source with ``ast`` and executed in a namespace
holding only the names they use, so SGLang code runs here without SGLang's import chain (CUDA kernels, msgspec, ...).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from tests.tiers import skip_tier

REPO = Path(__file__).resolve().parents[1]
#: A Linux x86-64 CPython 3.12 target, the GPU install the docs describe (the source is the same for every build).
PLATFORM_ARGS = ["--python-version", "3.12", "--only-binary=:all:"] + [
    f"--platform={p}"
    for p in (
        "manylinux_2_34_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    )
]


def gpu_requirements() -> list[Requirement]:
    """The ``[gpu]`` extra of ``setup.py``, read from its source (setup.py is not importable)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "gpu":
                    return [Requirement(s) for s in ast.literal_eval(value)]
    raise AssertionError("setup.py has no [gpu] extra")


def install_requirements() -> list[Requirement]:
    """``install_requires`` of ``setup.py``."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(s) for s in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no install_requires")


def pinned_version(name: str) -> str:
    """The exact version the ``[gpu]`` extra pins for ``name`` (``==``)."""
    for req in gpu_requirements():
        if _norm(req.name) == _norm(name):
            pins = [s.version for s in req.specifier if s.operator == "=="]
            assert len(pins) == 1, f"setup.py [gpu]: {req} must pin one exact version"
            return pins[0]
    raise AssertionError(f"setup.py [gpu] does not list {name}")


def cache_dir() -> Path:
    """Where downloaded wheels are kept between runs."""
    if os.environ.get("LUFFY_WHEEL_CACHE"):
        return Path(os.environ["LUFFY_WHEEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "luffy-megatron" / "wheels"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pip_run(args: list[str], what: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run pip of this interpreter; when pip fails, a ``registry`` tier skip (a failure where every tier is required)
    naming the command and its output."""
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        skip_tier("registry", f"{what}: `{' '.join(cmd)}` took longer than {timeout_s:.0f}s (registry unreachable?)")
    if res.returncode != 0:
        skip_tier(
            "registry",
            f"{what}: `{' '.join(cmd)}` failed with exit code {res.returncode}; the pinned upstream wheels come from "
            f"the package registry.\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}",
        )
    return res


@cache
def wheel(name: str) -> Path:
    """The pinned wheel of ``name`` from the cache, downloaded (``--no-deps``) on first use."""
    version = pinned_version(name)
    folder = cache_dir()
    hits = sorted(folder.glob(f"{_norm(name)}-{version}-*.whl"))
    if hits:
        return hits[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        pip_run(
            ["download", "--no-deps", "--quiet", "--dest", tmp, *PLATFORM_ARGS, f"{name}=={version}"],
            f"downloading {name}=={version}",
        )
        got = sorted(Path(tmp).glob("*.whl"))
        assert got, f"pip download {name}=={version} produced no wheel"
        target = folder / got[0].name
        shutil.move(str(got[0]), target)  # a rename within one folder: other readers never see half a file
    return target


def source(name: str, path: str) -> str:
    """The text of ``path`` inside the pinned wheel of ``name``."""
    with zipfile.ZipFile(wheel(name)) as zf:
        return zf.read(path).decode("utf-8")


def wheel_metadata(name: str) -> str:
    """The ``METADATA`` file (the package's long description) of the pinned wheel of ``name``."""
    with zipfile.ZipFile(wheel(name)) as zf:
        path = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(path).decode("utf-8")


def sources_under(name: str, folder: str) -> dict[str, str]:
    """Every ``.py`` file under ``folder`` of the wheel, by path."""
    with zipfile.ZipFile(wheel(name)) as zf:
        return {n: zf.read(n).decode("utf-8") for n in zf.namelist() if n.startswith(folder) and n.endswith(".py")}


def load_defs(src: str, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute the top-level definitions ``names`` of a module's source in ``namespace``; returns the namespace."""
    tree = ast.parse(src)
    picked = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in picked}
    assert not missing, f"upstream source has no top-level {sorted(missing)}"
    ns = dict(namespace)
    exec(compile(ast.Module(body=picked, type_ignores=[]), "<upstream>", "exec"), ns)  # noqa: S102
    return ns


def class_fields(src: str) -> dict[str, dict[str, bool]]:
    """``{class: {field: has_default}}`` for the annotated fields of every class of a module, bases included when
    they are defined in the same module (dataclasses and msgspec structs)."""
    tree = ast.parse(src)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out: dict[str, dict[str, bool]] = {}

    def fields(name: str) -> dict[str, bool]:
        if name in out:
            return out[name]
        node = classes[name]
        own: dict[str, bool] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                own.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                if "ClassVar" in ast.unparse(stmt.annotation):
                    continue
                own[stmt.target.id] = stmt.value is not None
        out[name] = own
        return own

    for name in classes:
        fields(name)
    return out


def http_routes(src: str) -> dict[str, tuple[set[str], str | None]]:
    """``{path: (methods, request class)}`` of every FastAPI route declared with a literal path in ``src``."""
    routes: dict[str, tuple[set[str], str | None]] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body_class = None
        for arg in node.args.args:
            ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            m = re.fullmatch(r"(?:Annotated\[)?(\w+)(?:, Body\(\)\])?", ann)
            if m and m.group(1).endswith(("ReqInput", "Req")):
                body_class = m.group(1)
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if not (dec.args and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str)):
                continue
            kind = dec.func.attr
            if kind in ("get", "post", "put", "delete"):
                methods = {kind.upper()}
            elif kind == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = set(ast.literal_eval(kw["methods"])) if "methods" in kw else {"GET"}
            else:
                continue
            path = dec.args[0].value
            old = routes.get(path, (set(), None))
            routes[path] = (old[0] | methods, body_class or old[1])
    return routes


# ---------------------------------------------------------------------------------------------------------------------
# SGLang facts used by the test server and the contract tests
# ---------------------------------------------------------------------------------------------------------------------
SGLANG = "sglang"
HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SAMPLING = "sglang/srt/sampling/sampling_params.py"
COMMON = "sglang/srt/utils/common.py"
SCHED_WEIGHTS = "sglang/srt/managers/scheduler_components/weight_updater.py"


@cache
def routes() -> dict[str, tuple[set[str], str | None]]:
    """SGLang's HTTP routes: ``{path: (methods, request class)}``."""
    return http_routes(source(SGLANG, HTTP_SERVER))


@cache
def request_fields() -> dict[str, dict[str, bool]]:
    """``{io_struct class: {field: has_default}}``."""
    return class_fields(source(SGLANG, IO_STRUCT))


def route_fields(path: str) -> dict[str, bool]:
    """The request fields of the route ``path`` (``{field: has_default}``)."""
    _, cls = routes()[path]
    assert cls is not None, f"SGLang's {path} takes no request body class"
    return request_fields()[cls]


@cache
def sampling_api_keys() -> frozenset[str]:
    """The API fields of SGLang's ``SamplingParams`` (those above its "Internal fields" comment)."""
    src = source(SGLANG, SAMPLING)
    lines = src.splitlines()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams")
    end = next(i for i in range(node.lineno, node.end_lineno or len(lines)) if "Internal fields" in lines[i]) + 1
    keys = {
        s.target.id
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.lineno < end
    }
    return frozenset(keys)


@cache
def session_messages() -> dict[str, str]:
    """SGLang's answers to a distributed/tensor load outside a weight-update session, by route."""
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source(SGLANG, SCHED_WEIGHTS))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "must run between" in node.value:
            op = node.value.split()[0]
            found[f"/{op}"] = node.value
    return found


@cache
def upstream_common() -> dict[str, Any]:
    """``init_custom_process_group`` and ``SafeUnpickler`` of ``sglang/srt/utils/common.py``, executed from source."""
    import io
    import pickle

    import torch
    from packaging.version import Version

    names = ["init_custom_process_group", "SafeUnpickler", "_safe_load_torch_storage"]
    return load_defs(
        source(SGLANG, COMMON),
        names,
        {"torch": torch, "pickle": pickle, "io": io, "torch_release": Version(torch.__version__).release},
    )


AUTH = "sglang/srt/utils/auth.py"


@cache
def upstream_auth() -> dict[str, Any]:
    """SGLang's API-key check: ``decide_request_auth`` and ``AuthLevel`` of ``sglang/srt/utils/auth.py`` executed
    from source, and ``levels``, each route's level from the ``@auth_level`` decorators of the HTTP server."""
    import dataclasses
    import enum
    import secrets
    import typing

    ns = load_defs(
        source(SGLANG, AUTH),
        ["AuthDecision", "AuthLevel", "decide_request_auth"],
        {"secrets": secrets, "dataclass": dataclasses.dataclass, "Enum": enum.Enum, "Optional": typing.Optional},
    )
    levels: dict[str, str] = {}
    for node in ast.walk(ast.parse(source(SGLANG, HTTP_SERVER))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        level, paths = "NORMAL", []
        for dec in node.decorator_list:
            if not isinstance(dec, ast.Call) or not dec.args:
                continue
            if ast.unparse(dec.func) == "auth_level":
                level = ast.unparse(dec.args[0]).rsplit(".", 1)[-1]
            elif isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str):
                paths.append(dec.args[0].value)
        levels.update(dict.fromkeys(paths, level))
    return {**ns, "levels": levels}


# ---------------------------------------------------------------------------------------------------------------------
# SGLang's Qwen3-MoE weight loader (what every weight-sync mode ends in: ``model.load_weights(named tensors)``)
# ---------------------------------------------------------------------------------------------------------------------
QWEN3_MOE = "sglang/srt/models/qwen3_moe.py"
FUSED_MOE = "sglang/srt/layers/moe/fused_moe_triton/layer.py"
LAYER_UTILS = "sglang/srt/layers/utils/common.py"


def sglang_qwen3_moe_params(layers: int) -> list[str]:
    """The parameters of SGLang's ``Qwen3MoeForCausalLM`` (untied embeddings), as its ``/weights_checker`` names them:
    what its loader writes into. ``tests/test_sglang_real_moe.py`` checks the list against a live server."""
    per_layer = [
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "mlp.experts.w13_weight",
        "mlp.experts.w2_weight",
        "mlp.gate.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ]
    layer_params = [f"model.layers.{i}.{p}" for i in range(layers) for p in per_layer]
    return ["model.embed_tokens.weight", *layer_params, "model.norm.weight", "lm_head.weight"]


def method(src: str, cls: str, name: str, namespace: dict[str, Any]) -> Any:
    """The method ``cls.name`` of a module's source, executed in ``namespace`` as a plain function (decorators and
    annotations dropped: they name types the namespace does not hold)."""
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list, fn.returns = [], None
    for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
        arg.annotation = None
    ns = dict(namespace)
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "<upstream>", "exec"), ns)  # noqa: S102
    return ns[name]


def qwen3_moe_load_calls(
    named: list[tuple[str, Any]], num_experts: int, layers: int, params: list[str]
) -> list[tuple[str, str, Any, Any]]:
    """Run SGLang's ``Qwen3MoeForCausalLM.load_weights`` (and ``FusedMoE.make_expert_params_mapping``, both from the
    pinned source) over ``named`` on a stand-in model whose parameters are ``params``. Returns one
    ``(checkpoint name, parameter, shard_id, expert_id)`` per weight-loader call; a name the loader skips has none."""
    import logging
    import types

    calls: list[tuple[str, str, Any, Any]] = []
    current = [""]

    def recorder(param_name: str):
        def weight_loader(param, loaded_weight, *args, shard_id=None, expert_id=None):
            if args and shard_id is None:  # stacked: (param, weight, shard_id); experts: (param, weight, name, ...)
                shard_id = args[0]
            calls.append((current[0], param_name, shard_id, expert_id))

        return weight_loader

    model_src = source(SGLANG, QWEN3_MOE)
    mapping = method(source(SGLANG, FUSED_MOE), "FusedMoE", "make_expert_params_mapping", {})
    common = load_defs(source(SGLANG, LAYER_UTILS), ["get_layer_id"], {"re": re})
    ns = {
        "FusedMoE": type("FusedMoE", (), {"make_expert_params_mapping": classmethod(mapping)}),
        "get_layer_id": common["get_layer_id"],
        "default_weight_loader": None,  # every stand-in parameter has its own loader
        "LazyValue": lambda fn: fn,
        "Qwen3MoeSparseMoeBlock": type("Qwen3MoeSparseMoeBlock", (), {}),
        "logger": logging.getLogger("upstream.qwen3_moe"),
    }
    load_weights = method(model_src, "Qwen3MoeForCausalLM", "load_weights", ns)
    stand_in_params = {n: types.SimpleNamespace(weight_loader=recorder(n)) for n in params}
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(num_experts=num_experts),
        model=types.SimpleNamespace(start_layer=0, end_layer=layers),
        start_layer=0,
        end_layer=layers,
        named_parameters=lambda: iter(stand_in_params.items()),
    )

    def stream():
        for name, tensor in named:
            current[0] = name
            yield name, tensor

    load_weights(model, stream())
    return calls
