"""Test tiers that need something beyond this repository: ``slurm`` (a local Slurm cluster; installed with apt-get
when missing and running as root), ``eval-data`` (the full LUFFY eval parquet beside the repository), ``sglang`` (the
real server's environment, ``.venv-sglang``) and ``registry`` (the package registry, for the pinned upstream wheels
the contract tests read; ``-m "not registry"`` deselects the tests marked with it).

A test that cannot run its tier calls :func:`skip_tier`: a skip whose reason starts with ``[tier NAME]``, listed at the
end of every pytest run (see ``conftest.py``). With ``LUFFY_REQUIRE_ALL_TIERS=1`` (set by ``.ci/run``) it is a failure
instead, so CI cannot pass with a tier silently missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_ENV = "LUFFY_REQUIRE_ALL_TIERS"
TIER_PREFIX = "[tier "
# The full eval set (6,023 rows) where the data is kept beside the repository; tests/fixtures/eval_small.parquet
# holds 3 rows per data source of it for the tests that need only a few real rows.
EVAL_PARQUET = Path(__file__).resolve().parents[2] / "shared/data/luffy_eval/valid.all.parquet"
EVAL_SMALL = Path(__file__).resolve().parent / "fixtures" / "eval_small.parquet"


def tiers_required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def skip_tier(tier: str, reason: str) -> None:
    """Skip this test because tier ``tier`` cannot run here, or fail it when every tier is required."""
    if tiers_required():
        pytest.fail(f"{TIER_PREFIX}{tier}] required ({REQUIRE_ENV}=1) but cannot run: {reason}", pytrace=False)
    pytest.skip(f"{TIER_PREFIX}{tier}] {reason}")


def require_eval_parquet() -> Path:
    """The full eval parquet, or a tier skip naming where it was looked for."""
    if not EVAL_PARQUET.is_file():
        skip_tier("eval-data", f"full eval parquet not found at {EVAL_PARQUET}")
    return EVAL_PARQUET
