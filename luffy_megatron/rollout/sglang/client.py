"""Async HTTP client for SGLang servers (the subset of the API in ``docs/rollout.md``).

Generation requests are batched (``samples_per_request`` samples per ``/generate`` call, each with its own ``rid``),
spread over the generate URLs (one router, or the servers themselves, least-loaded first), bounded by a semaphore, and
retried with exponential backoff on another URL when a connection fails, a server answers 5xx or malformed JSON, or a
request times out. A 4xx answer is a bad request and fails at once. Results are matched by ``rid``; the batch fails
unless every sample comes back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args

import aiohttp

from luffy_megatron.rollout.base import FinishReason, RolloutError, SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: ``sampling_params`` keys this client may send; all are documented SGLang keys (unknown keys are rejected by SGLang).
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "stop_token_ids",
        "ignore_eos",
        "n",
        "sampling_seed",
        "skip_special_tokens",
        "no_stop_trim",
        "min_new_tokens",
    }
)


class RetryableError(Exception):
    """A transient failure of one server (connection, 5xx, timeout, malformed answer)."""


class RequestRejected(RolloutError):
    """The server answered 4xx: the request itself is wrong and is not retried."""


@dataclass
class SampleRequest:
    """One sample to generate: its ``rid`` must be unique within a call of :meth:`SGLangClient.generate`."""

    rid: str
    input_ids: list[int]
    sampling_params: dict


@dataclass
class SampleResult:
    """One parsed answer: ``logprobs[t]`` belongs to ``output_ids[t]``."""

    rid: str
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    meta_info: dict = field(default_factory=dict)
    url: str = ""


def parse_finish_reason(value: Any) -> FinishReason:
    """SGLang's ``meta_info.finish_reason`` (``{"type": ...}`` or a bare string) as stop | length | abort."""
    kind = value.get("type") if isinstance(value, dict) else value
    if kind in get_args(FinishReason):
        return kind
    raise RetryableError(f"unexpected finish_reason {value!r}")


def parse_sample(item: Any, rid: str) -> SampleResult:
    """Validate one element of a ``/generate`` answer; malformed answers raise :class:`RetryableError`.

    The sampled tokens are taken from ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` per token),
    which always include a matched stop token; ``output_ids`` must equal them or lack only that final stop token.
    """
    try:
        output_ids = [int(t) for t in item["output_ids"]]
        meta = item["meta_info"]
        lps = meta["output_token_logprobs"]
        finish = parse_finish_reason(meta["finish_reason"])
        tokens = [int(e[1]) for e in lps]
        logprobs = [float(e[0]) for e in lps]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RetryableError(f"malformed /generate answer for rid {rid!r}: {e!r}; answer: {str(item)[:300]}") from e
    if meta.get("id", rid) != rid:
        raise RetryableError(f"answer id {meta.get('id')!r} does not match rid {rid!r}")
    trimmed_stop = finish == "stop" and output_ids == tokens[:-1]
    if output_ids != tokens and not trimmed_stop:
        raise RetryableError(
            f"rid {rid!r}: output_ids ({len(output_ids)} tokens) do not match output_token_logprobs ({len(tokens)})"
        )
    return SampleResult(rid, tokens, logprobs, finish, meta)


