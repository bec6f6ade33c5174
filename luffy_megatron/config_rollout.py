"""Options and checks of the rollout-efficiency features (rollout importance sampling, dynamic sampling, one-step-off
asynchronous rollout), kept apart from :mod:`luffy_megatron.config` so that the tree's module stays small.

Plain Python without torch: :func:`luffy_megatron.config.validate` calls :func:`rollout_problems` before anything is
built, and the implementations (:mod:`luffy_megatron.algo.rollout_is`, ...) take their option names from here.
"""

from __future__ import annotations

from typing import Any

#: ``algorithm.rollout_is``: how the on-policy tokens are corrected for the rollout engine being the behaviour policy.
ROLLOUT_IS_MODES = ("token_tis", "seq_tis", "seq_mask")
#: ``algorithm.dynamic_sampling_signal``: which rewards of a group must differ for it to be kept.
DYNAMIC_SAMPLING_SIGNALS = ("on_policy", "group")


def rollout_problems(cfg: Any) -> list[tuple[str, str]]:
    """(key, message) of every invalid rollout-efficiency value of a :class:`~luffy_megatron.config.RunConfig`."""
    a = cfg.algorithm
    problems: list[tuple[str, str]] = []
    if a.rollout_is is not None and a.rollout_is not in ROLLOUT_IS_MODES:
        problems.append(("algorithm.rollout_is", f"{a.rollout_is!r} is not one of {[None, *ROLLOUT_IS_MODES]}"))
    if not a.rollout_is_cap > 1:
        problems.append(("algorithm.rollout_is_cap", f"must be > 1, got {a.rollout_is_cap}"))
    if a.dynamic_sampling_signal not in DYNAMIC_SAMPLING_SIGNALS:
        problems.append(("algorithm.dynamic_sampling_signal",
                         f"{a.dynamic_sampling_signal!r} is not one of {list(DYNAMIC_SAMPLING_SIGNALS)}"))  # fmt: skip
    if a.dynamic_sampling_max_rounds < 1:
        problems.append(("algorithm.dynamic_sampling_max_rounds", f"must be >= 1, got {a.dynamic_sampling_max_rounds}"))
    t, sg = cfg.trainer, cfg.rollout.sglang
    if t.async_rollout_threads is not None and t.async_rollout_threads < 1:
        problems.append(("trainer.async_rollout_threads", f"must be >= 1, got {t.async_rollout_threads}"))
    if t.async_rollout and cfg.rollout.backend == "sglang" and sg.colocate:
        problems.append(("trainer.async_rollout", "needs servers of their own: set rollout.sglang.colocate=false"))
    return problems
