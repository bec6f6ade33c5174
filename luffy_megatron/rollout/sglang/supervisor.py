"""Rollout servers that die and come back.

:class:`ServerSupervisor` keeps each SGLang server in one of three states:

- ``serving``: in the client's URL lists; receives generation and weight updates.
- ``down``: its process exited or it stopped answering ``/health`` within ``health_timeout_s``. It leaves the URL lists
  at once (samples it was generating are retried elsewhere by the engine: each sample comes back exactly once). A
  server this project launched is restarted (a hung one is stopped first); a server given as a URL is waited for.
- ``rejoining``: healthy again but holding stale weights. It receives no generation until a weight update has reached
  it (the engine's next :meth:`~luffy_megatron.rollout.sglang.engine.SGLangEngine.update_weights`, or the last weights
  from disk when no server is left); only then is it ``serving`` again, at the trainer's ``weight_version``.

Behind ``sglang_router`` a revived server could be routed to before its re-sync (the router re-admits a worker that
passes its own health checks), so after the first death the engine sends generation straight to the serving servers
and no longer through the router.
"""

from __future__ import annotations

import functools
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from luffy_megatron.config import FaultToleranceConfig, SGLangConfig
from luffy_megatron.rollout.base import RolloutError
from luffy_megatron.rollout.sglang.client import SGLangClient
from luffy_megatron.rollout.sglang.launcher import ServerProcess, start_server, stop_processes

logger = logging.getLogger(__name__)
T = TypeVar("T")
SERVING, DOWN, REJOINING = "serving", "down", "rejoining"


@dataclass
class Server:
    url: str
    index: int
    process: ServerProcess | None = None  # launched here (restartable); None when given as a URL
    state: str = SERVING
    cause: str = ""
    down_since: float = 0.0
    restarts: int = 0