class SGLangClient:
    """Talks to SGLang servers; all methods are coroutines (see :class:`LoopThread` for synchronous use).

    ``generate_urls`` receive ``/generate`` (a router or the servers); ``server_urls`` receive control and weight
    requests (always the servers themselves). The API key, when given, is sent as ``Authorization: Bearer`` and never
    appears in logs, reprs or error messages.
    """

    def __init__(
        self,
        generate_urls: Sequence[str],
        server_urls: Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        max_concurrency: int = 256,
        request_timeout_s: float = 3600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        samples_per_request: int = 16,
    ) -> None:
        if not generate_urls:
            raise RolloutError("SGLangClient needs at least one server URL")
        self.generate_urls = [u.rstrip("/") for u in generate_urls]
        self.server_urls = [u.rstrip("/") for u in (server_urls or generate_urls)]
        self._api_key = api_key
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.samples_per_request = samples_per_request
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight = dict.fromkeys(self.generate_urls, 0)
        self._failures = dict.fromkeys(self.generate_urls, 0)
        self._background: set[asyncio.Future] = set()

    def __repr__(self) -> str:
        key = "<redacted>" if self._api_key else None
        return f"SGLangClient(generate_urls={self.generate_urls}, server_urls={self.server_urls}, api_key={key})"

    def set_urls(self, generate_urls: Sequence[str], server_urls: Sequence[str]) -> None:
        """Replace both URL lists (the servers that serve now); a URL that (re)appears starts with no failures."""
        added = set(generate_urls) - set(self.generate_urls)
        self.generate_urls = [u.rstrip("/") for u in generate_urls]
        self.server_urls = [u.rstrip("/") for u in server_urls]
        for url in self.generate_urls:
            self._inflight.setdefault(url, 0)
            if url in added:
                self._failures[url] = 0

    def remove_server(self, url: str) -> None:
        """Stop sending anything to ``url`` (a dead server; weight updates fail while it is listed)."""
        url = url.rstrip("/")
        if url in self.generate_urls and len(self.generate_urls) == 1:
            raise RolloutError(f"cannot remove {url}: it is the only generate URL")
        self.generate_urls = [u for u in self.generate_urls if u != url]
        self.server_urls = [u for u in self.server_urls if u != url]

    # ------------------------------------------------------------------ plumbing
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers())
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._session

    async def close(self) -> None:
        """Cancel background aborts and close the HTTP session."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def request(
        self, url: str, path: str, body: dict | None = None, *, method: str = "POST", timeout_s: float | None = None
    ) -> Any:
        """One HTTP call: JSON (or text) on 2xx; 4xx -> :class:`RequestRejected`; else :class:`RetryableError`."""
        session = await self._get_session()
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s, connect=self.connect_timeout_s)
        try:
            async with session.request(method, url + path, json=body, timeout=timeout) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise RetryableError(f"{method} {url}{path}: {type(e).__name__}: {e}") from e
        if 400 <= status < 500 and status not in (408, 429):
            raise RequestRejected(f"{method} {url}{path} rejected with HTTP {status}: {text[:500]}")
        if status >= 300:
            raise RetryableError(f"{method} {url}{path}: HTTP {status}: {text[:200]}")
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    # ------------------------------------------------------------------ generation
    def _pick_url(self, exclude: set[str]) -> str:
        candidates = [u for u in self.generate_urls if u not in exclude] or self.generate_urls
        return min(candidates, key=lambda u: (self._failures[u], self._inflight[u], random.random()))

    async def _post_generate(self, url: str, chunk: list[SampleRequest]) -> list[Any]:
        """The raw answers for ``chunk``: one batched request to a server; one request per sample to a router
        (sglang-router's ``/generate`` takes one ``sampling_params`` object and one ``rid`` string per request)."""
        if url in self.server_urls:
            answer = await self.request(url, "/generate", generate_body(chunk))
            if not isinstance(answer, list) or len(answer) != len(chunk):
                raise RetryableError(
                    f"/generate on {url}: expected a list of {len(chunk)} answers, got: {str(answer)[:300]}"
                )
            return answer
        answers = await asyncio.gather(
            *(self.request(url, "/generate", generate_body([r], batched=False)) for r in chunk), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            if not isinstance(answer, dict):
                raise RetryableError(f"/generate on router {url}: expected one answer object, got: {str(answer)[:300]}")
        return answers

    async def _generate_chunk(self, chunk: list[SampleRequest]) -> list[SampleResult]:
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            url = self._pick_url(tried)
            tried.add(url)
            self._inflight[url] += 1
            try:
                assert self._sem is not None
                async with self._sem:
                    answer = await self._post_generate(url, chunk)
                results = [parse_sample(item, r.rid) for item, r in zip(answer, chunk)]
                self._failures[url] = 0
                for res in results:
                    res.url = url
                return results
            except RetryableError as e:
                self._failures[url] += 1
                errors.append(str(e))
                logger.warning("generate attempt %d failed: %s", attempt + 1, e)
                # A slow server may still be working on these rids: cancel them there before resending elsewhere.
                task = asyncio.ensure_future(self._quiet_abort(url, [r.rid for r in chunk]))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                if attempt < self.max_retries:
                    await asyncio.sleep(self.backoff_s * (2**attempt) * (0.5 + random.random()))
            finally:
                self._inflight[url] -= 1
        raise RolloutError(
            f"/generate failed after {self.max_retries + 1} attempts on {sorted(tried)}: " + " | ".join(errors)
        )

    async def _quiet_abort(self, url: str, rids: list[str]) -> None:
        """Abort ``rids`` where they run: on ``url`` when it is a server, on every server behind a router (which has
        no ``/abort_request`` of its own)."""
        targets = [url] if url in self.server_urls else self.server_urls

        async def abort_on(server: str) -> None:
            for rid in rids:
                try:
                    await self.request(server, "/abort_request", {"rid": rid}, timeout_s=5.0)
                except Exception:  # best effort: the server may be dead
                    return

        await asyncio.gather(*(abort_on(server) for server in targets))

    async def generate(self, requests: Sequence[SampleRequest]) -> dict[str, SampleResult]:
        """Generate every request; the answer holds each ``rid`` exactly once or the call raises."""
        rids = [r.rid for r in requests]
        if len(set(rids)) != len(rids):
            raise RolloutError("duplicate rids in one generate call")
        for r in requests:
            unknown = set(r.sampling_params) - SAMPLING_KEYS
            if unknown:
                raise RolloutError(f"sampling_params keys not in the documented SGLang API: {sorted(unknown)}")
        await self._get_session()
        k = self.samples_per_request
        chunks = [list(requests[i : i + k]) for i in range(0, len(requests), k)]
        tasks = [asyncio.ensure_future(self._generate_chunk(c)) for c in chunks]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out: dict[str, SampleResult] = {}
        for res in (r for chunk in done for r in chunk):
            if res.rid in out:
                raise RolloutError(f"rid {res.rid!r} answered twice")
            out[res.rid] = res
        missing = set(rids) - set(out)
        if missing:
            raise RolloutError(f"{len(missing)} samples never came back, e.g. {sorted(missing)[:3]}")
        return out

    # ------------------------------------------------------------------ control
    async def post_all(
        self, path: str, body: dict | None = None, *, timeout_s: float | None = None, urls: Sequence[str] | None = None
    ) -> list[Any]:
        """POST to every server concurrently; raises naming each server that failed or answered ``success: false``."""
        return await self.post_each(path, dict.fromkeys(urls or self.server_urls, body), timeout_s=timeout_s)

    async def post_each(self, path: str, bodies: dict[str, dict | None], *, timeout_s: float | None = None) -> list:
        """POST ``bodies[url]`` to each ``url`` concurrently; errors as in :meth:`post_all`."""
        targets = list(bodies)
        answers = await asyncio.gather(
            *(self.request(u, path, bodies[u], timeout_s=timeout_s) for u in targets), return_exceptions=True
        )
        failed = []
        for url, ans in zip(targets, answers):
            if isinstance(ans, BaseException):
                failed.append(f"{url}: {ans}")
            elif isinstance(ans, dict) and ans.get("success") is False:
                failed.append(f"{url}: {ans.get('message', ans)}")
        if failed:
            raise RolloutError(f"{path} failed on {len(failed)}/{len(targets)} servers: " + " | ".join(failed))
        return list(answers)

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """``/abort_request`` on every server: the request whose rid equals ``rid`` (SGLang matches exactly, a
        prefix aborts nothing), or every request with ``abort_all``."""
        body: dict[str, Any] = {"abort_all": abort_all}
        if rid is not None:
            body["rid"] = rid
        await self.post_all("/abort_request", body, timeout_s=30.0)

    async def health(self, url: str, timeout_s: float = 30.0) -> bool:
        """True when ``GET /health`` answers 200."""
        try:
            await self.request(url, "/health", None, method="GET", timeout_s=timeout_s)
            return True
        except RolloutError:
            return False
        except RetryableError:
            return False


async def _cancel_other_tasks() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.05)  # let closed transports run their connection_lost callbacks


class LoopThread:
    """An event loop in a daemon thread, so synchronous trainer code can run the client's coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sglang-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and join the thread."""
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self.run(_cancel_other_tasks(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


def generate_body(chunk: Sequence[SampleRequest], *, batched: bool = True) -> dict:
    """The ``/generate`` body of ``chunk``: lists of ``input_ids``, ``sampling_params`` and ``rid`` (a server's batched
    form), or the one sample's values themselves (``batched=False``, the only form sglang-router accepts)."""
    if not batched and len(chunk) != 1:
        raise ValueError(f"an unbatched /generate body holds one sample, got {len(chunk)}")
    body: dict[str, Any] = {"return_logprob": True, "logprob_start_len": -1, "stream": False}
    if not batched:
        one = chunk[0]
        return {**body, "input_ids": one.input_ids, "sampling_params": one.sampling_params, "rid": one.rid}
    ids, params, rids = [r.input_ids for r in chunk], [r.sampling_params for r in chunk], [r.rid for r in chunk]
    return {**body, "input_ids": ids, "sampling_params": params, "rid": rids}


def sampling_params_body(params: SamplingParams, seed: int | None, stop_token_ids: Iterable[int]) -> dict:
    """The ``sampling_params`` object of one sample (documented keys only)."""
    body: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
    }
    stops = sorted(set(stop_token_ids) | set(params.stop_token_ids))
    if stops:
        body["stop_token_ids"] = stops
    if seed is not None:
        body["sampling_seed"] = seed
    return body
