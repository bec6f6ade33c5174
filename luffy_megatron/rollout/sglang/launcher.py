"""Start SGLang servers (and optionally ``sglang_router``) as subprocesses, or attach to running ones.

Servers bind to ``SGLangConfig.host`` (127.0.0.1 by default). Server ``i`` listens on ``base_port + PORT_STRIDE * i``
and uses GPUs ``[i * tp_size, (i + 1) * tp_size)`` of the node (``--base-gpu-id``). The API key is read from the
environment variable named by ``api_key_env``; SGLang only takes it as ``--api-key`` on its command line, so it is
visible to local users through ``/proc`` on that host, but it is redacted from every command line this module prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from luffy_megatron.config import SGLangConfig
from luffy_megatron.rollout.base import RolloutError

logger = logging.getLogger(__name__)
PORT_STRIDE = 10
_SECRET_FLAGS = ("--api-key", "--admin-api-key")


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


def server_command(
    cfg: SGLangConfig,
    model_path: str,
    index: int,
    *,
    api_key: str | None = None,
    module: str = "sglang.launch_server",
    python: str = sys.executable,
) -> list[str]:
    """The argv of server ``index``: tokenizer-free (token ids in, token ids out)."""
    port = cfg.base_port + PORT_STRIDE * index
    cmd = [
        python, "-m", module,
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(port),
        "--tp-size", str(cfg.tp_size),
        "--base-gpu-id", str(index * cfg.tp_size),
        "--mem-fraction-static", str(cfg.mem_fraction_static),
        "--dtype", cfg.dtype,
        "--skip-tokenizer-init",
    ]  # fmt: skip
    if cfg.context_length is not None:
        cmd += ["--context-length", str(cfg.context_length)]
    if cfg.colocate:
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
    cmd = [sys.executable, "-m", module, "--worker-urls", *worker_urls, "--host", cfg.host,
           "--port", str(cfg.router_port)]  # fmt: skip
    return cmd + (["--api-key", api_key] if api_key else [])


def _spawn(cmd: list[str], url: str, log_dir: str | None, name: str, env: dict | None) -> ServerProcess:
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
    env: dict | None = None,
    wait: bool = True,
) -> list[ServerProcess]:
    """Start ``cfg.num_servers`` servers and (by default) wait until each answers ``/health``."""
    api_key = read_api_key(cfg)
    procs = [start_server(cfg, model_path, i, api_key=api_key, log_dir=log_dir, module=module, env=env)
             for i in range(cfg.num_servers)]  # fmt: skip
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
    env: dict | None = None,
) -> ServerProcess:
    """Start server ``index`` without waiting for it (its log, ``sglang_{index}.log``, is appended to)."""
    url = f"http://{cfg.host}:{cfg.base_port + PORT_STRIDE * index}"
    cmd = server_command(cfg, model_path, index, api_key=api_key, module=module)
    return _spawn(cmd, url, log_dir, f"sglang_{index}", env)


def launch_router(
    cfg: SGLangConfig,
    worker_urls: Sequence[str],
    *,
    api_key: str | None = None,
    log_dir: str | None = None,
    env: dict | None = None,
) -> ServerProcess:
    """Start ``sglang_router`` in front of ``worker_urls`` and wait for its ``/health``."""
    url = f"http://{cfg.host}:{cfg.router_port}"
    proc = _spawn(router_command(cfg, worker_urls, api_key=api_key), url, log_dir, "sglang_router", env)
    try:
        wait_healthy([url], cfg.startup_timeout_s, api_key=api_key, procs=[proc])
    except BaseException:
        stop_processes([proc])
        raise
    return proc


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
            raise RolloutError(f"SGLang servers not healthy after {timeout_s:.0f}s: {detail}")
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
