"""Start SGLang servers (and optionally ``sglang_router``) as subprocesses, or attach to running ones.

Servers bind to ``SGLangConfig.host`` (127.0.0.1 by default). Server ``i`` listens on ``base_port + PORT_STRIDE * i``
and uses GPUs ``[i * tp_size, (i + 1) * tp_size)`` of the node (``--base-gpu-id``); with ``device: cpu`` it runs on
SGLang's CPU engine. Servers and router run with ``SGLangConfig.python`` (default: this interpreter) in a clean
environment (:func:`server_env`): the caller's variables less torchrun's, plus ``SGLangConfig.env``.

The API key is read from the environment variable named by ``api_key_env``; SGLang only takes it as ``--api-key`` on
its command line, so it is visible to local users through ``/proc`` on that host, but it is redacted from every
command line this module prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from luffy_megatron.config import ServerDevice, SGLangConfig
from luffy_megatron.platform.ports import wait_port_free
from luffy_megatron.rollout.base import RolloutError

logger = logging.getLogger(__name__)
PORT_STRIDE = 10
#: How long a launch waits for its port to be released (a server killed just before may still hold it).
PORT_WAIT_S = 30.0
_SECRET_FLAGS = ("--api-key", "--admin-api-key")
#: What torchrun gives its workers (and ``torch.distributed`` reads). A server started from a worker must not see them:
#: under ``TORCHELASTIC_USE_AGENT_STORE=True`` every ``tcp://`` rendezvous is a store client, so SGLang's own process
#: groups (and its side of the weight-update group) would wait forever for a store nobody hosts.
LAUNCHER_VARS = frozenset(("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"))
LAUNCHER_VARS |= {"GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE"}
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")


@dataclass
class ServerProcess:
    """A launched server or router."""

    url: str
    proc: subprocess.Popen
    command: str  # redacted
    log_path: str | None = None

    def log_tail(self, n_chars: int = 2000) -> str:
        """The end of the process log, when it goes to a file."""
        if self.log_path and Path(self.log_path).is_file():
            return Path(self.log_path).read_text(errors="replace")[-n_chars:]
        return ""


def read_api_key(cfg: SGLangConfig) -> str | None:
    """The API key from the environment variable ``cfg.api_key_env`` (error when that variable is unset)."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise RolloutError(f"rollout.sglang.api_key_env: environment variable {cfg.api_key_env} is not set")
    return key


def redact(cmd: Sequence[str]) -> str:
    """A printable command line with secret flag values replaced by ``<redacted>``."""
    out: list[str] = []
    hide = False
    for arg in cmd:
        if hide:
            out.append("<redacted>")
            hide = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}=<redacted>")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return " ".join(out)


