"""The trainer end to end through ``luffy-train`` (real processes): exact resume after a checkpoint, after kill -9
during training, from an HF folder vs a converted Megatron checkpoint, plus failed and interrupted saves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_models import write_train_assets
from tests.learning import assert_learns, assert_same_step

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("e2e"))


def overrides(assets: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.hf_path={assets / 'model'}",
        "model.dtype=float32",
        f"data.train_files=[{assets / 'task' / 'train.parquet'}]",
        "data.val_files=[]",
        "trainer.val_interval=0",
        "data.train_batch_size=4",
        "data.mini_batch_size=2",  # two optimiser steps per rollout step: old log-probs are computed
        "data.max_response_length=28",  # the fixture's expert traces are 27 tokens and EOS: rewarded 1
        "data.max_prompt_length=32",
        "rollout.n=4",
        "rollout.hf_batch_size=16",
        "reward.num_workers=1",
        "optimizer.lr=1e-3",
        "algorithm.entropy_coeff=0.001",
        "algorithm.debug_checks=true",
        f"trainer.total_steps={steps}",
        f"logging.out_dir={out}",
        "logging.progress_bar=false",
        *extra,
    ]


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "luffy_megatron.train.cli", str(ROOT / "configs" / "tiny_cpu_luffy.yaml"), *args]


def run_train(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(train_cmd(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> dict[int, dict]:
    from luffy_megatron.metrics.logger import read_jsonl

    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(assets):
    """Three uninterrupted steps, each on signal: the runs compared with it train LUFFY's own gradient."""
    out = assets / "ref"
    run_train(overrides(assets, out, 3))
    rows = metrics(out)
    assert_learns(rows.values(), most=1.0)
    return rows


def test_exact_sample_counts_nothing_discarded(reference):
    """Every synthetic prompt has a trace: n - n_off = 3 samples per prompt are generated, all of them used."""
    for step in reference.values():
        assert step["rollout/samples_generated"] == 4 * 3 and step["rollout/samples_discarded"] == 0


