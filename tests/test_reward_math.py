"""The LUFFY math reward in-process: a table of answers vs ground truths, the think-format rule, adversarial inputs.

Each expectation was checked against math-verify 0.9 and against what a careful human grader would say; where the two
could disagree the comment says which behaviour is pinned.
"""

from __future__ import annotations

import time

import pytest

from luffy_megatron.reward import score_detailed, score_one, split_think
from luffy_megatron.reward.math_reward import CORRECT, ERROR, FORMAT_ERROR, INCORRECT, TIMEOUT, choice_letter

THINK = "<think>\nLet me work it out.\n</think>\n"

# (answer text after </think>, ground truth, expected score)
TABLE = [
    ("The sum is \\boxed{132}.", "132", 1),
    ("\\boxed{131}", "132", 0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),  # decimal vs fraction
    ("\\boxed{\\frac{1}{2}}", "0.5", 1),
    ("\\boxed{1/2}", "\\frac12", 1),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34", 1),
    ("\\boxed{3/4}", "0.75", 1),
    ("\\boxed{4}", "\\frac{8}{2}", 1),
    ("\\boxed{\\frac{1}{3}}", "0.333", 0),  # a rounded gold is not 1/3
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),  # radicals simplify
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{3}", 0),
    ("\\boxed{1.414}", "\\sqrt{2}", 0),  # an approximation is not the exact value
    ("\\boxed{[1,3)}", "[1,3)", 1),  # intervals
    ("\\boxed{(1,3)}", "[1,3)", 0),  # wrong endpoint
    ("\\boxed{-\\infty, 2}", "(-\\infty, 2]", 0),
    ("\\boxed{\\{1,2,3\\}}", "\\{3,2,1\\}", 1),  # sets are unordered
    ("\\boxed{x=3}", "3", 1),  # x=3 vs 3
    ("\\boxed{3}", "x=3", 1),
    ("\\boxed{a=2, b=3}", "2,3", 1),
    ("\\boxed{50\\%}", "50", 1),  # percentages
    ("\\boxed{50}", "50\\%", 1),
    ("\\boxed{0.5}", "50\\%", 1),
    ("\\boxed{10\\text{ cm}}", "10", 1),  # units
    ("\\boxed{10}", "10\\text{ cm}", 1),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{\\boxed{7}}", "7", 1),  # nested \boxed
    ("\\boxed{5} or maybe \\boxed{6}", "6", 0),  # hedging between two boxed answers earns nothing
    ("\\boxed{1,000}", "1000", 1),  # thousands separator
    ("\\boxed{3.0}", "3", 1),
    ("\\boxed{023}", "23", 1),  # AIME-style leading zeros
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1),  # a real MATH-500 answer
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),  # symbolic equality
    ("\\boxed{2+3i}", "2+3i", 1),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1),  # text answers compare as strings
    ("The answer is $3$.", "3", 1),  # no box: math-verify's last-expression fallback
    ("\\boxed{}", "3", 0),
    ("\\boxed{3", "3", 0),  # unbalanced brace: nothing extractable
    ("The answer is B.", "B", 1),  # multiple choice (anchored letter)
    ("**Answer: D**", "D", 1),
    ("Therefore \\boxed{B}", "(B)", 1),
    ("\\boxed{\\text{(E)}}", "E", 1),
    ("\\boxed{C}", "B", 0),
    ("", "3", 0),  # empty answer
]


@pytest.mark.parametrize(("answer", "truth", "expected"), TABLE)
def test_answer_table(answer, truth, expected):
    assert score_one(THINK + answer, truth, False, timeout_s=5.0) == expected


def test_table_is_large_and_balanced():
    assert len(TABLE) >= 40
    assert 10 <= sum(1 - e for *_, e in TABLE) <= len(TABLE) - 10


@pytest.mark.parametrize(
    ("response", "ends_with_think", "status"),
    [
        ("\\boxed{3}", True, FORMAT_ERROR),  # no </think> at all
        ("reasoning without closing \\boxed{3}", True, FORMAT_ERROR),
        ("", True, FORMAT_ERROR),  # empty response
        ("", False, FORMAT_ERROR),
        ("reasoning\n</think>\n\\boxed{3}", True, CORRECT),  # the prompt's <think> counts
        ("reasoning\n</think>\n\\boxed{3}", False, FORMAT_ERROR),  # ... but only when the prompt has it
        ("<think>r</think>\\boxed{3}", False, CORRECT),
        ("</think>\\boxed{3}<think>", False, FORMAT_ERROR),  # <think> must open before </think>
        ("r</think>\\boxed{4}</think>\\boxed{3}", True, INCORRECT),  # answer = text between 1st and 2nd </think>
        ("r</think>\\boxed{3}</think>\\boxed{4}", True, CORRECT),
        ("<think>\\boxed{3}</think>", False, INCORRECT),  # an answer only inside the thinking does not count
    ],
)
def test_think_format(response, ends_with_think, status):
    assert score_detailed(response, "3", ends_with_think, 5.0).status == status


