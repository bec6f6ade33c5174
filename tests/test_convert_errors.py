"""Bad input to the converters fails early with a message that names the problem (in process, no Megatron init)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from luffy_megatron.config import ConfigError
from luffy_megatron.convert import ConversionError
from luffy_megatron.convert.hf_io import HFCheckpointReader, StreamingSafetensorsWriter, check_output_dir
from luffy_megatron.convert.load import check_hf_tensors, check_parallel_layout
from luffy_megatron.convert.mapping import Geometry, conversion_plan
from luffy_megatron.models.builder import model_spec
from tests.fixtures_models import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _copy(tmp: Path, name: str = "qwen3") -> tuple[Path, dict, dict[str, torch.Tensor]]:
    dst = tmp / name
    shutil.copytree(tiny_checkpoint(name), dst)
    return dst, json.loads((dst / "config.json").read_text()), load_file(dst / "model.safetensors")


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(ConfigError, match="supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        model_spec({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 10})


def test_missing_and_extra_tensors_are_listed(tmp_path: Path) -> None:
    folder, config, tensors = _copy(tmp_path)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConversionError) as err, HFCheckpointReader(folder) as reader:
        check_hf_tensors(reader, model_spec(config))
    assert "missing tensors (1): model.layers.1.self_attn.k_norm.weight" in str(err.value)
    assert "unexpected tensors (1): model.layers.0.mlp.extra.weight" in str(err.value)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    folder, config, tensors = _copy(tmp_path)
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(63, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"v_proj.weight: expected \(64, 64\), found \(63, 64\)"):  # noqa: SIM117
        with HFCheckpointReader(folder) as reader:
            check_hf_tensors(reader, model_spec(config))


def test_tp_must_divide_heads_and_groups() -> None:
    spec = model_spec(json.loads((tiny_checkpoint("qwen3") / "config.json").read_text()))
    check_parallel_layout(spec, 2)
    with pytest.raises(ConversionError, match="does not divide the 2 query groups"):
        check_parallel_layout(spec, 4)


def test_non_empty_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    check_output_dir(tmp_path / "out", overwrite=False)  # empty is fine
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(ConversionError, match="--overwrite"):
        check_output_dir(tmp_path / "out", overwrite=False)
    check_output_dir(tmp_path / "out", overwrite=True)


def test_reader_reads_row_ranges_and_columns(tmp_path: Path) -> None:
    t = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    save_file({"t": t}, tmp_path / "model.safetensors")
    with HFCheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("t"), t)
        assert torch.equal(reader.read("t", dim=0, start=2, stop=5), t[2:5])
        assert torch.equal(reader.read("t", dim=1, start=1, stop=3), t[:, 1:3])


def test_writer_checks_plan_order_and_shards(tmp_path: Path) -> None:
    plan = [("a", (4, 4), torch.float32), ("b", (8,), torch.bfloat16), ("c", (2, 2), torch.float32)]
    writer = StreamingSafetensorsWriter(tmp_path, plan, max_shard_bytes=70)
    with pytest.raises(ConversionError, match=r"expected a \(4, 4\), got b"):
        writer.write("b", torch.zeros(8))
    writer.write("a", torch.ones(4, 4))
    with pytest.raises(ConversionError, match="2 planned tensors were not written"):
        writer.close()
    writer = StreamingSafetensorsWriter(tmp_path, plan, max_shard_bytes=70)
    writer.write("a", torch.ones(4, 4))
    writer.write("b", torch.arange(8.0))
    writer.write("c", torch.eye(2))
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    second = load_file(tmp_path / "model-00002-of-00002.safetensors")
    assert second["b"].dtype == torch.bfloat16 and torch.equal(second["b"], torch.arange(8.0).bfloat16())


def test_fused_layouts_invert_at_every_tp() -> None:
    """shard_from_hf then hf_from_shards is the identity for every rule (pure tensor code, TP = 1, 2), each given its
    Megatron parameter's shape on the rank."""
    folder = tiny_checkpoint("qwen2")
    spec = model_spec(json.loads((folder / "config.json").read_text()), tp=2)
    with HFCheckpointReader(folder) as reader:
        for rule in conversion_plan(spec).values():
            if rule.tied_copy:
                continue
            for tp in (1, 2):
                dim = {"linear_proj": 1, "linear_fc2": 1}.get(rule.megatron.split(".")[-2], 0)
                dim = None if "norm" in rule.megatron else dim
                geo = Geometry.of(spec)
                shape = list(reader.shape(rule.hf[0]))
                if rule.vocab:
                    shape[0] = geo.padded_vocab // tp
                elif rule.kind == "mlp":  # the rank's [gate_r; up_r]: the Megatron parameter's rows
                    shape[0] = 2 * shape[0] // tp
                elif dim is not None and rule.kind == "direct":
                    shape[dim] //= tp
                shards = [rule.shard_from_hf(reader.read, geo, r, tp, dim, torch.Size(shape)) for r in range(tp)]
                for name, tensor in rule.hf_from_shards(shards, geo, dim):
                    assert torch.equal(tensor, reader.read(name)), (name, tp)


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron.py", "convert_megatron_to_hf.py", "make_tiny_model.py"])
def test_tools_help_shows_an_example(tool: str) -> None:
    out = subprocess.run([sys.executable, str(REPO / "tools" / tool), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "example" in out.stdout.lower(), out.stderr
