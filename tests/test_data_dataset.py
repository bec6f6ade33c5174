"""PromptDataset: the paper's tokenisation rules on real eval rows (tests/fixtures/eval_small.parquet: 3 rows per data
source of the LUFFY eval set; the whole set when present, tier ``eval-data``) and on synthetic rows with traces, bad
inputs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luffy_megatron.config import DataConfig
from luffy_megatron.data import DataError, PromptDataset, PromptSampler
from luffy_megatron.data.dataset import apply_system_prompt, get_path, strip_think_prefix
from luffy_megatron.data.synthetic import generate, write_parquet, write_task
from luffy_megatron.reward import score_one
from tests.test_data_fixtures import toy_tokenizer
from tests.tiers import EVAL_SMALL, require_eval_parquet


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(True)


@pytest.fixture(scope="module")
def eval_rows() -> list[dict]:
    return pq.read_table(EVAL_SMALL).to_pylist()


@pytest.fixture(scope="module")
def eval_head() -> Path:
    """Real eval rows: 3 per data source (aime, aime25, amc, math, minerva, olympiad_bench)."""
    return EVAL_SMALL


def _render(tok, messages) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_whole_eval_parquet_loads_without_targets(tok):
    cfg = DataConfig(max_prompt_length=100_000)
    ds = PromptDataset(cfg, [str(require_eval_parquet())], tok, progress=False)
    assert len(ds) == ds.counts.rows_read == 6023
    assert ds.counts.with_trace == 0 and all(it.trace_ids is None for it in ds.items)
    assert {it.data_source for it in ds.items} == {"aime", "aime25", "amc", "math", "minerva", "olympiad_bench"}
    assert all(it.prompt_ends_with_think for it in ds.items)
    assert [it.index for it in ds.items] == list(range(6023))


def test_eval_rows_follow_the_paper_prompt_rules(tok, eval_head, eval_rows):
    ds = PromptDataset(DataConfig(max_prompt_length=100_000), [str(eval_head)], tok, progress=False)
    assert len(ds) == len(eval_rows)
    for item, row in zip(ds.items[:50], eval_rows):
        text = _render(tok, row["prompt"])  # system + user kept, generation prompt added
        assert item.prompt_ids == tok.encode(text, add_special_tokens=False)
        assert text.endswith("<|im_start|>assistant\n<think>\n")
        assert item.ground_truth == row["reward_model"]["ground_truth"]
        assert item.data_source == row["data_source"]
        assert item.extra_info == row["extra_info"]
        assert (item.source, item.row) == (str(eval_head), ds.items.index(item))


def test_long_prompts_are_dropped_and_counted(tok, eval_head, eval_rows):
    lengths = [len(tok.encode(_render(tok, r["prompt"]), add_special_tokens=False)) for r in eval_rows]
    limit = sorted(lengths)[len(lengths) // 2]
    ds = PromptDataset(DataConfig(max_prompt_length=limit), [str(eval_head)], tok, progress=False)
    assert ds.num_dropped_long_prompts == sum(n > limit for n in lengths) > 0
    assert len(ds) == sum(n <= limit for n in lengths)
    assert max(len(it.prompt_ids) for it in ds.items) <= limit


def test_system_prompt_keep_replace_remove(tok, eval_head, eval_rows):
    row = eval_rows[0]
    user = [m for m in row["prompt"] if m["role"] == "user"]
    expected = {
        "keep": row["prompt"],
        "remove": user,
        "replace": [{"role": "system", "content": "Be brief."}, *user],
    }
    for mode, messages in expected.items():
        cfg = DataConfig(max_prompt_length=100_000, system_prompt=mode, system_prompt_text="Be brief.")
        ds = PromptDataset(cfg, [str(eval_head)], tok, progress=False)
        assert ds[0].prompt_ids == tok.encode(_render(tok, messages), add_special_tokens=False), mode
    with pytest.raises(ValueError, match="system_prompt"):
        apply_system_prompt(user, "drop", None)


def test_traces_strip_think_and_end_with_eos(tok, tmp_path):
    train, _ = write_task(tmp_path, 40, 5, seed=1)
    ds = PromptDataset(DataConfig(), [str(train)], tok, progress=False)
    rows = pq.read_table(train).to_pylist()
    eos = tok.eos_token_id
    for item, row in zip(ds.items, rows):
        trace = row["target"][0]["content"]
        assert trace.startswith("<think>\n") and item.prompt_ends_with_think
        assert item.trace_ids == tok.encode(trace[len("<think>\n") :], add_special_tokens=False) + [eos]
        # the trace after the prompt reads exactly like a model response with the prompt's <think>
        assert tok.decode(item.prompt_ids + item.trace_ids).endswith(trace + "<|im_end|>")
        assert score_one(tok.decode(item.trace_ids), item.ground_truth, True, timeout_s=None) == 1.0


def test_think_prefix_kept_when_prompt_lacks_it(tmp_path):
    tok = toy_tokenizer(False)
    train, _ = write_task(tmp_path, 5, 1, seed=2)
    ds = PromptDataset(DataConfig(), [str(train)], tok, progress=False)
    trace = pq.read_table(train).to_pylist()[0]["target"][0]["content"]
    assert not ds[0].prompt_ends_with_think
    assert ds[0].trace_ids == tok.encode(trace, add_special_tokens=False) + [tok.eos_token_id]
    assert strip_think_prefix("<think>\nx", "...<think>\n") == "x"
    assert strip_think_prefix("x", "...<think>\n") == "x"


def test_trace_truncation_keeps_eos_within_limit(tok, tmp_path):
    train, _ = write_task(tmp_path, 10, 1, seed=3)
    full = PromptDataset(DataConfig(), [str(train)], tok, progress=False)
    n = min(len(it.trace_ids) for it in full.items)
    cut = PromptDataset(DataConfig(max_response_length=n - 2), [str(train)], tok, progress=False)
    assert cut.num_truncated_traces == 10
    for a, b in zip(full.items, cut.items):
        assert len(b.trace_ids) == n - 2 and b.trace_ids[-1] == tok.eos_token_id and b.trace_truncated
        assert b.trace_ids[:-1] == a.trace_ids[: n - 3]
    exact = PromptDataset(DataConfig(max_response_length=n), [str(train)], tok, progress=False)
    assert exact.items[[len(it.trace_ids) for it in full.items].index(n)].trace_truncated is False


def test_target_formats_and_missing_targets(tok, tmp_path):
    base = {"data_source": "s", "prompt": [{"role": "user", "content": "1+1="}], "reward_model": {"ground_truth": "2"}}
    trace = "<think>\na\n</think>\n\\boxed{2}"
    # paper format (list of assistant messages), no trace (None or []): one file; a plain string trace: another
    lists = _write(
        tmp_path,
        [dict(base, target=[{"role": "assistant", "content": trace}]), dict(base, target=None), dict(base, target=[])],
        "lists.parquet",
    )
    strings = _write(tmp_path, [dict(base, target=trace)], "str.parquet")
    ds = PromptDataset(DataConfig(), [lists, strings], tok, progress=False)
    assert [it.trace_ids is not None for it in ds.items] == [True, False, False, True]
    assert ds.items[0].trace_ids == ds.items[3].trace_ids
    assert ds.counts.with_trace == 2
    no_column = PromptDataset(DataConfig(), [_write(tmp_path, [base], "nt.parquet")], tok, progress=False)
    assert no_column[0].trace_ids is None


def test_globs_hf_folders_and_dotted_keys(tok, tmp_path):
    import datasets

    train, val = generate(6, 4, seed=4)
    write_parquet(train, tmp_path / "a" / "part-0.parquet")
    write_parquet(val, tmp_path / "a" / "part-1.parquet")
    ds = PromptDataset(DataConfig(), [str(tmp_path / "a" / "*.parquet")], tok, progress=False)
    assert len(ds) == 10
    folder = PromptDataset(DataConfig(), [str(tmp_path / "a")], tok, progress=False)  # datasets.load_dataset(dir)
    assert sorted(it.ground_truth for it in folder.items) == sorted(it.ground_truth for it in ds.items)
    renamed = [
        {
            "q": r["prompt"],
            "expert": r["target"],
            "meta": {"answer": r["reward_model"]["ground_truth"]},
            "src": r["data_source"],
        }
        for r in train
    ]
    datasets.Dataset.from_list(renamed).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(prompt_key="q", target_key="expert", ground_truth_key="meta.answer", data_source_key="src")
    hf = PromptDataset(cfg, [str(tmp_path / "hf")], tok, progress=False)
    assert [it.prompt_ids for it in hf.items] == [it.prompt_ids for it in ds.items[:6]]
    assert [it.trace_ids for it in hf.items] == [it.trace_ids for it in ds.items[:6]]
    assert get_path({"a": {"b": 1}}, "a.b") == (True, 1) and get_path({"a": None}, "a.b") == (False, None)
    with pytest.raises(DataError, match="matches no file"):
        PromptDataset(DataConfig(), [str(tmp_path / "none-*.parquet")], tok)


def _write(tmp_path: Path, rows: list[dict], name: str = "bad.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


GOOD = {
    "data_source": "s",
    "prompt": [{"role": "user", "content": "1+1="}],
    "target": [{"role": "assistant", "content": "<think>\n</think>\n\\boxed{2}"}],
    "reward_model": {"ground_truth": "2"},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": [{"role": "user", "content": ""}]}, r"row 1, column 'prompt': the prompt has no non-empty user"),
        ({"prompt": [{"role": "user", "content": "  "}]}, r"row 1, column 'prompt'"),
        ({"prompt": [{"role": "wizard", "content": "x"}]}, r"row 1, column 'prompt': message 0 has role 'wizard'"),
        ({"prompt": None}, r"row 1, column 'prompt': the prompt is missing"),
        ({"reward_model": {"ground_truth": ""}}, r"row 1, column 'reward_model.ground_truth': the value is empty"),
        ({"reward_model": {"ground_truth": None}}, r"row 1, column 'reward_model.ground_truth'"),
        ({"reward_model": None}, r"row 1, column 'reward_model.ground_truth': the ground truth is missing"),
        ({"data_source": None}, r"row 1, column 'data_source'"),
        ({"target": [{"role": "assistant", "content": ""}]}, r"row 1, column 'target': the trace is empty"),
        ({"target": [{"role": "user", "content": "x"}]}, r"row 1, column 'target': the trace message has role"),
    ],
)
def test_bad_rows_name_file_row_and_column(tok, tmp_path, change, message):
    path = _write(tmp_path, [GOOD, {**GOOD, **change}, GOOD])
    with pytest.raises(DataError, match=message) as err:
        PromptDataset(DataConfig(), [path], tok)
    assert path in str(err.value)


def test_wrong_types_missing_columns_and_unreadable_files(tok, tmp_path, caplog):
    path = _write(tmp_path, [{**GOOD, "reward_model": {"ground_truth": 2.5}}])  # a parquet column has one type
    with pytest.raises(DataError, match=r"row 0, column 'reward_model.ground_truth': expected a string, got float"):
        PromptDataset(DataConfig(), [path], tok)
    path = _write(tmp_path, [{k: v for k, v in GOOD.items() if k != "data_source"}], "nosrc.parquet")
    with pytest.raises(DataError, match=r"nosrc.parquet: missing column 'data_source'"):
        PromptDataset(DataConfig(), [path], tok)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=r"junk.parquet: cannot read parquet file"):
        PromptDataset(DataConfig(), [str(junk)], tok)
    with pytest.raises(DataError, match="no such file"):
        PromptDataset(DataConfig(), [str(tmp_path / "missing" / "x.parquet")], tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        PromptDataset(DataConfig(), [str(tmp_path / "x.csv")], tok)


def test_skip_bad_rows_counts_and_logs(tok, tmp_path, caplog):
    bad = [{**GOOD, "prompt": [{"role": "user", "content": ""}]}, {**GOOD, "reward_model": {"ground_truth": ""}}]
    path = _write(tmp_path, [GOOD, *bad, GOOD])
    with caplog.at_level(logging.WARNING):
        ds = PromptDataset(DataConfig(skip_bad_rows=True), [path], tok)
    assert len(ds) == 2 and ds.num_skipped_bad_rows == 2
    assert [it.row for it in ds.items] == [0, 3]
    assert "skipped 2 bad rows" in caplog.text and "row 1" in caplog.text
    all_bad = _write(tmp_path, bad, "allbad.parquet")
    with pytest.raises(DataError, match="no usable rows"):
        PromptDataset(DataConfig(skip_bad_rows=True), [all_bad], tok)


def test_synthetic_task_is_disjoint_and_deterministic(tmp_path):
    train, val = generate(300, 100, seed=7)
    key = lambda r: r["prompt"][-1]["content"]  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    assert len({key(r) for r in train}) == 300
    assert generate(300, 100, seed=7) == (train, val) and generate(300, 100, seed=8)[0] != train
    r = train[0]
    a, b = (int(x) for x in key(r).rstrip("=").split("+"))
    assert r["reward_model"]["ground_truth"] == str(a + b) and r["data_source"] == "synthetic_add"
    from luffy_megatron.data.synthetic import expert_trace, problem_text

    assert problem_text(47, 85, 2) == "47+85="
    assert expert_trace(47, 85, 2) == "<think>\n7+5=12;4+8+1=13\n</think>\n\\boxed{132}"
    assert expert_trace(5, 7, 2) == "<think>\n5+7=12;0+0+1=1\n</think>\n\\boxed{12}"
    assert problem_text(5, 7, 3) == "005+007="
    for row in train[:30]:
        assert score_one(row["target"][0]["content"], row["reward_model"]["ground_truth"], False, None) == 1.0
    with pytest.raises(ValueError, match="exceed"):
        generate(90, 20, digits=1)
    assert dataclasses.is_dataclass(PromptSampler(10, 2, 0).__next__())


def test_make_synthetic_task_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mst", Path(__file__).resolve().parents[1] / "tools/make_synthetic_task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path / "t"), "--num-train", "20", "--num-val", "5", "--seed", "3", "--digits", "3"])
    train = pq.read_table(tmp_path / "t" / "train.parquet")
    val = pq.read_table(tmp_path / "t" / "val.parquet")
    assert train.num_rows == 20 and val.num_rows == 5 and train.schema == val.schema
    assert "047+085=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--out", str(tmp_path / "u"), "--num-train", "100", "--num-val", "1", "--digits", "1"])
