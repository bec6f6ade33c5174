"""In-training validation and ``luffy-eval`` score alike. On the demo's held-out set, with the demo's model folder,
config and tokenizer, greedy with one sample per prompt, the validation function and luffy-eval's runner give the same
records (prompt, scored text, score, status) and the same avg@1. A stand-in engine answers with known token ids (this
is about scoring, not generation): the expert trace for half the prompts, and responses that the two paths' former
decode rules scored differently. The decode rule itself is checked on a choice-letter answer too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from luffy_megatron.config import RewardConfig, load_config
from luffy_megatron.data import PromptDataset
from luffy_megatron.data.synthetic import DEFAULT_SYSTEM_PROMPT, write_task
from luffy_megatron.eval import runner
from luffy_megatron.eval.data import load_rows
from luffy_megatron.eval.score import ScoreRule, grade, score_outputs
from luffy_megatron.reward import RewardPool, score_detailed
from luffy_megatron.rollout.base import RolloutEngine, RolloutOutput
from luffy_megatron.train.validation import evaluate, val_metrics, validation_records
from tools.run_demo import CONFIG, NUM_VAL, prepare

SEED = 1  # the demo's first seed: its model, tokenizer and task


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return prepare(tmp_path_factory.mktemp("demo"), SEED)


class KnownResponses(RolloutEngine):
    """Greedy stand-in: one fixed response (ids, finish reason) per prompt, looked up by the prompt's ids; records the
    prompts it is given."""

    def __init__(self, responses: dict[tuple[int, ...], tuple[list[int], str]]) -> None:
        self.responses, self.prompts = responses, []

    def generate(self, prompts, params, counts=None):
        assert params.n == 1 and params.temperature == 0 and counts is None
        self.prompts += [tuple(p) for p in prompts]
        outs = [self.responses[tuple(p)] for p in prompts]
        return [[RolloutOutput(i, ids, [0.0] * len(ids), finish)] for i, (ids, finish) in enumerate(outs)]

    def update_weights(self, named_tensors, version):
        raise NotImplementedError

    def health(self):
        return {"ok": True}


def responses_for(items, tok) -> tuple[dict[tuple[int, ...], tuple[list[int], str]], list[float]]:
    """Per prompt a response and the score it must get: the trace (1) for every other prompt, and in turn a special
    token inside the boxed answer (0: the model did not write the sum), a special token inside the reasoning (1), a
    wrong sum (0), and the trace cut before ``</think>`` at the length limit (0)."""
    special, eos = tok.convert_tokens_to_ids("<|im_start|>"), tok.eos_token_id
    responses, expected = {}, []
    for i, it in enumerate(items):
        text = tok.decode(it.trace_ids[:-1])  # the trace without its EOS
        box = text.index("\\boxed{") + len("\\boxed{")
        kind = "trace" if i % 2 == 0 else ("answer_split", "reasoning_split", "wrong", "cut")[i // 2 % 4]
        if kind == "trace":
            ids, finish, score = list(it.trace_ids), "stop", 1.0
        elif kind in ("answer_split", "reasoning_split"):
            at = box + 1 if kind == "answer_split" else text.index(";") + 1
            before, after = (tok.encode(part, add_special_tokens=False) for part in (text[:at], text[at:]))
            ids, finish, score = [*before, special, *after, eos], "stop", float(kind == "reasoning_split")
        elif kind == "wrong":
            wrong = f"{text[:box]}{int(it.ground_truth) + 1}}}"
            ids, finish, score = tok.encode(wrong, add_special_tokens=False) + [eos], "stop", 0.0
        else:
            ids, finish, score = list(it.trace_ids[:6]), "length", 0.0
        responses[tuple(it.prompt_ids)] = (ids, finish)
        expected.append(score)
    return responses, expected


def old_rule_scores(tok, items, responses, skip_special_tokens: bool) -> list[float]:
    """Scores under a former decode rule: validation kept every special token, luffy-eval dropped them all."""
    ids = [responses[tuple(it.prompt_ids)][0] for it in items]
    texts = tok.batch_decode(ids, skip_special_tokens=skip_special_tokens)
    return [score_detailed(t, it.ground_truth, it.prompt_ends_with_think, None).score for t, it in zip(texts, items)]


@pytest.mark.parametrize("system_prompt", ["remove", "keep"])
def test_validation_and_luffy_eval_give_the_same_records_and_avg1(demo, tmp_path, monkeypatch, system_prompt):
    model_dir, task_dir = demo
    if system_prompt == "keep":  # the same problems with the task's system message, kept by training's data loader
        write_task(tmp_path / "task", num_train=9000, num_val=NUM_VAL, seed=SEED, system_prompt=DEFAULT_SYSTEM_PROMPT)
        task_dir = tmp_path / "task"
    overrides = [f"model.hf_path={model_dir}", f"data.train_files=[{task_dir / 'train.parquet'}]"]
    overrides += [f"data.val_files=[{task_dir / 'val.parquet'}]", f"data.system_prompt={system_prompt}"]
    overrides += ["data.max_prompt_length=512"] if system_prompt == "keep" else []  # the message is ~90 tokens
    cfg = load_config(CONFIG, overrides)
    assert (cfg.trainer.val_n, cfg.trainer.val_temperature, cfg.trainer.val_max_prompts) == (1, 0.0, 128)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dataset = PromptDataset(cfg.data, cfg.data.val_files, tok)
    items = dataset.get_batch(list(range(cfg.trainer.val_max_prompts)))
    responses, expected = responses_for(items, tok)
    avg = sum(expected) / len(expected)
    assert 0 < avg < 1

    engine = KnownResponses(responses)
    with RewardPool(cfg.reward, hard_margin_s=cfg.reward.hard_margin_s) as pool:
        val_records = validation_records(cfg, engine, pool, tok, dataset)
        metrics = evaluate(cfg, engine, pool, tok, dataset)
    assert metrics == val_metrics(val_records, 1) == {"val/synthetic_add/avg@1": avg, "val/all/avg@1": avg}
    assert [r["score"] for r in val_records] == expected

    monkeypatch.setattr(runner, "build_engine", lambda opts, path: engine)
    engine.prompts = []
    out = tmp_path / "eval"
    res = runner.run_eval(runner.validation_options(cfg, str(model_dir), str(out)), progress=False)
    assert engine.prompts == [tuple(it.prompt_ids) for it in items]  # the prompts validation sampled, in its order
    assert res["sources"]["synthetic_add"]["avg@k"] == avg
    assert (res["sources"]["synthetic_add"]["k"], res["sources"]["synthetic_add"]["problems"]) == (1, len(items))
    eval_records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    keys = ("problem_id", "response", "score", "status", "finish_reason", "response_tokens")
    assert [[r[k] for k in keys] for r in eval_records] == [[r[k] for k in keys] for r in val_records]

    # The former rules disagreed: luffy-eval dropped the special token inside the boxed answer and credited it.
    old_val = old_rule_scores(tok, items, responses, skip_special_tokens=False)
    old_eval = old_rule_scores(tok, items, responses, skip_special_tokens=True)
    assert old_val == expected
    assert [i for i, (a, b) in enumerate(zip(old_val, old_eval)) if a != b] == list(range(1, len(items), 8))
    if system_prompt == "keep":  # and luffy-eval removed the system message that validation kept
        rows = load_rows(cfg.data.val_files, tok, limit_per_source=1)
        assert rows[0].prompt_ids != items[0].prompt_ids


@dataclass(frozen=True)
class Row:
    data_source: str
    prompt_ids: list[int]
    ground_truth: str
    prompt_ends_with_think: bool


def test_the_stop_token_is_not_scored_and_other_special_tokens_are(demo):
    """A choice letter followed by the end-of-turn token: the training reward's text (every special token kept)
    misses the letter; the scored text drops the token that stopped the response, and only that one."""
    tok = AutoTokenizer.from_pretrained(demo[0])
    row = Row("gpqa", [1, 2], "C", True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    body = tok.encode("x</think> ANSWER: C", add_special_tokens=False)
    outs = [
        RolloutOutput(0, [*body, eos], [], "stop"),
        RolloutOutput(0, [*body, pad], [], "stop", 1),  # the pad token stops the demo's engine too
        RolloutOutput(0, [*body, eos, eos], [], "length", 2),  # not stopped: every token is scored
        RolloutOutput(0, [*body[:-1], pad, body[-1], eos], [], "stop", 3),
    ]
    recs = score_outputs([row], [outs], tok, ScoreRule("required"))
    assert [r["response"] for r in recs][:2] == ["x</think> ANSWER: C"] * 2
    assert [r["score"] for r in recs] == [1.0, 1.0, 0.0, 0.0]
    assert score_detailed(tok.decode([*body, eos]), "C", True, None).score == 0.0  # the reward's own text


def test_a_pool_grades_only_by_its_own_rule():
    pool = SimpleNamespace(config=RewardConfig(require_think_format=False, timeout_s=1.0))
    with pytest.raises(ValueError, match="grades by"):
        grade(["x"], [Row("s", [1], "1", True)], ScoreRule("required", timeout_s=1.0), pool)  # type: ignore[arg-type]


def test_training_rewards_score_the_same_text(demo):
    """The trainer's reward gets the scored text too: a trace or rollout that stopped on the end-of-turn token is
    graded without it."""
    from luffy_megatron.reward import RewardMemo
    from luffy_megatron.train.producer import score_samples
    from luffy_megatron.train.samples import Sample

    tok = AutoTokenizer.from_pretrained(demo[0])
    body = tok.encode("x</think> ANSWER: C", add_special_tokens=False)
    samples = [Sample(0, 0, [1, 2], [*body, tok.eos_token_id], False, "stop"), Sample(0, 0, [1, 2], body, True)]
    graded: list[str] = []
    rewards = SimpleNamespace(score=lambda texts, gts, ends: graded.extend(texts) or [1.0] * len(texts))
    run = SimpleNamespace(tokenizer=tok, reward_memo=RewardMemo(), rewards=rewards)
    assert score_samples(run, samples, [Row("gpqa", [1, 2], "C", True)]) == [1.0, 1.0]
    assert graded == ["x</think> ANSWER: C"]  # both samples have this text: graded once (memoised)
