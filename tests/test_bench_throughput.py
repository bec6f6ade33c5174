"""tools/bench_throughput.py end to end on one tiny layout (one process, one step): the JSON report's schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "bench_throughput.py"
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def test_layout_parsing_and_peak_table():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_throughput as bt
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert bt.parse_layout("tp2pp1dp4") == {
        "name": "tp2pp1dp4",
        "tp": 2,
        "pp": 1,
        "vpp": None,
        "dp": 4,
        "sequence_parallel": None,
        "world": 8,
    }
    assert bt.parse_layout("tp1pp2vpp2dp1")["vpp"] == 2
    # pp / dp default to 1; sp / nosp set sequence parallelism, unsuffixed leaves the trainer's default (on at TP > 1)
    short = bt.parse_layout("tp2sp")
    assert (short["pp"], short["dp"], short["world"], short["sequence_parallel"]) == (1, 1, 2, True)
    assert bt.parse_layout("tp2pp2nosp")["sequence_parallel"] is False and bt.parse_layout("tp2dp2")["world"] == 4
    for bad in ("pp2dp2", "tp2spdp2", "tp2pp1dp1xsp"):
        with pytest.raises(Exception, match="tpXppYdpZ"):
            bt.parse_layout(bad)
    label = bt.plot_label(
        {
            "layout": "tp2",
            "tp": 2,
            "sequence_parallel": True,
            "peak_rss_gb_max_rank": 1.2,
            "peak_rss_gb_per_rank": [1.1, 1.2],
            "tokens": {"computed_over_real": 1.0},
        }
    )
    assert label == "tp2 SP on\n1.10-1.20 GB RSS/rank\ncomputed/real 1.000"
    assert bt.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert bt.peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert bt.peak_flops("cpu", "bfloat16") is None


def test_luffy_length_mix_is_seeded_and_shaped_like_the_paper():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench_throughput as bt
    finally:
        sys.path.remove(str(REPO / "tools"))
    mix = bt.length_mix("luffy", 64, 8, 0, 0, seed=0)
    assert mix == bt.length_mix("luffy", 64, 8, 0, 0, seed=0) != bt.length_mix("luffy", 64, 8, 0, 0, seed=1)
    assert len(mix) == 512 and all(80 <= p <= 400 and 1 <= r <= 8192 for p, r in mix)
    on = sorted(r for i, (_, r) in enumerate(mix) if i % 8 != 7)
    assert 1200 < on[len(on) // 2] < 1800  # median ~1,500
    assert all(1500 <= r <= 8192 for i, (_, r) in enumerate(mix) if i % 8 == 7)  # the traces
    assert all(mix[g * 8][0] == mix[g * 8 + j][0] for g in range(64) for j in range(8))  # one prompt per group
    assert bt.length_mix("fixed", 2, 3, 5, 7, seed=0) == [(5, 7)] * 6


@pytest.mark.slow  # starts the tool and its worker process
def test_one_tiny_layout_writes_report(tmp_path):
    # Only config.json is read (Megatron's random init gives the weights); writing it directly keeps transformers out.
    hf_dir = tmp_path / "model"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [
        sys.executable,
        str(TOOL),
        f"--hf-dir={hf_dir}",
        "--layouts=tp1pp1dp1",
        "--prompts=1",
        "--n=2",
        "--prompt-len=4",
        "--response-len=4",
        "--steps=1",
        "--warmup=0",
        "--dtype=float32",
        f"--out={out}",
        f"--plot={png}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    for key in ("what", "date", "command", "model", "config", "method", "machine", "results", "peak_flops_table"):
        assert key in report, key
    assert report["model"]["hidden_size"] == 32 and report["config"]["n"] == 2
    assert report["model"]["description"].startswith("model (LlamaForCausalLM)")
    [res] = report["results"]
    assert "error" not in res
    assert (res["layout"], res["tp"], res["pp"], res["dp"], res["world_size"]) == ("tp1pp1dp1", 1, 1, 1, 1)
    assert res["sequence_parallel"] is False and len(res["peak_rss_gb_per_rank"]) == 1
    assert res["backend"] == "gloo" and res["samples_per_step"] == 2 and res["tokens_per_step"] == 16
    for phase in ("train", "logprob"):
        r = res[phase]
        assert len(r["all_seconds"]) == 1 and r["seconds_per_step"] > 0
        assert r["tokens_per_s"] == pytest.approx(16 / r["seconds_per_step"])
        assert r["tokens_per_s_per_process"] == pytest.approx(r["tokens_per_s"])
        assert r["mfu"] is None  # CPU: no peak FLOPs
    assert res["train"]["model_tflops_per_step"] > 0
    tokens = res["tokens"]  # packed: computed = real, one micro-batch of both samples
    assert tokens["pack_sequences"] and tokens["budget"] == 4096 and tokens["alignment"] == 1
    assert tokens["real_tokens"] == tokens["computed_tokens"] == tokens["max_micro_batch_tokens"] == 16
    assert tokens["micro_batches_per_rank"] == 1 and tokens["padded_layout"]["computed_tokens"] == 16
