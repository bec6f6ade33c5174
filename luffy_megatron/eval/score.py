"""The one scoring definition of ``luffy-eval`` and of in-training validation (``val/*``): sampled token ids and their
prompt in, one record per sample out (score, status, the scored text), from which :func:`metrics.summarise` computes
avg@k and pass@k.

* Text: a response's token ids decoded as generated, special tokens included, without the special token that stopped
  it (:func:`response_texts`). What the model wrote is scored; the end-of-turn marker is not part of the answer.
* Grade: the training reward (:func:`luffy_megatron.reward.score_detailed`: math-verify, plus choice letters for a
  ground truth A-J) under a :class:`ScoreRule`, in this process or in a :class:`~luffy_megatron.reward.RewardPool`.

``think_format``: ``paper`` follows the released evaluation script (the response must close ``</think>`` and is
scored after it only when the rendered prompt ends with ``<think>``; otherwise the whole response is scored),
``required`` is the training reward's check (``<think>...</think>`` always), ``off`` scores the whole response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from luffy_megatron.eval.metrics import problem_id
from luffy_megatron.reward.math_reward import (
    CHOICE_LETTERS,
    ItemTimeout,
    RewardResult,
    choice_letter,
    load_math_verify,
    score_detailed,
    split_think,
    time_limit,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from luffy_megatron.config import RewardConfig
    from luffy_megatron.reward.pool import RewardPool
    from luffy_megatron.rollout.base import RolloutOutput

THINK_FORMATS = ("paper", "required", "off")
# Part of luffy-eval's settings: raised whenever a sample's score can change, so that a rerun into a folder scored
# under an older definition is refused instead of mixing the two.
SCORING_VERSION = 2


@dataclass(frozen=True)
class ScoreRule:
    """How a response is graded: the think-format check (one of :data:`THINK_FORMATS`), choice letters for ground
    truths A-J, and the per-sample budget in seconds (None: no limit)."""

    think_format: str = "paper"
    choice_letters: bool = True
    timeout_s: float | None = 5.0

    def __post_init__(self) -> None:
        if self.think_format not in THINK_FORMATS:
            raise ValueError(f"think_format {self.think_format!r} is not one of {list(THINK_FORMATS)}")

    @classmethod
    def of_reward(cls, reward: RewardConfig) -> ScoreRule:
        """The training reward's check (validation's rule): ``required`` when ``reward.require_think_format``,
        else ``off``; the reward's choice-letter mode and budget."""
        think = "required" if reward.require_think_format else "off"
        return cls(think, reward.allow_choice_letters, float(reward.timeout_s))

    def requires_think(self, prompt_ends_with_think: bool) -> bool:
        """Whether a response to such a prompt must have the think block."""
        return self.think_format == "required" or (self.think_format == "paper" and prompt_ends_with_think)


class Scorable(Protocol):
    """What scoring reads of a prompt: a dataset's :class:`~luffy_megatron.data.PromptItem` or an eval row."""

    @property
    def data_source(self) -> str: ...

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def ground_truth(self) -> str: ...

    @property
    def prompt_ends_with_think(self) -> bool: ...


def response_texts(
    tokenizer: PreTrainedTokenizerBase, responses: Sequence[list[int]], finish_reasons: Sequence[str]
) -> list[str]:
    """The scored text of each response (training rewards, validation and ``luffy-eval`` alike): its ids decoded with
    special tokens kept, less the last id when the response stopped on it (``finish_reason == "stop"``, where engines
    return the stop token last) and it is a special token."""
    special = set(tokenizer.all_special_ids)
    ids = [r[:-1] if reason == "stop" and r and r[-1] in special else r for r, reason in zip(responses, finish_reasons)]
    return tokenizer.batch_decode(ids, skip_special_tokens=False)


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


def grade(texts: list[str], items: Sequence[Scorable], rule: ScoreRule, pool: RewardPool | None) -> list[RewardResult]:
    """The verifier's result for each text (``texts[i]`` answers ``items[i]``): in this process (main thread: the
    budget is a signal timer), or in ``pool``, whose reward settings must be ``rule``."""
    if pool is None:
        return [
            score_detailed(
                text,
                it.ground_truth,
                it.prompt_ends_with_think,
                rule.timeout_s,
                rule.requires_think(it.prompt_ends_with_think),
                rule.choice_letters,
            )
            for text, it in zip(texts, items, strict=True)
        ]
    if ScoreRule.of_reward(pool.config) != rule:
        raise ValueError(f"the reward pool grades by {ScoreRule.of_reward(pool.config)}, not by {rule}")
    return pool.score_detailed(texts, [it.ground_truth for it in items], [it.prompt_ends_with_think for it in items])


def score_outputs(
    items: Sequence[Scorable],
    outputs: Sequence[Sequence[RolloutOutput]],
    tokenizer: PreTrainedTokenizerBase,
    rule: ScoreRule,
    pool: RewardPool | None = None,
    extract: bool = False,
) -> list[dict]:
    """One record per response, prompts in order and each prompt's samples in order (``outputs[i]`` answer
    ``items[i]``): ``data_source``, ``problem_id``, ``sample``, ``response`` (the scored text), ``ground_truth``,
    ``score``, ``status``, ``finish_reason``, ``response_tokens``, and with ``extract`` the extracted answer."""
    flat = [(it, o) for it, outs in zip(items, outputs, strict=True) for o in outs]
    texts = response_texts(tokenizer, [o.output_ids for _, o in flat], [o.finish_reason for _, o in flat])
    results = grade(texts, [it for it, _ in flat], rule, pool)
    records = []
    for (it, o), text, res in zip(flat, texts, results):
        rec = {
            "data_source": it.data_source,
            "problem_id": problem_id(it.data_source, it.prompt_ids, it.ground_truth),
            "sample": o.sample_index,
            "response": text,
            "ground_truth": it.ground_truth,
            "score": res.score,
            "status": res.status,
            "finish_reason": o.finish_reason,
            "response_tokens": len(o.output_ids),
        }
        if extract:
            answer = (
                split_think(text, it.prompt_ends_with_think) if rule.requires_think(it.prompt_ends_with_think) else text
            )
            rec["extracted"] = extract_answer(answer, it.ground_truth, rule.timeout_s)
        records.append(rec)
    return records
