"""Scoring one evaluation sample with the training reward, plus the extracted answer for the per-sample records.

``think_format``: ``paper`` follows the released evaluation script (the response must close ``</think>`` and is
scored after it only when the rendered prompt ends with ``<think>``; otherwise the whole response is scored),
``required`` is the training reward's check (``<think>...</think>`` always), ``off`` scores the whole response.
Ground truths that are a single letter A-J are also matched as multiple-choice letters (the reward's choice mode).
"""

from __future__ import annotations

from luffy_megatron.reward.math_reward import (
    CHOICE_LETTERS,
    ItemTimeout,
    choice_letter,
    load_math_verify,
    score_detailed,
    split_think,
    time_limit,
)

THINK_FORMATS = ("paper", "required", "off")


def require_think(think_format: str, prompt_ends_with_think: bool) -> bool:
    """Whether the response must have the think block, for one of :data:`THINK_FORMATS`."""
    return think_format == "required" or (think_format == "paper" and prompt_ends_with_think)


def extract_answer(answer: str | None, ground_truth: str, timeout_s: float | None) -> str:
    """What math-verify extracts from the answer part (its string form), or the choice letter for a multiple-choice
    ground truth when math-verify finds nothing; ``""`` when there is nothing."""
    if answer is None:
        return ""
    parse, _, latex_config, string_config = load_math_verify()  # the budget is ours (time_limit)
    try:
        with time_limit(timeout_s):
            found = parse(answer, parsing_timeout=None)
            if not found and choice_letter(ground_truth) is not None:
                configs = [string_config(strings=CHOICE_LETTERS), latex_config()]
                found = parse(answer, extraction_config=configs, parsing_timeout=None)
    except ItemTimeout:
        return ""
    return str(found[-1]) if found else ""


def score_sample(
    response: str, ground_truth: str, prompt_ends_with_think: bool, think_format: str, timeout_s: float | None
) -> tuple[float, str, str]:
    """(score, status, extracted answer) of one response."""
    required = require_think(think_format, prompt_ends_with_think)
    res = score_detailed(response, ground_truth, prompt_ends_with_think, timeout_s, required, True)
    answer = split_think(response, prompt_ends_with_think) if required else response
    return res.score, res.status, extract_answer(answer, ground_truth, timeout_s)
