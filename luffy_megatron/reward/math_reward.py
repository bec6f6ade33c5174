"""The LUFFY math reward for one response: ``<think>`` format check, then math-verify against ``$ground_truth$``.

Semantics follow the paper's released reward (``reward_fn_math_verify`` in ElliottYan/LUFFY), with the differences
listed in docs/data_and_rewards.md:

* The paper prepends ``<think>\\n`` to every decoded response (its prompts all end with it) and then requires both
  ``<think>`` and ``</think>`` in the text. Here the ``<think>`` is credited only when the prompt really ends with it
  (``prompt_ends_with_think``); otherwise the response must contain ``<think>`` before its first ``</think>``.
* The answer is the text after the first ``</think>`` and before a second one (the paper's ``split('</think>')[1]``).
* Prediction: ``parse(answer)`` with math-verify's defaults; gold: ``parse('$' + ground_truth + '$')``;
  ``verify(gold, prediction)``. Score 1.0 when it holds, else 0.0. An answer that is only ``\\boxed{<integer>}``
  (possibly followed by the end-of-turn marker) against an integer ground truth is compared as integers directly
  (what math-verify would conclude, without its parse; a test checks the two agree).
* Extra (switchable): a ground truth that is a single choice letter A-J also accepts the letter extracted from the
  answer with ``StringExtractionConfig`` (anchored forms like "answer: B") or from ``\\boxed{(B)}``.
* Timeouts: one budget per item (parse + verify together), enforced with ``signal.setitimer`` in the calling thread,
  which must be a process's main thread. Use :class:`luffy_megatron.reward.pool.RewardPool` from a trainer.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CHOICE_LETTERS = tuple("ABCDEFGHIJ")

# Outcome of one item (RewardResult.status).
CORRECT = "correct"
INCORRECT = "incorrect"
FORMAT_ERROR = "format_error"
TIMEOUT = "timeout"  # the per-item budget ran out inside the scorer
HUNG = "hung"  # the pool killed a worker that ignored the budget
CRASH = "crash"  # the worker process died on this item
ERROR = "error"  # an unexpected exception from math-verify

_CHOICE_RE = re.compile(r"^\(?\s*([A-J])\s*\)?$")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
_INTEGER_RE = re.compile(r"-?[0-9]{1,100}")
# A boxed integer and nothing else but whitespace and the end-of-turn marker the decoded response may keep.
_BOXED_INTEGER_RE = re.compile(r"\s*\\boxed\{(-?[0-9]{1,100})\}\s*(?:<\|(?:im_end|endoftext)\|>)?\s*")


class ItemTimeout(BaseException):
    """Raised by the interval timer when an item exceeds its budget.

    A ``BaseException`` on purpose: math-verify catches ``Exception`` and its own ``TimeoutException`` and would
    otherwise carry on with the next candidate instead of stopping.
    """


@dataclass(frozen=True)
class RewardResult:
    """Score of one response and why (``status`` is one of the module constants)."""

    score: float
    status: str


def split_think(response: str, prompt_ends_with_think: bool) -> str | None:
    """The answer part of ``response`` (after the first ``</think>``, before a second), or None on a format error."""
    close = response.find(THINK_CLOSE)
    if close < 0:
        return None
    if not prompt_ends_with_think and response.find(THINK_OPEN, 0, close) < 0:
        return None
    rest = response[close + len(THINK_CLOSE) :]
    second = rest.find(THINK_CLOSE)
    return rest if second < 0 else rest[:second]


def choice_letter(ground_truth: str) -> str | None:
    """The letter when ``ground_truth`` is a single multiple-choice letter A-J (``B``, ``(B)``), else None."""
    m = _CHOICE_RE.match(ground_truth.strip())
    return m.group(1) if m else None


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in this (main) thread after ``seconds``; None or <= 0 disables the limit."""
    if seconds is None or seconds <= 0:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "a reward timeout needs the main thread (signal.setitimer); use RewardPool or pass timeout_s=None"
        )

    def _raise(signum: int, frame: Any) -> None:
        raise ItemTimeout()

    old = signal.signal(signal.SIGALRM, _raise)
    start = time.monotonic()
    # Re-fire every 50 ms: if some library code swallows the exception, the next one stops it.
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        while True:  # a timer tick may land while disarming; absorb it and disarm again
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                break
            except ItemTimeout:
                continue
        signal.signal(signal.SIGALRM, old)
        if outer > 0:  # someone else's alarm (e.g. pytest-timeout) was pending: re-arm what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


