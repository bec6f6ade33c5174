"""SGLang rollout engine: the :class:`~luffy_megatron.rollout.base.RolloutEngine` interface over HTTP servers.

Weight sync (``SGLangConfig.weight_sync``: one module of :mod:`luffy_megatron.rollout.sglang.sync` per mode, looked up
in ``SYNC_MODES``) is always framed here as pause -> flush -> load -> continue, with the new ``weight_version`` set by
the load requests; ``distributed`` and ``tensor`` loads run inside a weight-update session (``/begin_weight_update``
before the first bucket, ``/end_weight_update`` after the last), which SGLang >= 0.5.21 requires. A failure on any
server raises :class:`WeightSyncError` and leaves the engine refusing to generate until a later update succeeds.

With ``colocate``, :meth:`SGLangEngine.release_memory` pauses the (idle) servers and frees their weights, KV cache and
CUDA graphs after generation; the next weight update takes the weights back before its first bucket and the KV cache
and CUDA graphs after its last (:meth:`SGLangEngine.resume_memory` takes all back without an update).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from luffy_megatron.config import FaultToleranceConfig, SGLangConfig, WeightSync, choices
from luffy_megatron.models.tokenizer import read_eos_token_ids
from luffy_megatron.rollout.base import (
    RolloutEngine,
    RolloutError,
    RolloutOutput,
    SamplingParams,
    WeightSyncError,
    sample_counts,
    sample_seed,
)
from luffy_megatron.rollout.sglang.client import LoopThread, SampleRequest, SGLangClient, sampling_params_body
from luffy_megatron.rollout.sglang.launcher import (
    ServerProcess,
    check_server_tp,
    launch_router,
    launch_servers,
    read_api_key,
    stop_processes,
    wait_healthy,
)
from luffy_megatron.rollout.sglang.supervisor import ServerSupervisor, supervise
from luffy_megatron.rollout.sglang.sync import SYNC_MODES, SyncMode
from luffy_megatron.rollout.sglang.weights import resolve_group_backend, trainer_address

logger = logging.getLogger(__name__)
#: SGLang's memory tags (``sglang.srt.constants.GPU_MEMORY_ALL_TYPES``) and the one that holds the weights.
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
WEIGHTS_TAG = "weights"


class SGLangEngine(RolloutEngine):
    """Generation and weight sync over a set of SGLang servers."""

    def __init__(
        self,
        client: SGLangClient,
        *,
        weight_sync: str = "disk",
        weight_sync_dir: str | None = None,
        hf_path: str | None = None,
        bucket_mb: int = 512,
        tp_size: int = 1,
        colocate: bool = False,
        eos_token_ids: Iterable[int] = (),
        processes: list[ServerProcess] | None = None,
        master_address: str = "127.0.0.1",
        master_port: int = 0,
        group_backend: str = "nccl",
        flush_retries: int = 20,
        supervisor: ServerSupervisor | None = None,
    ) -> None:
        if weight_sync not in choices(WeightSync):
            raise ValueError(f"rollout.sglang.weight_sync: {weight_sync!r} is not one of {list(choices(WeightSync))}")
        if weight_sync == WeightSync.DISK and not weight_sync_dir:
            raise ValueError("rollout.sglang.weight_sync_dir is required for weight_sync=disk")
        self.client = client
        self.weight_sync = weight_sync
        self.weight_sync_dir = weight_sync_dir
        self.hf_path = hf_path
        self.bucket_bytes = bucket_mb << 20
        self.tp_size = tp_size
        self.colocate = colocate
        self.eos_token_ids = tuple(eos_token_ids)
        self.processes = processes or []
        self.master_address = master_address
        self.master_port = master_port
        self.group_backend = group_backend
        self.flush_retries = flush_retries
        self.supervisor = supervisor
        self.weight_version: int | None = None
        self._stale = False
        self._released: set[str] = set()  # memory tags the (colocated) servers have released
        self._syncs: dict[WeightSync, SyncMode] = {}  # the modes used so far
        #: The event loop the client's coroutines run on.
        self.loop = LoopThread()
        #: Seconds, bytes and GB/s of the last successful update (disk mode adds ``write_s`` and ``load_s``).
        self.last_sync: dict[str, float] = {}

    @classmethod
    def from_config(
        cls,
        cfg: SGLangConfig,
        hf_path: str,
        *,
        eos_token_ids: Iterable[int] | None = None,
        log_dir: str | None = None,
        fault_tolerance: FaultToleranceConfig | None = None,
        module: str = "sglang.launch_server",
        env: dict | None = None,
    ) -> SGLangEngine:
        """Launch servers (``module``, in ``env``; and the router) or attach to ``cfg.urls``; waits for ``/health``
        either way. The servers are supervised as ``fault_tolerance`` says."""
        api_key = read_api_key(cfg)
        procs: list[ServerProcess] = []
        try:
            if cfg.launch:
                procs = launch_servers(cfg, hf_path, log_dir=log_dir, module=module, env=env)
                server_urls = [p.url for p in procs]
            else:
                server_urls = list(cfg.urls)
                wait_healthy(server_urls, cfg.startup_timeout_s, api_key=api_key)
            generate_urls = server_urls
            if cfg.use_router:
                router = launch_router(cfg, server_urls, api_key=api_key, log_dir=log_dir, env=env)
                procs.append(router)
                generate_urls = [router.url]
            check_server_tp(server_urls, cfg.tp_size, api_key)
        except BaseException:
            stop_processes(procs)
            raise
        client = SGLangClient(
            generate_urls,
            server_urls,
            api_key=api_key,
            max_concurrency=cfg.max_concurrency,
            request_timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.retry_backoff_s,
            samples_per_request=cfg.samples_per_request,
        )
        if eos_token_ids is None:
            eos_token_ids = read_eos_token_ids(hf_path)
        supervisor = supervise(
            cfg,
            hf_path,
            client,
            server_urls,
            procs,
            fault_tolerance,
            api_key=api_key,
            log_dir=log_dir,
            module=module,
            env=env,
        )
        return cls(
            client,
            weight_sync=cfg.weight_sync,
            weight_sync_dir=cfg.weight_sync_dir,
            hf_path=hf_path,
            bucket_mb=cfg.weight_bucket_mb,
            tp_size=cfg.tp_size,
            colocate=cfg.colocate,
            eos_token_ids=eos_token_ids,
            processes=procs,
            master_address=trainer_address(server_urls),
            group_backend=resolve_group_backend(cfg.weight_sync_backend),
            supervisor=supervisor,
        )

    def _run(self, coro: Any) -> Any:
        return self.loop.run(coro)

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: Sequence[int] | None = None
    ) -> list[list[RolloutOutput]]:
        """``counts[i]`` (default ``params.n``) samples of prompt ``i``; each sample is its own request (``rid``,
        seeded with ``sampling_seed`` from (seed, i, j)), batched per HTTP call. When a server dies under a call that
        then fails, the whole call runs again on the servers left (new rids): every sample comes back exactly once."""
        if self._stale:
            raise WeightSyncError("the last weight update failed; refusing to generate from stale weights")
        per_prompt = sample_counts(len(prompts), params, counts)
        if self.supervisor is None:
            return self._generate_once(prompts, params, per_prompt)
        folder = self.sync.folder  # what revived servers can load
        return self.supervisor.run_generation(
            lambda: self._generate_once(prompts, params, per_prompt), self.weight_version, folder, self._run
        )

    def _generate_once(
        self, prompts: list[list[int]], params: SamplingParams, per_prompt: list[int]
    ) -> list[list[RolloutOutput]]:
        call = uuid.uuid4().hex[:12]
        reqs: list[SampleRequest] = []
        for i, prompt in enumerate(prompts):
            for j in range(per_prompt[i]):
                seed = None if params.seed is None else sample_seed(params.seed, i, j)
                sp = sampling_params_body(params, seed, self.eos_token_ids)
                reqs.append(SampleRequest(f"{call}-{i}-{j}", list(prompt), sp))
        results = self._run(self.client.generate(reqs)) if reqs else {}
        out: list[list[RolloutOutput]] = []
        for i in range(len(prompts)):
            row = []
            for j in range(per_prompt[i]):
                r = results[f"{call}-{i}-{j}"]
                row.append(
                    RolloutOutput(
                        i,
                        r.output_ids,
                        r.logprobs,
                        r.finish_reason,
                        j,
                        self.weight_version,
                        {"url": r.url, "server_weight_version": r.meta_info.get("weight_version")},
                    )
                )
            out.append(row)
        return out

    def step_metrics(self) -> dict[str, float]:
        """``rollout/servers_healthy`` (serving now) and ``rollout/servers_restarted`` (restarts so far)."""
        return self.supervisor.step_metrics() if self.supervisor is not None else {}

    # ------------------------------------------------------------------ weights
    @property
    def sync(self) -> SyncMode:
        """The mode ``weight_sync`` names (made at its first use; each keeps its state, e.g. the update group)."""
        mode = WeightSync(self.weight_sync)
        if mode not in self._syncs:
            self._syncs[mode] = SYNC_MODES[mode](self)
        return self._syncs[mode]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Pause, flush, load the stream on every server in the configured mode, continue; raises on any failure."""
        t0 = time.perf_counter()
        joining = self.supervisor.members_for_update() if self.supervisor is not None else []
        fresh = {s.url for s in joining}
        for used in self._syncs.values():  # a mode that holds a group leaves it when the members changed
            used.prepare(fresh)
        sync = self.sync
        self._stale = True
        try:
            self._resume(WEIGHTS_TAG)  # colocated: weights first; the KV cache stays free while the buckets arrive
            self.pause()
            self._flush()
            nbytes = self._push(sync, named_tensors, version)
            self._resume(*MEMORY_TAGS)
            self._run(self.client.post_all("/continue_generation", {}))
            self._set_paused(False)
        except WeightSyncError:
            raise
        except Exception as e:
            raise WeightSyncError(f"weight update to version {version} failed: {e}") from e
        self._stale = False
        self.weight_version = version
        if joining:
            self.supervisor.joined(joining)  # type: ignore[union-attr]
        dt = time.perf_counter() - t0
        self.last_sync = {"seconds": dt, "bytes": float(nbytes), "gb_per_s": nbytes / dt / 1e9 if dt > 0 else 0.0}
        self.last_sync.update(sync.phases)

    def _push(self, sync: SyncMode, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """``sync``'s push, between ``/begin_weight_update`` and ``/end_weight_update`` when its loads need a session;
        a session left open by a failure is closed (best effort) so that the next update can begin one."""
        if not sync.session:
            return sync.push(named_tensors, version)
        try:
            self._run(self.client.post_all("/begin_weight_update", {}))
            nbytes = sync.push(named_tensors, version)
        except BaseException:
            try:
                self._run(self.client.post_all("/end_weight_update", {}))
            except Exception as e:  # the first error is the one to report
                logger.warning("closing the weight-update session after a failure also failed: %s", e)
            raise
        self._run(self.client.post_all("/end_weight_update", {}))
        return nbytes

    def _flush(self) -> None:
        """``/flush_cache`` on every server, retried while a server still has requests to finish (it answers 400)."""
        for attempt in range(self.flush_retries):
            try:
                self._run(self.client.post_all("/flush_cache", None, timeout_s=60.0))
                return
            except RolloutError as e:
                if attempt == self.flush_retries - 1:
                    raise WeightSyncError(f"flush_cache kept failing: {e}") from e
                time.sleep(min(2.0, 0.1 * 2**attempt))

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """``/pause_generation`` (mode abort) on every server."""
        self._run(self.client.post_all("/pause_generation", {"mode": "abort"}))

    def resume(self) -> None:
        """``/continue_generation`` on every server."""
        self._run(self.client.post_all("/continue_generation", {}))

    def release_memory(self) -> None:
        """Colocated servers free weights, KV cache and CUDA graphs; no-op unless colocated. SGLang asserts that the
        scheduler is idle, so generation is paused first (aborting what is left, e.g. the first copy of a retried
        sample) and the cache flushed; the servers stay paused until everything is resumed."""
        if self.colocate and not self._released:
            self.pause()
            self._flush()
            self._run(self.client.post_all("/release_memory_occupation", {"tags": list(MEMORY_TAGS)}))
            self._released = set(MEMORY_TAGS)
            self._set_paused(True)

    def resume_memory(self) -> None:
        """Undo :meth:`release_memory` (no-op when nothing is released): weights, then KV cache and CUDA graphs, then
        generation continues."""
        if self._released:
            self._resume(WEIGHTS_TAG)
            self._resume(*(t for t in MEMORY_TAGS if t != WEIGHTS_TAG))
            self.resume()
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        """Tell the supervisor whether the servers are paused (they then cannot answer ``/health``)."""
        if self.supervisor is not None:
            self.supervisor.paused = paused

    def _resume(self, *tags: str) -> None:
        """Take back the released ``tags`` among ``tags``."""
        todo = [t for t in tags if t in self._released]
        if todo:
            self._run(self.client.post_all("/resume_memory_occupation", {"tags": todo}))
            self._released -= set(todo)

    def health(self) -> dict:
        """Per-server ``/health`` results."""
        servers = {u: self._run(self.client.health(u)) for u in self.client.server_urls}
        return {
            "ok": all(servers.values()) and not self._stale,
            "servers": servers,
            "weight_version": self.weight_version,
            "backend": "sglang",
        }

    def close(self) -> None:
        """Close the HTTP session, stop launched processes (restarted ones too), close every mode used (destroying the
        weight-update group)."""
        restarted = [s.process for s in self.supervisor.servers] if self.supervisor is not None else []
        try:
            self._run(self.client.close())
        finally:
            self.loop.stop()
            stop_processes(self.processes + [p for p in restarted if p is not None and p not in self.processes])
            for used in self._syncs.values():
                used.close()
