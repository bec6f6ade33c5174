"""The typed config: YAML + overrides, and every validation rule naming its key before anything is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from luffy_megatron.algo.aggregation import POLICY_WEIGHTS
from luffy_megatron.algo.options import KL_PENALTIES, OFF_POLICY_RESHAPES, ON_POLICY_RESHAPES
from luffy_megatron.config import (
    AggMode,
    ConfigError,
    GroupBackend,
    KLType,
    Reshape,
    RunConfig,
    ServerDevice,
    SystemPrompt,
    WeightSync,
    choices,
    load_config,
)
from luffy_megatron.config_checks import validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder with only a config.json: validation reads nothing else."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_hidden_layers": 6,
        "max_position_embeddings": 4096,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    f = tmp_path / "train.parquet"
    f.write_bytes(b"")
    return f


def valid(model_dir: Path, data_file: Path, *extra: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.hf_path={model_dir}",
            f"data.train_files=[{data_file}]",
            "data.max_prompt_length=512",
            "data.max_response_length=1024",
            *extra,
        ],
    )


def test_valid_config_passes_and_derives_dp(model_dir, data_file):
    cfg = valid(model_dir, data_file, "parallel.tp=2")
    validate(cfg, world_size=4)
    assert cfg.parallel.tp == 2 and isinstance(cfg.algorithm.off_policy_reshape_gamma, float)


@pytest.mark.parametrize(
    "overrides, world, key, words",
    [
        (["parallel.tp=3"], 3, "parallel.tp", "attention heads"),
        (["parallel.tp=4"], 4, "parallel.tp", "query groups"),
        (["parallel.pp=4"], 4, "parallel.pp", "layers"),
        (["parallel.pp=2", "parallel.vpp=2"], 2, "parallel.vpp", "layers"),
        (["parallel.vpp=2"], 1, "parallel.vpp", "pp >= 2"),
        (["parallel.tp=2"], 3, "parallel", "world size 3"),
        (["rollout.n_off=8"], 1, "rollout.n_off", "smaller than rollout.n"),
        (["rollout.n_off=-1"], 1, "rollout.n_off", ">= 0"),
        (["rollout.top_p=1.5"], 1, "rollout.top_p", "(0, 1]"),
        (["data.max_response_length=0"], 1, "data.max_response_length", "positive"),
        (["data.max_prompt_length=-5"], 1, "data.max_prompt_length", "positive"),
        (["data.mini_batch_size=48"], 1, "data.mini_batch_size", "does not divide"),
        (["data.train_files=[/nonexistent/x.parquet]"], 1, "data.train_files", "no such file"),
        (["data.val_files=[/nonexistent/v.parquet]"], 1, "data.val_files", "no such file"),
        (["model.megatron_checkpoint=/nonexistent"], 1, "model.megatron_checkpoint", "not found"),
        (["model.hf_path=/nonexistent"], 1, "model.hf_path", "no config.json"),
        (["model.dtype=float64"], 1, "model.dtype", "not one of"),
        (["algorithm.off_policy_reshape=cube"], 1, "algorithm.off_policy_reshape", "not one of"),
        (["algorithm.loss_agg_mode=sum"], 1, "algorithm.loss_agg_mode", "not one of"),
        (["algorithm.clip_eps=1.5"], 1, "algorithm.clip_eps", "(0, 1)"),
        (["algorithm.kl_coeff=0.1"], 1, "algorithm.kl_coeff", "reference model"),
        (["optimizer.lr=0"], 1, "optimizer.lr", "positive"),
        (["rollout.backend=vllm"], 1, "rollout.backend", "not one of"),
        (["rollout.backend=sglang"], 1, "rollout.sglang.urls", "launch=true"),
        (
            ["rollout.backend=sglang", "rollout.sglang.launch=true", "rollout.sglang.weight_sync=disk"],
            1,
            "rollout.sglang.weight_sync_dir",
            "required",
        ),
        (["data.max_response_length=8000"], 1, "data.max_response_length", "max_position_embeddings"),
        (["checkpoint.keep_last=0"], 1, "checkpoint.keep_last", ">= 1"),
        (["algorithm.dynamic_sampling_signal=trace"], 1, "algorithm.dynamic_sampling_signal", "not one of"),
        (["algorithm.dynamic_sampling_max_rounds=0"], 1, "algorithm.dynamic_sampling_max_rounds", "must be positive"),
        (["trainer.async_rollout_threads=0"], 1, "trainer.async_rollout_threads", "must be positive"),
        (
            [
                "trainer.async_rollout=true",
                "rollout.backend=sglang",
                "rollout.sglang.urls=[http://h:1]",
                "rollout.sglang.colocate=true",
            ],
            1,
            "trainer.async_rollout",
            "colocate=false",
        ),
        (["algorithm.on_policy_baseline=trace"], 1, "algorithm.on_policy_baseline", "not one of"),
        (["algorithm.rollout_is=tis"], 1, "algorithm.rollout_is", "not one of"),
        (["algorithm.rollout_is=token_tis", "algorithm.rollout_is_cap=1.0"], 1, "algorithm.rollout_is_cap", "> 1"),
    ],
)
def test_each_rule_names_its_key(model_dir, data_file, overrides, world, key, words):
    cfg = valid(model_dir, data_file, *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    message = str(err.value)
    assert message.startswith(key + ":") and words in message, message


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tpp=2"], "tpp"),
        (["algorithm.gamma=0.1"], "gamma"),
        (["rollout.n=eight"], "rollout.n"),
        (["nokey"], "nokey"),
    ],
)
def test_unknown_keys_and_wrong_types_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_paper_recipe_config_is_key_by_key():
    cfg = load_config(ROOT / "configs" / "luffy_qwen2.5_math_7b.yaml")
    r, a, d, o = cfg.rollout, cfg.algorithm, cfg.data, cfg.optimizer
    assert (r.n, r.n_off, r.temperature) == (8, 1, 1.0)
    assert (a.off_policy_reshape, a.off_policy_reshape_gamma, a.clip_ratio, a.adv_use_std) == (
        "p_div_p",
        0.1,
        False,
        False,
    )
    assert (a.loss_agg_mode, a.entropy_coeff, a.kl_coeff) == ("luffy", 0.001, 0.0)
    assert (o.lr, o.weight_decay, o.clip_grad) == (1e-6, 0.01, 1.0)
    assert (d.train_batch_size, d.mini_batch_size, d.max_prompt_length, d.max_response_length) == (128, 64, 1024, 8192)
    baseline = load_config(ROOT / "configs" / "grpo_on_policy_qwen2.5_math_7b.yaml")
    assert baseline.rollout.n_off == 0 and baseline.algorithm.clip_ratio and baseline.algorithm.clip_eps == 0.2


@pytest.mark.parametrize("recipe", ["luffy_qwen2.5_math_7b", "luffy_qwen2.5_32b"])
def test_async_recipes_are_the_synchronous_ones_plus_async_rollout_and_tis(recipe):
    from luffy_megatron.config import iter_leaves

    sync = dict(iter_leaves(load_config(ROOT / "configs" / f"{recipe}.yaml")))
    asyn = dict(iter_leaves(load_config(ROOT / "configs" / f"{recipe}_async.yaml")))
    changed = {k: asyn[k] for k in sync if sync[k] != asyn[k]}
    assert changed == {
        "trainer.async_rollout": True,
        "algorithm.rollout_is": "token_tis",
        "checkpoint.save_dir": f"checkpoints/{recipe}_async",
        "logging.out_dir": f"outputs/{recipe}_async",
    }
    assert sync["algorithm.rollout_is"] is None and not asyn["rollout.sglang.colocate"]  # the paper keeps IS off


def test_long_recipe_is_the_32b_one_with_32k_responses_in_one_sample_micro_batches():
    from luffy_megatron.config import iter_leaves

    base = dict(iter_leaves(load_config(ROOT / "configs" / "luffy_qwen2.5_32b.yaml")))
    long = dict(iter_leaves(load_config(ROOT / "configs" / "luffy_qwen2.5_32b_long.yaml")))
    changed = {k: long[k] for k in base if base[k] != long[k]}
    assert changed == {
        "data.max_response_length": 32768,
        "parallel.max_tokens_per_micro_batch": 1024 + 32768,
        "checkpoint.save_dir": "checkpoints/luffy_qwen2.5_32b_long",
        "checkpoint.save_interval": 10,
        "logging.out_dir": "outputs/luffy_qwen2.5_32b_long",
    }


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    load_config(ROOT / "configs" / name)


def test_cli_rejects_bad_config_before_building(model_dir, data_file, capsys):
    from luffy_megatron.train.cli import main

    code = main([str(ROOT / "configs" / "tiny_cpu_luffy.yaml"), f"model.hf_path={model_dir}", "rollout.n_off=9"])
    assert code == 2
    assert "rollout.n_off" in capsys.readouterr().err


def test_option_names_come_from_the_dispatch_tables(model_dir, data_file):
    """Every table the code dispatches on covers its enumeration exactly, and every name is a valid config value."""
    assert set(ON_POLICY_RESHAPES) == set(OFF_POLICY_RESHAPES) == set(Reshape)
    assert set(KL_PENALTIES) == set(KLType) and set(POLICY_WEIGHTS) == set(AggMode)
    options = [f"algorithm.on_policy_reshape={n}" for n in choices(Reshape)]
    options += [f"algorithm.off_policy_reshape={n}" for n in choices(Reshape)]
    options += [f"algorithm.loss_agg_mode={n}" for n in choices(AggMode)]
    options += [f"algorithm.kl_type={n}" for n in choices(KLType)]
    options += [f"data.system_prompt={n}" for n in choices(SystemPrompt)]
    options += [f"rollout.sglang.weight_sync={n}" for n in choices(WeightSync)]
    options += [f"rollout.sglang.weight_sync_backend={n}" for n in choices(GroupBackend)]
    options += [f"rollout.sglang.device={n}" for n in choices(ServerDevice)]
    for option in options:
        extra = ("data.system_prompt_text=Be brief.", "rollout.sglang.weight_sync_dir=weights")
        validate(valid(model_dir, data_file, option, *extra), world_size=1)
    with pytest.raises(ConfigError, match=r"^algorithm.kl_type: 'k2' is not one of \['k1', 'k3'\]"):
        validate(valid(model_dir, data_file, "algorithm.kl_type=k2"), world_size=1)


def test_config_checks_do_not_import_torch():
    """A configuration error answers before torch, megatron-core or transformers load (about 6 s)."""
    code = "import sys, luffy_megatron.config_checks; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out


def test_an_override_that_does_not_parse_is_one_config_error_naming_it():
    """A YAML syntax error inside an override's value (an unclosed list) is a ConfigError, not a parser traceback."""
    with pytest.raises(ConfigError, match=r"cannot parse override 'rollout.sglang.extra_args=\[a,'"):
        load_config(None, ["model.hf_path=m", "rollout.sglang.extra_args=[a,"])
