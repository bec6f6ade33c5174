"""The planner against real Megatron policy updates on CPU (fp32, gloo), at 9 layouts of two small model shapes
(sequence parallelism on and off at TP 2) and 3 of a small MoE (EP 1 and 2, TP 2 with SP).

Per rank: the static bytes (weights, gradient buffers, Adam moments) must equal the planner's exactly, and the peak of
activations autograd holds (saved-tensor hooks; see tests/plan_measure_worker.py) and the peak in total must be
within 15% of its prediction. The distributed optimizer cannot step on CPU (gloo has no reduce-scatter; the policy
turns it off there), so its static bytes are checked at full size on the meta device (test_plan_meta.py); it does not
change activations.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from luffy_megatron.plan.memory import Layout, MicroBatch, activation_bytes, static_bytes
from luffy_megatron.plan.shapes import ModelShape
from tests.dist_utils import run_distributed
from tests.plan_measure_worker import measure_step

pytestmark = pytest.mark.slow
SHAPES = {
    "qwen2": dict(
        family="qwen2", vocab_size=397, hidden_size=128, layers=4, heads=8, kv_heads=2, intermediate_size=320
    ),
    "llama": dict(
        family="llama",
        vocab_size=300,
        hidden_size=96,
        layers=4,
        heads=4,
        kv_heads=4,
        intermediate_size=256,
        tie_embeddings=True,
    ),
    "qwen3_moe": dict(
        family="qwen3_moe",
        vocab_size=397,
        hidden_size=128,
        layers=4,
        heads=8,
        kv_heads=2,
        intermediate_size=320,
        moe=dict(num_experts=8, moe_intermediate_size=64),
    ),
}
SAMPLES, LENGTH, BUDGET = 16, 256, 1024  # 4 rows of 256 tokens per micro-batch
# (shape, tp, pp, vpp, dp, recompute, sequence parallel). Recomputation does not run on CPU (megatron's checkpointing
# asks for CUDA).
LAYOUTS = [
    ("qwen2", 1, 1, None, 1, False, False),
    ("qwen2", 2, 1, None, 1, False, True),
    ("qwen2", 2, 1, None, 1, False, False),
    ("qwen2", 1, 2, None, 1, False, False),
    ("qwen2", 1, 1, None, 2, False, False),
    ("qwen2", 2, 2, None, 1, False, True),
    ("qwen2", 2, 2, None, 1, False, False),
    ("llama", 1, 2, 2, 1, False, False),
    ("llama", 2, 1, None, 1, False, True),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from luffy_megatron.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("plan")
    return {name: make_tiny_model(root / name, seed=0, **kw) for name, kw in SHAPES.items()}


# The MoE shape (QK-norm, 8 experts, top-2): expert parallelism and TP with SP. (shape, tp, pp, vpp, dp, recompute,
# sequence parallel, ep)
MOE_LAYOUTS = [
    ("qwen3_moe", 1, 1, None, 1, False, False, 1),
    ("qwen3_moe", 1, 1, None, 2, False, False, 2),
    ("qwen3_moe", 2, 1, None, 1, False, True, 1),
]


@pytest.mark.parametrize(
    "layout",
    LAYOUTS + MOE_LAYOUTS,
    ids=lambda x: "{}-tp{}-pp{}-vpp{}-dp{}-rec{}-sp{}-ep{}".format(*x, 1),
)
def test_measured_peak_memory_matches_the_plan(layout, models):
    name, tp, pp, vpp, dp, recompute, sp, ep = (*layout, 1)[:8]
    hf_dir = models[name]
    lengths = [LENGTH] * SAMPLES
    results = run_distributed(
        measure_step, tp * pp * dp, str(hf_dir), tp, pp, vpp, recompute, lengths, BUDGET, sp, ep, timeout_s=900
    )
    shape = ModelShape.from_hf(json.loads((hf_dir / "config.json").read_text()))
    lay = Layout(tp, pp, dp, vpp, dist_opt=False, sp=sp, ep=ep)
    rows = []
    for r in results:
        planned = static_bytes(shape, lay, r["pp_rank"], r["dp_rank"], "float32", fp32_norms=True)
        assert (r["weights"], r["grads"], r["optimizer"]) == (planned["weights"], planned["grads"], planned["adam"])
        num_mb = SAMPLES // dp * LENGTH // BUDGET
        mb = MicroBatch(BUDGET, LENGTH)
        act = activation_bytes(shape, lay, r["pp_rank"], mb, num_mb, 4, recompute, flash=False)
        static = r["weights"] + r["grads"] + r["optimizer"]
        measured, predicted = static + r["activations"], static + act
        rows.append((r["tp_rank"], r["pp_rank"], r["dp_rank"], static, r["activations"], act, measured, predicted))
        assert abs(act / r["activations"] - 1) < 0.15, rows[-1]
        assert abs(predicted / measured - 1) < 0.15, rows[-1]
    for row in rows:  # the table in docs/plan.md (pytest -s)
        print(
            "|", " | ".join(map(str, (*layout, *row))), f"| {row[5] / row[4] - 1:+.1%} | {row[7] / row[6] - 1:+.1%} |"
        )


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2-sp"])
def test_the_plan_bounds_a_realistic_length_mix(tp, models):
    """Sequences of 60..1536 tokens (log-uniform, as responses of 50 tokens to the length limit), packed by the
    policy: the planner prices the worst micro-batch, padded to the budget with the longest sequence. At TP 2 with
    SP the packed rows are padded to even lengths (most of these lengths are odd)."""
    rng = random.Random(3)
    lengths = [int(math.exp(rng.uniform(math.log(60), math.log(1536)))) for _ in range(40)] + [1536]
    budget, sp = 3072, tp > 1
    hf_dir = models["qwen2"]
    results = run_distributed(measure_step, tp, str(hf_dir), tp, 1, None, False, lengths, budget, sp, timeout_s=900)
    shape = ModelShape.from_hf(json.loads((hf_dir / "config.json").read_text()))
    lay = Layout(tp, 1, 1, None, dist_opt=False, sp=sp)
    act = activation_bytes(shape, lay, 0, MicroBatch(budget, max(lengths)), 8, 4, False, flash=False)
    for r in results:
        print(f"length mix TP {tp}: measured {r['activations']} predicted {act} ({act / r['activations'] - 1:+.1%})")
        assert abs(act / r["activations"] - 1) < 0.15
