"""luffy-eval: pass@k against brute force, the tables, scoring with a scripted engine (incl. choice letters), the
in-process engine end to end with a kill and resume, on-the-fly Megatron conversion, one-line input errors, and the
sglang backend on real SGLang CPU servers it launches (with and without sglang-router) matching the hf backend."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from luffy_megatron.eval import cli, runner
from luffy_megatron.eval.metrics import pass_at_k, render_tables, summarise
from luffy_megatron.models.tiny import make_tiny_model
from luffy_megatron.rollout.base import RolloutEngine, RolloutOutput
from tools import run_demo

FIXTURE = Path(__file__).parent / "fixtures" / "eval_mixed_small.parquet"
DEMO_MODEL = run_demo.MODEL  # the demo's model shape; random weights here


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", seed=1, **DEMO_MODEL)


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_summarise_avg_and_pass_per_source():
    recs = []
    for pid, scores in {"p1": [1, 0, 0, 0], "p2": [1, 1, 1, 1]}.items():
        recs += [dict(data_source="aime", problem_id=pid, score=s, status="x") for s in scores]
    recs += [dict(data_source="math", problem_id="q", score=0, status="y")]
    res = summarise(recs)
    assert res["aime"]["k"] == 4 and res["aime"]["problems"] == 2
    assert res["aime"]["avg@k"] == pytest.approx((0.25 + 1.0) / 2)
    assert res["aime"]["pass@k"]["1"] == pytest.approx((0.25 + 1.0) / 2)
    assert res["aime"]["pass@k"]["2"] == pytest.approx((0.5 + 1.0) / 2)  # 1 - C(3,2)/C(4,2) = 0.5
    assert res["aime"]["pass@k"]["4"] == 1.0
    assert res["math"] == {"problems": 1, "samples": 1, "k": 1, "avg@k": 0.0, "pass@k": {"1": 0.0}, "status": {"y": 1}}
    table = render_tables([("a", res), ("b", {"aime": res["aime"]})])
    assert "| Model | AIME 2024 (avg@4) | MATH-500 (avg@1) | Avg. |" in table
    assert "| a | 62.5 | 0.0 | 31.2 |" in table and "| b | 62.5 | - | - |" in table


class ScriptedEngine(RolloutEngine):
    """Answers each prompt with the scripted text for its sample index (cycled); records the prompts it saw."""

    def __init__(self, tokenizer, script: dict[str, list[str]], prompt_to_truth: dict[tuple, str]) -> None:
        self.tok, self.script, self.truth, self.calls = tokenizer, script, prompt_to_truth, 0

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for i, p in enumerate(prompts):
            texts = self.script.get(self.truth[tuple(p)], ["no answer"])
            ids = [self.tok.encode(texts[j % len(texts)], add_special_tokens=False) for j in range(params.n)]
            out.append([RolloutOutput(i, x, [0.0] * len(x), "stop", j) for j, x in enumerate(ids)])
        return out

    def update_weights(self, named_tensors, version):
        raise NotImplementedError

    def health(self):
        return {"ok": True}


def test_scores_with_scripted_answers_incl_choice_letters(model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from luffy_megatron.eval.data import load_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_rows([str(FIXTURE)], tok)
    truth = {tuple(r.prompt_ids): r.ground_truth for r in rows}
    script = {
        "204": ["<think>ok</think> \\boxed{204}", "<think>no</think> \\boxed{5}"],  # aime problem 1: half right
        "025": ["<think>ok</think> \\boxed{25}"],  # math-verify: 025 == 25
        "\\frac{14}{3}": ["so</think> \\boxed{\\frac{28}{6}}"],  # math: equivalent fraction
        "C": ["<think>hmm</think> ANSWER: C", "</think> The answer is (B)"],  # arc_c letter, right then wrong
        "A": ["x</think> final answer: \\boxed{(A)}"],  # gpqa letter in a box
    }
    engine = ScriptedEngine(tok, script, truth)
    monkeypatch.setattr(runner, "build_engine", lambda opts, path: engine)
    out = tmp_path / "run"
    assert cli.main(["--model", str(model_dir), "--data", str(FIXTURE), "--out", str(out), "--n", "2", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())["sources"]
    assert res["aime"]["problems"] == 2 and res["aime"]["k"] == 6  # 3 copies x n=2
    assert res["aime"]["avg@k"] == pytest.approx((0.5 + 1.0) / 2)
    assert res["aime"]["pass@k"]["6"] == 1.0
    assert res["math"]["avg@k"] == pytest.approx(1 / 3)  # one of three problems answered
    assert res["arc_c"]["avg@k"] == pytest.approx(0.25)  # "C" row: 1 of 2; "B" row: "no answer"
    assert res["gpqa"]["avg@k"] == 1.0 and res["gpqa"]["pass@k"]["1"] == 1.0
    assert res["amc"]["avg@k"] == 0.0 and res["amc"]["status"] == {"format_error": 4}  # no </think>
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 42
    first = next(r for r in recs if r["ground_truth"] == "204" and r["sample"] == 0)
    assert first["extracted"] == "204" and first["status"] == "correct" and first["score"] == 1.0
    # --unique: one row per problem; the aime problems then have n samples each.
    out2 = tmp_path / "unique"
    argv = ["--model", str(model_dir), "--data", str(FIXTURE), "--out", str(out2), "--unique", "--n", "4", "--quiet"]
    assert cli.main(argv) == 0
    res2 = json.loads((out2 / "results.json").read_text())["sources"]
    assert res2["aime"]["k"] == 4 and res2["aime"]["samples"] == 8
    assert res2["aime"]["avg@k"] == pytest.approx(0.75)


EVAL_ARGS = ["--n", "2", "--max-new-tokens", "24", "--chunk-size", "3", "--quiet", "--seed", "7"]

KILLER = """
import os, signal, sys
from luffy_megatron.eval import cli, store
orig, calls = store.SampleStore.append, []
def append(self, recs):
    orig(self, recs)
    calls.append(len(recs))
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
store.SampleStore.append = append
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_in_process_engine_end_to_end_kill_and_resume(model_dir, tmp_path, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    base = ["--model", str(model_dir), "--data", str(FIXTURE)]
    assert cli.main([*base, "--out", str(full), *EVAL_ARGS]) == 0
    proc = subprocess.run([sys.executable, "-c", KILLER, *base, "--out", str(resumed), *EVAL_ARGS], timeout=300)
    assert proc.returncode == -signal.SIGKILL
    lines = (resumed / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 3 * 2  # three chunks of 3 rows x 2 samples were on disk
    with open(resumed / "samples.jsonl", "a") as f:
        f.write('{"row_id": "torn')  # a write cut short by the kill
    assert not (resumed / "results.md").exists()
    assert cli.main([*base, "--out", str(resumed), *EVAL_ARGS]) == 0
    res = json.loads((resumed / "results.json").read_text())
    assert res["generated_this_run"] == 42 - 18
    assert (resumed / "results.md").read_text() == (full / "results.md").read_text()
    key = lambda r: (r["row_id"], r["sample"])  # noqa: E731
    a = sorted((json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()), key=key)
    b = sorted((json.loads(x) for x in (resumed / "samples.jsonl").read_text().splitlines()), key=key)
    assert a == b and len(a) == 42
    assert len({r["response"] for r in a}) > 30  # real sampling: the responses differ
    # A third run scores nothing new and prints the same table.
    assert cli.main([*base, "--out", str(resumed), *EVAL_ARGS]) == 0
    assert json.loads((resumed / "results.json").read_text())["generated_this_run"] == 0
    assert (resumed / "results.md").read_text() in capsys.readouterr().out
    # --compare puts both runs in one table.
    capsys.readouterr()
    assert cli.main(["--compare", str(full), str(resumed)]) == 0
    table = capsys.readouterr().out
    # 4 tables (math/OOD x avg/pass), one row per run; both runs are of one model folder
    assert table.count("| tiny (full) |") == 4 and table.count("| tiny (resumed) |") == 4


@pytest.mark.slow
def test_megatron_checkpoint_is_converted_on_the_fly(model_dir, tmp_path):
    ckpt, hf_out, mg_out = tmp_path / "mcore", tmp_path / "hf", tmp_path / "mg"
    code = "import sys; from luffy_megatron.convert import convert_hf_to_megatron as c; c(sys.argv[1], sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(ckpt)], check=True, timeout=300)
    args = ["--data", str(FIXTURE), "--sources", "gpqa", "math", *EVAL_ARGS]
    assert cli.main(["--model", str(model_dir), "--out", str(hf_out), *args]) == 0
    cmd = [sys.executable, "-m", "luffy_megatron.eval.cli", "--model", str(ckpt), "--out", str(mg_out), *args]
    subprocess.run(cmd, check=True, timeout=300)
    assert (mg_out / "hf_model" / "config.json").is_file()
    assert (mg_out / "samples.jsonl").read_text() == (hf_out / "samples.jsonl").read_text()


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _error(argv: list[str], capsys) -> str:
    assert cli.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_error_line(model_dir, tmp_path, capsys):
    rows = pq.read_table(FIXTURE).to_pylist()
    out = ["--out", str(tmp_path / "o")]
    model = ["--model", str(model_dir)]
    no_truth = [{k: v for k, v in r.items() if k != "reward_model"} for r in rows]
    no_truth = _write(tmp_path / "no_truth.parquet", no_truth)
    assert "missing column(s) ['reward_model.ground_truth']" in _error([*model, "--data", str(no_truth), *out], capsys)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(FIXTURE).slice(0, 0), empty)
    assert f"{empty}: the file has no rows" in _error([*model, "--data", str(empty), *out], capsys)
    err = _error([*model, "--data", str(FIXTURE), "--sources", "aime", "aime24", *out], capsys)
    assert "unknown data source(s) ['aime24']" in err and "'olympiad_bench'" in err
    assert "no such file" in _error([*model, "--data", str(tmp_path / "nope.parquet"), *out], capsys)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    assert "cannot read parquet file" in _error([*model, "--data", str(not_parquet), *out], capsys)
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    err = _error(["--model", str(bad_model), "--data", str(FIXTURE), *out], capsys)
    assert "neither an HF model folder" in err
    (bad_model / "config.json").write_text("{not json")
    assert "cannot load the tokenizer" in _error(["--model", str(bad_model), "--data", str(FIXTURE), *out], capsys)
    assert "--n: invalid value 0" in _error([*model, "--data", str(FIXTURE), *out, "--n", "0"], capsys)
    err = _error([*model, "--data", str(FIXTURE), *out, "--system-prompt-text", "Be brief."], capsys)
    assert "--system-prompt-text goes with --system-prompt replace" in err
    assert "goes with" in _error([*model, "--data", str(FIXTURE), *out, "--system-prompt", "replace"], capsys)
    assert "--compare" in _error(["--compare", str(tmp_path)], capsys)
    sglang = [*model, "--data", str(FIXTURE), *out, "--backend", "sglang", "--sglang-launch", "--sglang-set"]
    assert "Key 'devce' not in 'SGLangConfig'" in _error([*sglang, "device=cpu", "devce=cpu"], capsys)
    assert "rollout.sglang.device: 'gpu' is not one of" in _error([*sglang, "rollout.sglang.device=gpu"], capsys)


def test_rerun_with_other_settings_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    argv = ["--model", str(model_dir), "--data", str(FIXTURE), "--out", str(out), "--sources", "gpqa"]
    monkeypatch.setattr(runner, "build_engine", lambda opts, path: ScriptedEngine(None, {}, {}))
    monkeypatch.setattr(ScriptedEngine, "generate", lambda self, p, params: [[] for _ in p])
    (out).mkdir()
    (out / "run.json").write_text(json.dumps({"temperature": 1.0}))
    err = _error([*argv, "--max-new-tokens", "8"], capsys)
    assert "other settings" in err and "use a new --out" in err
    assert os.listdir(out) == ["run.json"]


GREEDY_ARGS = ["--n", "1", "--temperature", "0", "--max-new-tokens", "24", "--chunk-size", "4", "--quiet"]


@pytest.mark.slow
def test_sglang_launch_with_and_without_router_gives_the_hf_backends_greedy_tokens(model_dir, tmp_path, monkeypatch):
    """``luffy-eval --backend sglang --sglang-launch`` (real SGLang CPU servers it starts itself, then the same behind
    sglang-router) generates the hf backend's greedy tokens, token for token, and so the same answers and avg@1."""
    from luffy_megatron.rollout.sglang.engine import SGLangEngine
    from tests.sglang_real import cpu_server_overrides, free_port_block, sglang_python

    python = sglang_python()
    build, tokens, generate_urls = runner.build_engine, {}, {}

    def recording(opts, path):  # the CLI's own engine; records what it generates
        engine = build(opts, path)
        generate, out = engine.generate, tokens.setdefault(Path(opts.out).name, [])
        if isinstance(engine, SGLangEngine):
            generate_urls[Path(opts.out).name] = (engine.client.generate_urls, engine.client.server_urls)

        def record(prompts, params, counts=None):
            got = generate(prompts, params, counts)
            out.extend([o.output_ids for o in row] for row in got)
            return got

        engine.generate = record
        return engine

    monkeypatch.setattr(runner, "build_engine", recording)
    args = ["--model", str(model_dir), "--data", str(FIXTURE), "--sources", "aime", "gpqa", "math", *GREEDY_ARGS]
    assert cli.main([*args, "--out", str(tmp_path / "hf")]) == 0
    for name, with_router in (("sglang", []), ("router", ["--sglang-router"])):
        cpu = ["--sglang-set", *cpu_server_overrides(python, free_port_block())]
        launch = ["--backend", "sglang", "--sglang-launch", *with_router, *cpu]
        assert cli.main([*args, "--out", str(tmp_path / name), *launch]) == 0
    (servers,), direct = generate_urls["sglang"]
    (router,), behind = generate_urls["router"]
    assert servers == direct[0] and router not in behind, "the second run generated through sglang-router"
    assert [len(row) for row in tokens["hf"]] == [1] * 11 and any(ids for row in tokens["hf"] for ids in row)
    assert tokens["sglang"] == tokens["hf"] and tokens["router"] == tokens["hf"]
    samples = {name: (tmp_path / name / "samples.jsonl").read_text() for name in tokens}
    assert samples["sglang"] == samples["hf"] and samples["router"] == samples["hf"]
    results = {name: json.loads((tmp_path / name / "results.json").read_text())["sources"] for name in tokens}
    avg = {name: {src: r["avg@k"] for src, r in res.items()} for name, res in results.items()}
    assert avg["sglang"] == avg["hf"] == avg["router"] and set(avg["hf"]) == {"aime", "gpqa", "math"}
    assert (tmp_path / "sglang" / "sglang_logs" / "sglang_0.log").is_file()


def test_help_shows_examples():
    proc = subprocess.run([sys.executable, "-m", "luffy_megatron.eval.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: luffy-eval") and "examples:" in proc.stdout


def test_rows_with_traces_load_whole_and_without_a_trace_warning(model_dir, tmp_path, caplog):
    """Evaluation never uses a row's trace, so it neither cuts traces nor warns that it did."""
    from transformers import AutoTokenizer

    from luffy_megatron.data.synthetic import write_task
    from luffy_megatron.eval.data import load_rows

    write_task(tmp_path / "task", num_train=4, num_val=16, seed=1, system_prompt=None)
    with caplog.at_level("WARNING"):
        rows = load_rows([str(tmp_path / "task" / "val.parquet")], AutoTokenizer.from_pretrained(model_dir))
    assert len(rows) == 16
    assert not [r.message for r in caplog.records if "traces" in r.message]