def test_switches_and_helpers():
    assert score_one("\\boxed{3}", "3", False, 5.0, require_think_format=False) == 1.0
    assert score_one(THINK + "The answer is B.", "B", False, 5.0, allow_choice_letters=False) == 0.0
    assert split_think("a</think>b", True) == "b" and split_think("a</think>b", False) is None
    assert choice_letter(" (C) ") == "C" and choice_letter("CD") is None and choice_letter("K") is None
    with pytest.raises(TypeError):
        score_one(None, "3", True)  # type: ignore[arg-type]


ADVERSARIAL = {
    "power tower": "<think>x</think>\\boxed{10^{10^{10}}}",
    "huge factorial": "<think>x</think>\\boxed{(10^{10})!}",
    "unbalanced braces": "<think>x</think>" + "\\boxed{\\frac{1}{2" * 2000,
    "closing braces": "<think>x</think>" + "}{" * 5000 + "\\boxed{3",
    "1 MB of thinking": "<think>" + "x " * 500_000 + "</think>\\boxed{3}",
    "1 MB of latex": "<think>a</think>" + "$x^2+1$ and " * 90_000 + "\\boxed{3}",
    "1 MB answer": "<think>a</think>\\boxed{" + "1+" * 500_000 + "1}",
    "deep nesting": "<think>a</think>\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}",
    "odd unicode": "<think>ß∂ƒ˚¬…</think>\\boxed{３} 🤖 \u202e\u0000 \ud800 ﷽ \u200b",
}
# Long single C calls (one regex substitution over a huge string) cannot be interrupted by a signal in-process; the
# pool's hard deadline bounds those (tests/test_reward_pool.py). In-process we pin the Python-level ones.
INTERRUPTIBLE = ["power tower", "huge factorial", "1 MB answer", "odd unicode", "closing braces"]


@pytest.mark.parametrize("name", INTERRUPTIBLE)
def test_adversarial_inputs_finish_within_timeout_in_process(name):
    timeout = 1.0
    score_detailed("<think></think>\\boxed{1}", "1", False, None)  # warm imports outside the timing
    times = []
    for _ in range(3):  # other jobs share the 2 CPUs and can starve us: the best of 3 tries must meet the bound
        start = time.monotonic()
        result = score_detailed(ADVERSARIAL[name], "3", False, timeout)
        times.append(time.monotonic() - start)
        if times[-1] < timeout + 1.0:
            break
    assert min(times) < timeout + 1.0, f"{name}: {times}"
    assert result.status in (INCORRECT, TIMEOUT)
    if name == "power tower":
        assert (result.score, result.status) == (0.0, TIMEOUT)


def test_timer_restores_an_outer_alarm():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        score_detailed(ADVERSARIAL["power tower"], "3", False, 0.3)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


BOXED_INTEGERS = [
    "\\boxed{132}",
    "\n\\boxed{0132}\n",
    "\\boxed{-132}",
    "\\boxed{133}",
    "\\boxed{-0}",
    "\n\\boxed{132}<|im_end|>",  # responses are decoded with their end-of-turn token
    "\\boxed{133}\n<|endoftext|>",
]


@pytest.mark.parametrize("answer", BOXED_INTEGERS)
@pytest.mark.parametrize("truth", ["132", "-132", " 0 ", "0132"])
def test_boxed_integer_shortcut_agrees_with_math_verify(answer: str, truth: str) -> None:
    from math_verify import parse, verify

    expected = CORRECT if verify(parse("$" + truth + "$"), parse(answer)) else INCORRECT
    assert score_detailed("</think>" + answer, truth, True).status == expected


@pytest.mark.parametrize("answer", BOXED_INTEGERS)
def test_boxed_integer_shortcut_skips_math_verify(answer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from luffy_megatron.reward import math_reward

    def no_math_verify():
        raise AssertionError("math-verify was called")

    monkeypatch.setattr(math_reward, "load_math_verify", no_math_verify)
    assert score_detailed("</think>" + answer, "132", True).status in (CORRECT, INCORRECT)
    assert score_detailed("</think>" + answer + " or 7", "132", True).status == ERROR  # no shortcut: math-verify