def probe_health(url: str, timeout_s: float) -> str | None:
    """None when ``GET /health`` answers 200 within ``timeout_s``, else why not (``/health`` needs no API key)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:
            return None if r.status == 200 else f"/health answered HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"/health answered HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"no answer to /health ({type(e).__name__}: {getattr(e, 'reason', e)})"


class ServerSupervisor:
    """Health of the servers behind one :class:`SGLangClient`; every method runs between requests (never
    concurrently with a generation or a weight update)."""

    def __init__(
        self,
        client: SGLangClient,
        servers: list[Server],
        *,
        restart: Callable[[int], ServerProcess] | None = None,
        health_timeout_s: float = 10.0,
        grace_s: float = 600.0,
        router: bool = False,
        health_interval_s: float = 0.0,
    ) -> None:
        self.client = client
        self.servers = servers
        self.restart = restart
        self.health_timeout_s = health_timeout_s
        self.grace_s = grace_s
        self.router = router
        self.health_interval_s = health_interval_s
        self._healthy_at: dict[str, float] = {}  # when each serving server last answered its probe
        #: Set by the engine while its servers are paused (colocated, memory released): they cannot generate, so only
        #: their processes are checked.
        self.paused = False

    def serving(self) -> list[Server]:
        return [s for s in self.servers if s.state == SERVING]

    def rejoining(self) -> list[Server]:
        return [s for s in self.servers if s.state == REJOINING]

    def step_metrics(self) -> dict[str, float]:
        return {
            "rollout/servers_healthy": float(len(self.serving())),
            "rollout/servers_restarted": float(sum(s.restarts for s in self.servers)),
        }

    def check(self, force: bool = False) -> bool:
        """Probe the servers (concurrently) and move them between states; True when a server went down. A serving
        server that answered less than ``health_interval_s`` ago is only checked for a process exit, unless
        ``force``."""
        now = time.monotonic()
        serving = self.serving()

        def cause(s: Server) -> str | None:
            recent = not force and now - self._healthy_at.get(s.url, float("-inf")) < self.health_interval_s
            return self._dead_cause(s, probe=not recent)

        with ThreadPoolExecutor(max(1, len(serving))) as pool:
            causes = list(pool.map(cause, serving))
        for s, c in zip(serving, causes):
            if c is not None:
                self._mark_down(s, c)
        for s in self.servers:
            if s not in serving:
                self._revive(s)
        return any(c is not None for c in causes)

    def _dead_cause(self, s: Server, probe: bool = True) -> str | None:
        if s.process is not None and s.process.proc.poll() is not None:
            return f"process exited with code {s.process.proc.returncode}"
        if not probe or self.paused:  # a paused server answers neither /health nor /ready; requests will show it
            return None
        cause = probe_health(s.url, self.health_timeout_s)
        if cause is None:
            self._healthy_at[s.url] = time.monotonic()
        else:
            self._healthy_at.pop(s.url, None)
        return cause

    def _mark_down(self, s: Server, cause: str) -> None:
        s.state, s.cause, s.down_since = DOWN, cause, time.monotonic()
        logger.warning("rollout server %s is down (%s); no more work goes to it", s.url, cause)
        if s.process is not None and s.process.proc.poll() is None:
            stop_processes([s.process])  # hung: it is restarted below
        self.router = False  # the router could send work to it once it answers again: talk to the servers directly
        self._publish()
        self._revive(s)

    def _revive(self, s: Server) -> None:
        """Restart a dead launched server (once per death); mark a healthy one as rejoining."""
        if s.state == DOWN and s.process is not None and self.restart is not None and s.process.proc.poll() is not None:
            logger.warning("restarting rollout server %s (%s)", s.url, s.cause)
            s.process = self.restart(s.index)
            s.restarts += 1
        if s.state == DOWN and probe_health(s.url, self.health_timeout_s) is None:
            s.state = REJOINING
            logger.warning("rollout server %s answers again; it serves once it has the current weights", s.url)

    def run_generation(self, generate: Callable[[], T], version: int | None, folder: Path | None, run: Any) -> T:
        """``generate()`` once a server serves (:meth:`ensure_serving`); when it fails because a server died, once
        more on the servers left (the caller makes new rids: every sample comes back exactly once)."""
        self.ensure_serving(version, folder, run)
        try:
            return generate()
        except RolloutError as e:
            if not self.check(force=True):
                raise
            logger.warning("a rollout server died during generation (%s); generating the batch again", e)
        self.ensure_serving(version, folder, run)
        return generate()

    def ensure_serving(self, version: int | None, folder: Path | None, run: Any) -> None:
        """Probe; with no server serving, wait for one. A revived server first needs the trainer's weights: none
        before the first update (``version`` None: it loaded the same HF folder), else those of the last disk update
        in ``folder``, loaded by ``run``-ning a client request (None when only the trainer holds them: fail at once).
        """
        self.check()
        if self.serving():
            return
        if version is not None and folder is None:
            causes = "; ".join(f"{s.url}: {s.cause}" for s in self.servers)
            raise RolloutError(
                f"every rollout server is down ({causes}) and only the trainer holds weight version "
                f"{version} (weight_sync is not disk): resume from the last checkpoint"
            )

        def restore(servers: list[Server]) -> None:
            if version is not None:
                body = {
                    "model_path": str(folder),
                    "weight_version": str(version),
                    "flush_cache": True,
                    "abort_all_requests": False,
                }
                run(self.client.post_all("/update_weights_from_disk", body, urls=[s.url for s in servers]))

        self.wait_for_any(restore)

    def members_for_update(self) -> list[Server]:
        """Probe; a weight update goes to the serving servers and the revived ones, which are returned (they serve once
        it succeeded, :meth:`joined`). Every server is asked ``/health`` here, whenever it was last asked: a death
        missed before an update fails the update."""
        self.check(force=True)
        joining = self.rejoining()
        self.client.set_urls(self.client.generate_urls, [s.url for s in self.serving() + joining])
        return joining

    def joined(self, servers: list[Server]) -> None:
        """``servers`` received the current weights: they serve again."""
        for s in servers:
            s.state, s.cause = SERVING, ""
            logger.warning("rollout server %s serves again", s.url)
        self._publish()

    def _publish(self) -> None:
        """Give the client the serving servers (generation goes through the router while none has died)."""
        urls = [s.url for s in self.serving()]
        self.client.set_urls(self.client.generate_urls if self.router else urls, urls)

    def wait_for_any(self, resync: Callable[[list[Server]], None]) -> None:
        """Return once a server serves; rejoining ones first get the current weights from ``resync`` (which raises
        when it cannot restore them). Raises :class:`RolloutError` naming every server's cause once none has served
        for ``grace_s``."""
        while not self.serving():
            self.check()
            joining = self.rejoining()
            if joining:
                resync(joining)
                self.joined(joining)
                return
            if time.monotonic() - max(s.down_since for s in self.servers) > self.grace_s:
                causes = "; ".join(f"{s.url}: {s.cause or s.state}" for s in self.servers)
                raise RolloutError(f"no rollout server has served for {self.grace_s:.0f} s ({causes})")
            time.sleep(min(5.0, self.health_timeout_s))


def supervise(
    cfg: SGLangConfig,
    hf_path: str,
    client: SGLangClient,
    server_urls: Sequence[str],
    procs: Sequence[ServerProcess],
    ft: FaultToleranceConfig | None,
    *,
    api_key: str | None,
    log_dir: str | None,
    module: str,
    env: dict | None,
) -> ServerSupervisor:
    """The supervisor of an engine's servers: launched ones (``procs``) restart with their launch arguments."""
    ft = ft or FaultToleranceConfig()
    restart = None
    if cfg.launch and ft.restart_servers:  # called with the server's index
        restart = functools.partial(
            start_server, cfg, hf_path, api_key=api_key, log_dir=log_dir, module=module, env=env
        )
    launched = {p.url: p for p in procs}
    servers = [Server(url, i, launched.get(url)) for i, url in enumerate(server_urls)]
    return ServerSupervisor(
        client,
        servers,
        restart=restart,
        health_timeout_s=ft.health_timeout_s,
        grace_s=ft.servers_grace_s,
        router=cfg.use_router,
        health_interval_s=ft.health_interval_s,
    )