@pytest.mark.parametrize("mode", ["token_tis", "seq_mask"])
def test_rollout_is_through_the_trainer(assets, reference, mode):
    """fp32 engine and fp32 trainer agree to ~1e-6 per token: the weights are 1 and the first step is unchanged."""
    out = assets / f"is_{mode}"
    run_train(overrides(assets, out, 1, f"algorithm.rollout_is={mode}"))
    step = metrics(out)[1]
    assert step["rollout_is/weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert 0.99 < step["rollout_is/ratio_max"] < 1.01
    assert step["rollout_is/clipped_frac" if mode == "token_tis" else "rollout_is/masked_frac"] == 0.0
    assert_same_step(reference[1], step)


@pytest.mark.parametrize("signal", ["on_policy", "group"])
def test_dynamic_sampling_through_the_trainer(assets, signal):
    """Rounds draw fresh prompts from the sampler; the trained batch keeps only groups with signal unless padded.

    The untrained tiny model rarely solves a prompt and every (untruncated) trace is correct: with ``on_policy`` a
    step where nothing is solved filters every group (three rounds, then padding), with ``group`` every group has
    signal (one round)."""
    out = assets / f"dynamic_{signal}"
    run_train(
        overrides(
            assets,
            out,
            2,
            "algorithm.dynamic_sampling=true",
            "algorithm.dynamic_sampling_max_rounds=3",
            f"algorithm.dynamic_sampling_signal={signal}",
            "data.max_response_length=64",
        )
    )
    for step in metrics(out).values():
        rounds, padded = step["dynamic_sampling/rounds"], step["dynamic_sampling/groups_padded"]
        assert step["reward/off_policy"] == 1.0
        assert rounds == (3 if signal == "on_policy" and step["reward/on_policy"] == 0 else 1)
        assert step["dynamic_sampling/prompts_consumed"] == 4 * rounds
        assert step["rollout/samples_generated"] == 4 * 3 * rounds and step["rollout/samples_discarded"] == 0
        kept = step["dynamic_sampling/prompts_consumed"] - step["dynamic_sampling/groups_filtered"]
        assert padded == max(0, 4 - kept)
        if signal == "on_policy":  # trained groups without on-policy signal are only the padding ones
            assert step["groups/solved_all"] + step["groups/solved_none"] == pytest.approx(padded / 4)
        else:
            assert step["dynamic_sampling/groups_filtered"] == 0


def async_args(assets: Path) -> tuple[str, ...]:
    """Validation after step 2 waits for step 3's batch and gives the engine step 2's weights first."""
    return (
        "trainer.async_rollout=true",
        "trainer.async_rollout_threads=1",
        "trainer.val_interval=2",
        "trainer.val_max_prompts=4",
        f"data.val_files=[{assets / 'task' / 'val.parquet'}]",
    )


@pytest.fixture(scope="module")
def async_reference(assets):
    """Three uninterrupted steps with one-step-off asynchronous rollout (the HF engine in its own process, one torch
    thread: the update keeps its own)."""
    out = assets / "async_ref"
    run_train(overrides(assets, out, 3, *async_args(assets)))
    rows = metrics(out)
    assert_learns(rows.values(), most=1.0)
    return rows


def test_async_rollout_is_one_step_off_and_overlaps_the_update(reference, async_reference):
    got = async_reference
    assert [got[k]["rollout/weight_staleness"] for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert "val/all/avg@1" in got[2] and "val/all/avg@1" not in got[3]
    # Step 1's batch is generated before any update, from the same weights and seed as the synchronous run's.
    assert_same_step(reference[1], got[1])
    # Step 2's batch comes from the weights before step 1's update: it is not the synchronous run's batch.
    assert got[2]["actor/loss"] != pytest.approx(reference[2]["actor/loss"], rel=1e-6)
    for k in (1, 2):  # step k + 1's generation is under way while step k's update runs
        assert got[k + 1]["timeline/generate_start"] < got[k]["timeline/update_end"]
        assert got[k + 1]["timeline/generate_end"] > got[k]["timeline/update_start"]
        assert got[k + 1]["time/rollout_s"] > 0 and got[k + 1]["rollout/samples_discarded"] == 0


def test_async_rollout_resumes_exactly_with_the_batch_in_flight(assets, async_reference):
    out = assets / "async_resume"
    ckpt = out / "ckpt"
    extra = (*async_args(assets), f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1")
    run_train(overrides(assets, out, 2, *extra))
    state = json.loads((ckpt / "step_000002" / "trainer_state.json").read_text())
    assert state["pending_rollout"]["step"] == 3 and state["pending_rollout"]["weights_step"] == 1
    assert (ckpt / "step_000002" / state["pending_rollout"]["file"]).is_file()  # binary, beside the small JSON
    run_train(overrides(assets, out, 3, *extra))
    got = metrics(out)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert_same_step(async_reference[step], got[step])
    assert got[3]["rollout/weight_staleness"] == 1.0
    assert got[2]["val/all/avg@1"] == async_reference[2]["val/all/avg@1"]


def test_resume_from_checkpoint_continues_exactly(assets, reference):
    out = assets / "resume"
    ckpt = out / "ckpt"
    run_train(overrides(assets, out, 2, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000001", "step_000002"]
    run_train(overrides(assets, out, 3, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1"))
    got = metrics(out)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert_same_step(reference[step], got[step])
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_000002", "step_000003"], "keep_last=2"


def test_kill_9_during_training_then_resume(assets, reference):
    out = assets / "killed"
    ckpt = out / "ckpt"
    args = overrides(assets, out, 50, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while not (ckpt / "step_000002" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_train(overrides(assets, out, 3, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=2"))
    assert_same_step(reference[3], metrics(out)[3])


def _kill_during_a_save(args: list[str], ckpt: Path) -> list[str]:
    """Start a run, SIGKILL it while a save after step 2 is in progress (step 3's, or a later one's); the names of
    the interrupted saves ([] if the kill landed after the save had finished)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(train_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while not (any(ckpt.glob("*.incomplete")) and (ckpt / "step_000002" / "trainer_state.json").is_file()):
        assert proc.poll() is None and time.time() < deadline, "no save in progress was caught"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return sorted(p.name for p in ckpt.glob("*.incomplete"))


def test_kill_9_during_a_save_then_resume(assets, reference):
    """Kill the trainer while a checkpoint is being written: the half-written one is never loaded."""
    out = assets / "killed_in_save"
    ckpt = out / "ckpt"
    # A save of the tiny model takes milliseconds, so the kill can land just after it finished: then start again.
    for _ in range(5):
        shutil.rmtree(out, ignore_errors=True)
        interrupted = _kill_during_a_save(
            overrides(assets, out, 50, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1"), ckpt
        )
        if interrupted:
            break
    assert interrupted, "the kill landed after the save finished, 5 times"
    from luffy_megatron.train.checkpoint import latest_checkpoint

    resume_step = int(latest_checkpoint(ckpt).name.split("_")[1])
    assert f"step_{resume_step + 1:06d}.incomplete" in interrupted
    run_train(overrides(assets, out, resume_step + 1, f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=1"))
    if resume_step + 1 in reference:
        assert_same_step(reference[resume_step + 1], metrics(out)[resume_step + 1])
    assert not list(ckpt.glob("*.incomplete")), "the next save removes the interrupted one"


def test_export_hf_at_end_loads_in_transformers(assets):
    from transformers import AutoModelForCausalLM

    out = assets / "export"
    run_train(overrides(assets, out, 1, f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.export_hf_at_end=true"))
    exported = AutoModelForCausalLM.from_pretrained(out / "ckpt" / "hf_final")
    original = AutoModelForCausalLM.from_pretrained(assets / "model")
    new, old = exported.state_dict(), original.state_dict()
    assert new.keys() == old.keys() and all(new[k].shape == old[k].shape for k in old)
    assert any(not (new[k] == old[k]).all() for k in old), "the exported weights are the trained ones"


def test_megatron_checkpoint_start_matches_hf_start(assets, reference):
    mcore = assets / "mcore"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_hf_to_megatron.py"),
            "--hf-dir",
            str(assets / "model"),
            "--out",
            str(mcore),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = assets / "from_mcore"
    run_train(overrides(assets, out, 1, f"model.megatron_checkpoint={mcore}"))
    assert_same_step(reference[1], metrics(out)[1])


def test_interrupted_save_is_never_loaded(assets):
    """A half-written checkpoint (a save killed midway) is ignored; the newest complete one is used."""
    from luffy_megatron.train.checkpoint import latest_checkpoint

    root = assets / "partial"
    complete = root / "step_000004"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (root / "step_000006.incomplete" / "model_optim").mkdir(parents=True)
    (root / "step_000008").mkdir()  # renamed but without its state file: not complete either
    assert latest_checkpoint(root) == complete


def test_config_errors_stop_before_any_model_is_built(assets, tmp_path):
    bad = overrides(assets, tmp_path / "bad", 1, "parallel.tp=3")
    proc = subprocess.run(train_cmd(bad), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parallel.tp" in proc.stderr and "does not divide" in proc.stderr
    assert "GPTModel" not in proc.stdout + proc.stderr


def failing_saves(rank: int, world: int, hf_dir: str, save_dir: str) -> list[str]:
    """Save once, then a save whose writer fails (a full disk) and a save into an unwritable place."""
    from luffy_megatron.platform import init_model_parallel, setup_platform

    setup_platform()  # before megatron is imported
    import megatron.core.dist_checkpointing as dcp

    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.train.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
    from luffy_megatron.train.policy import MegatronPolicy

    init_model_parallel(1, 1, None, seed=1)
    cfg = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=float32"])
    policy = MegatronPolicy(cfg, model_spec(read_hf_config(hf_dir), 1), pad_id=0)
    first = save_checkpoint(save_dir, 1, policy, {}, keep_last=2)
    errors = []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    original, dcp.save = dcp.save, disk_full
    try:
        save_checkpoint(save_dir, 2, policy, {}, keep_last=1)
    except CheckpointError as e:
        errors.append(str(e))
    finally:
        dcp.save = original
    assert latest_checkpoint(save_dir) == first, "the previous checkpoint stays the newest complete one"
    assert (first / "trainer_state.json").is_file(), "keep_last pruning never ran"
    blocker = Path(save_dir) / "not_a_dir"
    blocker.write_text("")
    try:
        save_checkpoint(str(blocker), 3, policy, {}, keep_last=1)
    except CheckpointError as e:
        errors.append(str(e))
    return errors


def test_failed_saves_raise_clearly_and_keep_the_previous_checkpoint(assets, tmp_path):
    from tests.dist_utils import run_distributed

    [errors] = run_distributed(failing_saves, 1, str(assets / "model"), str(tmp_path / "ckpt"))
    assert len(errors) == 2
    assert "No space left on device" in errors[0] and "previous checkpoints are intact" in errors[0]
    assert "not_a_dir" in errors[1]