@lru_cache(maxsize=1)
def load_math_verify() -> tuple[Callable, Callable, Any, Any]:
    """Import math-verify once per process and silence its per-call warnings (we time out ourselves). Lazy: it loads
    sympy (seconds), which only the reward workers and the evaluator's scoring need, not the trainer's processes."""
    from math_verify import LatexExtractionConfig, StringExtractionConfig, parse, verify

    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return parse, verify, LatexExtractionConfig, StringExtractionConfig


@lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> list:
    parse = load_math_verify()[0]
    return parse("$" + ground_truth + "$", parsing_timeout=None)


def _normalise_letter(value: Any) -> str:
    text = str(value)
    text = _TEXT_RE.sub(r"\1", text)
    m = _CHOICE_RE.match(text.strip().upper())
    return m.group(1) if m else ""


def _choice_matches(answer: str, letter: str) -> bool:
    parse, _, latex_cfg, string_cfg = load_math_verify()
    configs = [string_cfg(strings=CHOICE_LETTERS, try_extract_without_anchor=False), latex_cfg()]
    extracted = parse(answer, extraction_config=configs, parsing_timeout=None)
    return any(_normalise_letter(x) == letter for x in extracted)


def _grade(response: str, ground_truth: str, prompt_ends_with_think: bool, require_think: bool, choices: bool) -> str:
    if require_think:
        answer = split_think(response, prompt_ends_with_think)
        if answer is None:
            return FORMAT_ERROR
    else:
        answer = response
    boxed = _BOXED_INTEGER_RE.fullmatch(answer)
    if boxed and _INTEGER_RE.fullmatch(ground_truth.strip()):
        # An answer that is just a boxed integer against an integer ground truth: math-verify would extract that
        # integer and compare it numerically; doing so directly saves its ~2 ms parse per sample.
        return CORRECT if int(boxed.group(1)) == int(ground_truth) else INCORRECT
    parse, verify = load_math_verify()[:2]
    gold = _parse_gold(ground_truth)
    pred = parse(answer, parsing_timeout=None)
    if verify(gold, pred, timeout_seconds=None):
        return CORRECT
    letter = choice_letter(ground_truth) if choices else None
    if letter is not None and _choice_matches(answer, letter):
        return CORRECT
    return INCORRECT


def score_detailed(
    response: str,
    ground_truth: str,
    prompt_ends_with_think: bool,
    timeout_s: float | None = 5.0,
    require_think_format: bool = True,
    allow_choice_letters: bool = True,
) -> RewardResult:
    """Score one response in this process. Malformed or unparsable answers, grader errors and timeouts score 0 with a
    status; a response or ground truth that is not a ``str`` raises TypeError (a caller's bug, not a bad answer)."""
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(f"response and ground_truth must be str, got {type(response)} and {type(ground_truth)}")
    try:
        with time_limit(timeout_s):
            status = _grade(response, ground_truth, prompt_ends_with_think, require_think_format, allow_choice_letters)
    except ItemTimeout:
        status = TIMEOUT
    except RecursionError:
        status = ERROR
    except Exception:  # math-verify already swallows most errors; anything left is a wrong answer, not a crash
        logging.getLogger(__name__).debug("reward error", exc_info=True)
        status = ERROR
    return RewardResult(1.0 if status == CORRECT else 0.0, status)


def score_one(
    response: str,
    ground_truth: str,
    prompt_ends_with_think: bool,
    timeout_s: float | None = 5.0,
    require_think_format: bool = True,
    allow_choice_letters: bool = True,
) -> float:
    """1.0 when ``response`` is well formed and its answer matches ``ground_truth``, else 0.0 (in-process)."""
    return score_detailed(
        response, ground_truth, prompt_ends_with_think, timeout_s, require_think_format, allow_choice_letters
    ).score