def server_env(cfg: SGLangConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched server or router: ``base`` (default: this process's) less torchrun's variables,
    plus SGLang's CPU-engine switch for ``device: cpu``, plus ``cfg.env``."""
    inherited = os.environ if base is None else base
    env = {k: v for k, v in inherited.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    if cfg.device == ServerDevice.CPU:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.update(cfg.env)
    return env


def server_command(
    cfg: SGLangConfig,
    model_path: str,
    index: int,
    *,
    api_key: str | None = None,
    module: str = "sglang.launch_server",
) -> list[str]:
    """The argv of server ``index``: tokenizer-free (token ids in, token ids out)."""
    port = cfg.base_port + PORT_STRIDE * index
    cmd = [cfg.python or sys.executable, "-m", module, "--model-path", str(model_path), "--host", cfg.host]
    cmd += ["--port", str(port), "--tp-size", str(cfg.tp_size), "--mem-fraction-static", str(cfg.mem_fraction_static)]
    cmd += ["--dtype", cfg.dtype, "--skip-tokenizer-init"]
    if cfg.device == ServerDevice.CPU:  # SGLang's CPU engine: torch-native attention, no CUDA graphs, and a scheduler
        # that sleeps when idle instead of polling (it shares the cores with the trainer)
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--sleep-on-idle"]
        cmd += ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled"]
    else:
        cmd += ["--base-gpu-id", str(index * cfg.tp_size)]
    if cfg.context_length is not None:
        cmd += ["--context-length", str(cfg.context_length)]
    if cfg.colocate and cfg.device == ServerDevice.CUDA:  # releasing CUDA memory; the CPU engine releases without it
        cmd.append("--enable-memory-saver")
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(cfg.extra_args)


def router_command(
    cfg: SGLangConfig,
    worker_urls: Sequence[str],
    *,
    api_key: str | None = None,
    module: str = "sglang_router.launch_router",
) -> list[str]:
    """The argv of ``sglang_router`` over ``worker_urls``. With ``api_key`` the router asks it of every client and
    sends it to the workers given here (sglang-router's "full authentication")."""
    cmd = [cfg.python or sys.executable, "-m", module, "--worker-urls", *worker_urls, "--host", cfg.host]
    # Its Prometheus exporter listens on 29000 unless told otherwise: a second router on the node would die at start.
    cmd += ["--port", str(cfg.router_port), "--prometheus-host", cfg.host]
    cmd += ["--prometheus-port", str(cfg.router_port + 1)]
    cmd += ["--request-timeout-secs", str(max(1, round(cfg.request_timeout_s)))]
    return cmd + (["--api-key", api_key] if api_key else [])


def _spawn(cmd: list[str], url: str, log_dir: str | None, name: str, env: dict[str, str]) -> ServerProcess:
    address = urllib.parse.urlsplit(url)
    host, port = address.hostname or "", address.port or 0
    if not wait_port_free(host, port, PORT_WAIT_S):  # a server that cannot bind hangs in shutdown, never exits
        raise RolloutError(
            f"{name}: port {port} on {host} is in use by another process; set rollout.sglang."
            f"{'router_port' if name == 'sglang_router' else 'base_port'} to a free port"
        )
    printable = redact(cmd)
    log_path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = str(Path(log_dir) / f"{name}.log")
        out = open(log_path, "ab")  # noqa: SIM115 - owned by the child process
    else:
        out = subprocess.DEVNULL  # type: ignore[assignment]
    logger.info("starting %s: %s", name, printable)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return ServerProcess(url, proc, printable, log_path)


def launch_servers(
    cfg: SGLangConfig,
    model_path: str,
    *,
    log_dir: str | None = None,
    module: str = "sglang.launch_server",
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> list[ServerProcess]:
    """Start ``cfg.num_servers`` servers and (by default) wait until each answers ``/health``. ``env`` (default: this
    process's environment) is cleaned and extended by :func:`server_env`."""
    api_key = read_api_key(cfg)
    procs = [
        start_server(cfg, model_path, i, api_key=api_key, log_dir=log_dir, module=module, env=env)
        for i in range(cfg.num_servers)
    ]
    if wait:
        try:
            wait_healthy([p.url for p in procs], cfg.startup_timeout_s, api_key=api_key, procs=procs)
        except BaseException:
            stop_processes(procs)
            raise
    return procs


def start_server(
    cfg: SGLangConfig,
    model_path: str,
    index: int,
    *,
    api_key: str | None,
    log_dir: str | None = None,
    module: str = "sglang.launch_server",
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start server ``index`` without waiting for it (its log, ``sglang_{index}.log``, is appended to); ``env`` as in
    :func:`launch_servers`."""
    url = f"http://{cfg.host}:{cfg.base_port + PORT_STRIDE * index}"
    cmd = server_command(cfg, model_path, index, api_key=api_key, module=module)
    return _spawn(cmd, url, log_dir, f"sglang_{index}", server_env(cfg, env))


def launch_router(
    cfg: SGLangConfig,
    worker_urls: Sequence[str],
    *,
    api_key: str | None = None,
    log_dir: str | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``sglang_router`` in front of ``worker_urls`` and wait for its ``/health``; ``env`` as in
    :func:`launch_servers`."""
    url = f"http://{cfg.host}:{cfg.router_port}"
    proc = _spawn(
        router_command(cfg, worker_urls, api_key=api_key), url, log_dir, "sglang_router", server_env(cfg, env)
    )
    try:
        wait_healthy([url], cfg.startup_timeout_s, api_key=api_key, procs=[proc])
    except BaseException:
        stop_processes([proc])
        raise
    return proc


def server_info(url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict:
    """``GET /server_info`` of a server (its launch arguments, ``tp_size`` among them); raises naming the URL."""
    req = urllib.request.Request(url + "/server_info")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        raise RolloutError(f"GET {url}/server_info failed: {getattr(e, 'reason', e)}") from e
    try:
        info = json.loads(body)
    except json.JSONDecodeError as e:
        raise RolloutError(f"GET {url}/server_info answered something other than JSON: {body[:300]}") from e
    if not isinstance(info, dict):
        raise RolloutError(f"GET {url}/server_info answered {body[:300]}")
    return info


def check_server_tp(urls: Sequence[str], tp_size: int, api_key: str | None) -> None:
    """Refuse servers whose ``/server_info`` TP size differs from ``rollout.sglang.tp_size``: the weight-update group
    gives server ``i`` ranks ``1 + i * tp_size ...``, so a mismatch would make ranks collide or exceed the world."""
    for url in urls:
        info = server_info(url, api_key)
        if info.get("tp_size") != tp_size:
            raise RolloutError(
                f"rollout.sglang.tp_size is {tp_size} but the server at {url} runs tp_size {info.get('tp_size')!r} "
                "(its /server_info); set rollout.sglang.tp_size to the servers' --tp-size"
            )


def wait_healthy(
    urls: Sequence[str],
    timeout_s: float,
    *,
    api_key: str | None = None,
    procs: Sequence[ServerProcess] = (),
    poll_s: float = 1.0,
) -> None:
    """Poll ``GET /health`` on each URL until 200; raises naming the URL (and a dead process's log tail)."""
    deadline = time.monotonic() + timeout_s
    by_url = {p.url: p for p in procs}
    pending = list(urls)
    last: dict[str, str] = {}
    while pending:
        for url in list(pending):
            proc = by_url.get(url)
            if proc is not None and proc.proc.poll() is not None:
                raise RolloutError(
                    f"server for {url} exited with code {proc.proc.returncode} before becoming healthy "
                    f"({proc.command}); log tail:\n{proc.log_tail()}"
                )
            req = urllib.request.Request(url + "/health")
            if api_key:
                req.add_header("Authorization", f"Bearer {api_key}")
            try:
                with urllib.request.urlopen(req, timeout=max(1.0, min(20.0, deadline - time.monotonic()))) as r:
                    if r.status == 200:
                        pending.remove(url)
                        continue
                    last[url] = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last[url] = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last[url] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if not pending:
            break
        if time.monotonic() > deadline:
            detail = ", ".join(f"{u} ({last.get(u, 'no answer')})" for u in pending)
            tails = "".join(f"\n{u} log tail:\n{by_url[u].log_tail()}" for u in pending if u in by_url)
            raise RolloutError(f"SGLang servers not healthy after {timeout_s:.0f}s: {detail}{tails}")
        time.sleep(poll_s)


def stop_processes(procs: Sequence[ServerProcess], timeout_s: float = 30.0) -> None:
    """Terminate (then kill) launched processes and their process groups."""
    for p in procs:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, 15)
    for p in procs:
        try:
            p.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, 9)
            p.proc.wait(5)
