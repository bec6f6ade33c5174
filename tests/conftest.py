"""Shared pytest setup: tests run offline, single-threaded per process, with the `slow` marker registered; the run
ends with one line per test tier that did not run here, with the reason (see tests/tiers.py)."""

import os

import pytest

from tests.tiers import REQUIRE_ENV, TIER_PREFIX

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="module")
def _kept_worlds_only_where_used(request):
    """Kept gloo worlds (``tests.dist_utils``) stay alive across the modules that use them and are stopped before a
    module that does not, so they hold no memory or CPU while real servers and clusters run."""
    if "run_distributed" not in vars(request.module):
        from tests.dist_utils import shutdown_worlds

        shutdown_worlds()
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end tests (skipped by `make test-fast`)")
    config.addinivalue_line("markers", "registry: reads pinned upstream wheels fetched from the package registry")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per skipped tier: its name, how many tests it holds, why it did not run."""
    skipped: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(TIER_PREFIX):
            tier, _, why = reason[len(TIER_PREFIX) :].partition("] ")
            skipped.setdefault(tier, []).append(why)
    if not skipped:
        return
    terminalreporter.section("test tiers not run here")
    for tier, reasons in sorted(skipped.items()):
        terminalreporter.write_line(f"{tier}: {len(reasons)} tests skipped: {reasons[0]}")
    terminalreporter.write_line(f"({REQUIRE_ENV}=1 turns these skips into failures, as CI does.)")


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_rendezvous_env():
    """A test must not leave MASTER_ADDR/MASTER_PORT behind: every later subprocess would inherit a port that this
    process may still listen on (a CI run failed with EADDRINUSE that way)."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS_VARS}
    yield
    leaked = {k: os.environ[k] for k in RENDEZVOUS_VARS if k in os.environ and os.environ[k] != before[k]}
    for k in leaked:
        if before[k] is None:
            del os.environ[k]
        else:
            os.environ[k] = before[k]
    assert not leaked, f"the test left {leaked} in os.environ"
