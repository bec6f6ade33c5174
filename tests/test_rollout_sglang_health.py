"""How often the supervisor asks a serving server ``/health`` (a one-token generation that takes SGLang at least a
second), probed through a recording stand-in of :func:`probe_health`."""

from __future__ import annotations

import pytest

from luffy_megatron.rollout.sglang import supervisor as sup
from luffy_megatron.rollout.sglang.client import SGLangClient


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    asked: list[str] = []

    def probe(url: str, timeout_s: float) -> str | None:
        asked.append(url)
        return None

    monkeypatch.setattr(sup, "probe_health", probe)
    return asked


def supervisor(interval_s: float) -> sup.ServerSupervisor:
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    servers = [sup.Server(u, i) for i, u in enumerate(urls)]
    return sup.ServerSupervisor(SGLangClient(urls), servers, health_interval_s=interval_s)


def test_serving_servers_are_probed_once_per_interval_and_always_when_forced(probes):
    s = supervisor(interval_s=60.0)
    assert not s.check()
    assert sorted(probes) == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert not s.check()  # answered moments ago: not asked again
    assert len(probes) == 2
    s.check(force=True)  # after a failed request: asked at once
    assert len(probes) == 4


def test_interval_zero_probes_every_check_and_paused_servers_are_not_asked(probes):
    s = supervisor(interval_s=0.0)
    s.check()
    s.check()
    assert len(probes) == 4
    s.paused = True  # released colocated servers answer neither /health nor /ready
    s.check(force=True)
    assert len(probes) == 4 and len(s.serving()) == 2
