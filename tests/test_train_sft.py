"""SFT mode end to end through ``luffy-train`` (real processes, the tiny model and task of ``write_train_assets``):
its loss is the traces' token-mean NLL, it learns, it is the same at TP 2 and DP 2, it resumes exactly, its
checkpoint starts an RL run, and bad inputs stop with what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from luffy_megatron.platform.ports import free_port
from tests.fixtures_models import write_train_assets
from tests.test_train_e2e import metrics, overrides, run_train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sft_tiny_cpu.yaml"
#: Step metrics two SFT runs of the same steps agree on (relative 1e-5).
COMPARED = ("actor/sft_nll", "actor/loss", "actor/grad_norm", "actor/entropy", "actor/off_policy_prob")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("sft"))


def sft_overrides(assets: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """Every step trains the task's 64 traces (one epoch) in one optimiser step."""
    return [
        f"model.hf_path={assets / 'model'}",
        f"data.train_files=[{assets / 'task' / 'train.parquet'}]",
        "data.val_files=[]",
        "trainer.val_interval=0",
        "data.train_batch_size=64",
        "data.mini_batch_size=64",
        "data.max_prompt_length=32",
        "algorithm.debug_checks=true",
        "checkpoint.save_dir=null",
        f"trainer.total_steps={steps}",
        f"logging.out_dir={out}",
        "logging.progress_bar=false",
        *extra,
    ]


def run_sft(args: list[str], procs: int = 1, ok: bool = True) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(free_port())]
    cmd = [*launcher, "-m", "luffy_megatron.train.cli", str(CONFIG), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], steps: list[int]) -> None:
    for step in steps:
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def reference(assets):
    out = assets / "ref"
    run_sft(sft_overrides(assets, out, 4))
    return metrics(out)


def trace_nll(assets: Path) -> float:
    """The token-mean NLL of every trace of the task under the initial model: transformers' forward, log-softmax over
    the whole vocabulary, the trainer's tokenisation of prompts and traces."""
    import torch
    from transformers import AutoModelForCausalLM

    from luffy_megatron.config import load_config
    from luffy_megatron.data import PromptDataset
    from luffy_megatron.models.tokenizer import load_tokenizer

    cfg = load_config(CONFIG, sft_overrides(assets, assets / "unused", 1))
    items = PromptDataset(cfg.data, cfg.data.train_files, load_tokenizer(cfg.model.hf_path), progress=False).items
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([item.prompt_ids + item.trace_ids])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            start = len(item.prompt_ids)
            total -= float(logp[start - 1 : -1].gather(1, ids[0, start:, None]).sum())
            count += len(item.trace_ids)
    return total / count


def test_the_loss_is_the_token_mean_nll_of_the_traces(assets, reference):
    first = reference[1]
    assert first["actor/sft_nll"] == pytest.approx(trace_nll(assets), rel=1e-5)
    assert first["actor/loss"] == pytest.approx(first["actor/sft_nll"], rel=1e-6), "nothing but the NLL"
    assert first["actor/trained_samples"] == 64 and first["response/length_mean"] > 20


def test_sft_learns_the_traces(reference):
    nll = [reference[step]["actor/sft_nll"] for step in (1, 2, 3, 4)]
    assert nll == sorted(nll, reverse=True) and nll[-1] < 0.9 * nll[0], nll
    assert all(reference[step]["actor/grad_norm"] > 0 for step in (1, 2, 3, 4))


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=1"])
def test_two_ranks_train_what_one_does(assets, reference, layout):
    """TP 2 (the vocabulary-parallel NLL) and DP 2 (the token mean over both ranks' traces) equal one process."""
    out = assets / f"two_ranks_{layout[-1]}"
    run_sft(sft_overrides(assets, out, 2, layout), procs=2)
    assert_same_steps(reference, metrics(out), [1, 2])


@pytest.fixture(scope="module")
def resumed(assets):
    """Two steps with a checkpoint after each, then a second command that resumes and runs to step 4."""
    out = assets / "resumed"
    args = (f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.save_interval=1")
    run_sft(sft_overrides(assets, out, 2, *args))
    run_sft(sft_overrides(assets, out, 4, *args))
    return out


def test_resume_continues_exactly(reference, resumed):
    got = metrics(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_steps(reference, got, [1, 2, 3, 4])


def test_sft_then_rl_starts_from_the_sft_weights(assets, resumed):
    """The RL run's first step sees the traces at the SFT run's probabilities, not the initial model's."""
    runs = {}
    for name, extra in (("rl_from_hf", ()), ("rl_from_sft", (f"model.megatron_checkpoint={resumed / 'ckpt'}",))):
        run_train(overrides(assets, assets / name, 1, *extra))
        runs[name] = metrics(assets / name)
    assert sorted(runs["rl_from_sft"]) == [1], "a fresh run: step 0, no resume"
    trace_prob = {name: rows[1]["actor/off_policy_prob"] for name, rows in runs.items()}
    assert trace_prob["rl_from_sft"] > 1.5 * trace_prob["rl_from_hf"], trace_prob


def test_rows_without_traces_stop_the_sft_run_naming_the_file(assets, tmp_path):
    import pyarrow.parquet as pq

    from luffy_megatron.data.synthetic import write_parquet

    rows = pq.read_table(assets / "task" / "train.parquet").to_pylist()
    for row in rows[5:12]:
        row["target"] = None
    bad = tmp_path / "no_traces.parquet"
    write_parquet(rows, bad)
    proc = run_sft(sft_overrides(assets, tmp_path / "out", 1, f"data.train_files=[{bad}]"), ok=False)
    assert proc.returncode == 1
    expected = f"SFT trains on traces, but rows have none (column 'target'): {bad}: 7 rows"
    assert f"luffy-train: error: DataError: {expected}" in proc.stderr


def test_an_rl_run_from_a_checkpoint_of_another_vocabulary_says_so(assets, resumed, tmp_path):
    from luffy_megatron.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", vocab_size=300)
    args = overrides(
        assets, tmp_path / "out", 1, f"model.hf_path={other}", f"model.megatron_checkpoint={resumed / 'ckpt'}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "luffy_megatron.train.cli", str(ROOT / "configs" / "tiny_cpu_luffy.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "luffy-train: error: ConfigError: model.megatron_checkpoint:" in proc.stderr
    assert "is of another vocabulary than model.hf_path" in proc.stderr
    assert "the checkpoint's model has 397 tokens, model.hf_path's 300" in proc.stderr
