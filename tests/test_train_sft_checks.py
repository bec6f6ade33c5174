"""SFT mode's checks, each without a training run: the config states the loss it trains, training rows without a
trace stop the load naming the file and the count, a starting checkpoint of another architecture or vocabulary is
named as such, and starting weights reach the optimizer's fp32 main copies."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from luffy_megatron.config import ConfigError, DataConfig, load_config
from luffy_megatron.config_checks import validate
from luffy_megatron.data import DataError, PromptDataset
from luffy_megatron.data.synthetic import write_parquet, write_task
from luffy_megatron.models.builder import model_spec
from luffy_megatron.train.start_weights import describe_config_difference, describe_shape_difference
from tests.test_data_fixtures import toy_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SFT = ("trainer.mode=sft", "algorithm.sft_loss=true", "algorithm.entropy_coeff=0", "algorithm.loss_agg_mode=token_mean")
HF = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 16384,
    "vocab_size": 397,
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder with only a config.json (validation reads nothing else) and an empty data file."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(HF))
    (tmp_path / "train.parquet").write_bytes(b"")
    return tmp_path / "model", tmp_path / "train.parquet"


def check(files: tuple[Path, Path], *overrides: str) -> None:
    model, data = files
    validate(load_config(None, [f"model.hf_path={model}", f"data.train_files=[{data}]", *overrides]), world_size=1)


def test_an_sft_config_states_its_loss(files):
    check(files, *SFT)
    check(files, *SFT, "algorithm.sft_loss_coeff=2.0", "trainer.val_interval=10")
    for override, message in [
        ("algorithm.sft_loss=false", "algorithm.sft_loss: must be true with trainer.mode=sft"),
        ("algorithm.entropy_coeff=0.001", "algorithm.entropy_coeff: must be 0 with trainer.mode=sft"),
        ("algorithm.loss_agg_mode=luffy", "algorithm.loss_agg_mode: must be token_mean with trainer.mode=sft"),
        ("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling: must be false"),
        ("algorithm.rollout_is=token_tis", "algorithm.rollout_is: must be null"),
        ("trainer.async_rollout=true", "trainer.async_rollout: must be false"),
        ("algorithm.sft_loss_coeff=0", "algorithm.sft_loss_coeff: must be positive"),
    ]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            check(files, *SFT, override)
    with pytest.raises(ConfigError, match=r"^trainer.mode: 'dpo' is not one of \['rl', 'sft'\]"):
        check(files, "trainer.mode=dpo")
    check(files, "algorithm.entropy_coeff=0.001")  # RL asks none of this


def test_a_run_started_from_a_checkpoint_saves_its_own_elsewhere(files, tmp_path):
    sft_dir = tmp_path / "sft"
    (sft_dir / "step_000004").mkdir(parents=True)
    for start in (sft_dir, sft_dir / "step_000004"):
        with pytest.raises(ConfigError, match="^checkpoint.save_dir: .* holds model.megatron_checkpoint"):
            check(files, f"model.megatron_checkpoint={start}", f"checkpoint.save_dir={sft_dir}")
    check(files, f"model.megatron_checkpoint={sft_dir}", f"checkpoint.save_dir={tmp_path / 'rl'}")


def test_rows_without_a_trace_stop_the_load_naming_each_file_and_count(tmp_path):
    train, _ = write_task(tmp_path / "a", num_train=10, num_val=1, seed=0, system_prompt=None)
    rows = pq.read_table(train).to_pylist()
    for row in rows[:3]:
        row["target"] = None
    partial = tmp_path / "partial.parquet"
    write_parquet(rows, partial)
    tok = toy_tokenizer(True)
    PromptDataset(DataConfig(), [str(train), str(partial)], tok, progress=False)  # RL: all-on-policy groups
    with pytest.raises(DataError, match=rf"rows have none \(column 'target'\): {partial}: 3 rows$"):
        PromptDataset(DataConfig(), [str(train), str(partial)], tok, progress=False, require_traces=True)
    assert len(PromptDataset(DataConfig(), [str(train)], tok, progress=False, require_traces=True)) == 10


def test_another_architecture_or_vocabulary_is_named():
    spec = model_spec(HF)
    assert describe_config_difference({"family": "qwen2", "vocab_size": 397, "hf_config": HF}, spec) is None
    wider = {"family": "qwen2", "vocab_size": 397, "hf_config": dict(HF, hidden_size=128)}
    assert describe_config_difference(wider, spec) == (
        "architecture",
        "the checkpoint's hidden_size 128 (model.hf_path: 64)",
    )
    llama = {"family": "llama", "vocab_size": 397, "hf_config": dict(HF, architectures=["LlamaForCausalLM"])}
    kind, details = describe_config_difference(llama, spec)
    assert kind == "architecture" and details.startswith("the checkpoint's family 'llama' (model.hf_path: 'qwen2')")
    vocab = {"family": "qwen2", "vocab_size": 300, "hf_config": dict(HF, vocab_size=300)}
    assert describe_config_difference(vocab, spec) == (
        "vocabulary",
        "the checkpoint's model has 300 tokens, model.hf_path's 397",
    )


def test_a_start_folder_that_is_no_checkpoint_is_named(tmp_path):
    from luffy_megatron.train.start_weights import load_start_weights

    cfg = load_config(None, ["model.hf_path=m", f"model.megatron_checkpoint={tmp_path}"])
    with pytest.raises(ConfigError, match=r"neither a converted Megatron checkpoint \(no luffy_checkpoint.json\)"):
        load_start_weights(cfg, policy=None)


def test_checkpoints_without_a_recorded_model_are_compared_by_their_tensors_shapes():
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    shapes = {"embedding.word_embeddings.weight": (512, 64), "decoder.layers.mlp.linear_fc2.weight": (2, 64, 160)}
    tensors = {k: ShardedTensor.from_rank_offsets(k, torch.zeros(s)) for k, s in shapes.items()}
    chunk = SimpleNamespace(sharded_state_dict=lambda: tensors)
    policy = SimpleNamespace(modules=[chunk], spec=model_spec(HF), cfg=load_config(None, ["model.hf_path=m"]))

    def saved(**changed: tuple[int, ...]) -> dict:
        return {k: SimpleNamespace(global_shape=changed.get(k.split(".")[0], s)) for k, s in shapes.items()}

    assert describe_shape_difference(saved(), policy) is None
    kind, details = describe_shape_difference(saved(embedding=(384, 64)), policy)
    assert kind == "vocabulary" and details.startswith("embedding.word_embeddings.weight has 384 rows in the check")
    kind, details = describe_shape_difference(saved(decoder=(3, 64, 160)), policy)
    assert kind == "architecture"
    assert details == "decoder.layers.mlp.linear_fc2.weight: (3, 64, 160) in the checkpoint, (2, 64, 160) here"


def bf16_main_params(rank: int, world: int, hf_dir: str) -> float:
    """The largest difference between a bf16 policy's loaded weights and the optimizer's fp32 main copies."""
    from luffy_megatron.platform import init_model_parallel, setup_platform

    setup_platform()
    from luffy_megatron.config import read_hf_config
    from luffy_megatron.train.policy import MegatronPolicy
    from luffy_megatron.train.start_weights import load_start_weights

    init_model_parallel(1, 1, None, seed=1)
    cfg = load_config(None, [f"model.hf_path={hf_dir}", "model.dtype=bfloat16"])
    policy = MegatronPolicy(cfg, model_spec(read_hf_config(hf_dir), 1), pad_id=0)
    load_start_weights(cfg, policy)
    gaps = [0.0]
    for opt in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for mains, params in zip(opt.fp32_from_float16_groups, opt.float16_groups):
            gaps += [float((m - p.float()).abs().max()) for m, p in zip(mains, params)]
    return max(gaps)


@pytest.mark.slow
def test_bf16_starting_weights_reach_the_optimizers_main_copies(tmp_path):
    """Else the first optimiser step writes the freshly initialised fp32 copies back over the loaded weights."""
    from luffy_megatron.models.tiny import make_tiny_model
    from tests.dist_utils import run_distributed

    hf_dir = make_tiny_model(tmp_path / "model")
    assert run_distributed(bf16_main_params, 1, str(hf_dir)) == [0.0]
