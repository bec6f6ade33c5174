"""``luffy-plan``: per-GPU memory of every TP / PP / VPP / DP layout of a training job (sequence parallelism on and off
at TP > 1; expert parallelism for an MoE model), and which ones fit.

examples:
  luffy-plan --model configs/luffy_qwen2.5_math_7b.yaml --nodes 2 --rollout-gpus 8        # the 7B recipe
  luffy-plan --model configs/luffy_qwen2.5_32b.yaml --nodes 4 --rollout-gpus 16 --vpp 0 2
  luffy-plan --model /models/Qwen2.5-7B/config.json --nodes 1 --gpu-mem-gb 141 --json plan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from luffy_megatron.config import DTYPES, ConfigError, TokenDispatcher, choices
from luffy_megatron.plan.search import GB, PlanInputs, plan
from luffy_megatron.plan.shapes import load_shape

COLUMNS = ("weights", "grads", "master_weights", "adam", "activations", "logprob_chunk", "comm_buffers", "reserve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="luffy-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF config.json / model folder, or a recipe YAML (its settings too)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--rollout-gpus", type=int, default=0, help="GPUs of the job that serve rollouts, not training")
    p.add_argument("--rollout-tp", type=int, nargs="+", default=None, help="SGLang server TP sizes to price")
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--response-len", type=int)
    p.add_argument("--micro-batch-tokens", type=int, help="token budget of one micro-batch (rows x longest row)")
    p.add_argument("--samples-per-step", type=int, help="samples per optimiser step (mini-batch prompts x n)")
    p.add_argument("--no-dist-opt", action="store_true", help="without the distributed optimizer")
    p.add_argument("--recompute", choices=("on", "off"), help="full activation recomputation")
    p.add_argument(
        "--attention",
        choices=("flash", "unfused"),
        default="flash",
        help="flash: transformer-engine (GPU); unfused: megatron's local spec (CPU)",
    )
    p.add_argument("--vpp", type=int, nargs="+", default=[0], help="virtual stages to try (0 = not interleaved)")
    p.add_argument(
        "--sp",
        choices=("on", "off", "both"),
        default="both",
        help="sequence parallelism at TP > 1: price each layout with it (on), without (off), or both (default)",
    )
    p.add_argument(
        "--moe-dispatcher",
        choices=choices(TokenDispatcher),
        help="an MoE model's token dispatcher (default: the recipe's parallel.moe_token_dispatcher, else alltoall)",
    )
    p.add_argument("--reserve-gb", type=float, default=3.0, help="per GPU for CUDA context, NCCL, fragmentation")
    p.add_argument("--json", help="write the whole plan here")
    p.add_argument("--all", action="store_true", help="list every infeasible layout (default: the first 12)")
    return p


def inputs(args: argparse.Namespace, recipe) -> PlanInputs:
    """Command line over recipe over defaults."""
    inp = PlanInputs(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_mem_gb=args.gpu_mem_gb,
        rollout_gpus=args.rollout_gpus,
        reserve_gb=args.reserve_gb,
        vpp=[v or None for v in args.vpp],
        sequence_parallel=args.sp,
        flash_attention=args.attention == "flash",
        fp32_norms=args.attention == "unfused",
    )
    if recipe is not None:
        r = recipe
        inp.dtype, inp.recompute = r.model.dtype, r.model.recompute_activations
        inp.prompt_len, inp.response_len = r.data.max_prompt_length, r.data.max_response_length
        inp.micro_batch_tokens = r.parallel.max_tokens_per_micro_batch
        inp.samples_per_optimizer_step = r.data.mini_batch_size * r.rollout.n
        inp.dist_opt = r.parallel.use_distributed_optimizer
        inp.logprob_chunk_tokens = r.algorithm.logprob_chunk_tokens
        inp.rollout_tp = [r.rollout.sglang.tp_size]
        inp.rollout_mem_fraction = r.rollout.sglang.mem_fraction_static
        inp.moe_dispatcher = r.parallel.moe_token_dispatcher
    given = {
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "micro_batch_tokens": args.micro_batch_tokens,
        "samples_per_optimizer_step": args.samples_per_step,
        "rollout_tp": args.rollout_tp,
        "moe_dispatcher": args.moe_dispatcher,
    }
    for key, value in given.items():
        if value is not None:
            setattr(inp, key, value)
    if args.no_dist_opt:
        inp.dist_opt = False
    if args.recompute:
        inp.recompute = args.recompute == "on"
    for f in fields(inp):
        value = getattr(inp, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"--{f.name.replace('_', '-')}: must be >= 0, got {value}")
    if inp.train_gpus < 1:
        raise ConfigError(f"--rollout-gpus {inp.rollout_gpus} leaves no GPU for training")
    return inp


def render(result: dict, show_all: bool) -> str:
    """The feasible layouts (best first) with the per-GPU breakdown in GiB, then the infeasible ones with reasons."""
    inp = result["inputs"]
    head = (
        f"{result['model']['name']}: {result['params'] / 1e9:.2f}B parameters; "
        f"{inp['nodes']} x {inp['gpus_per_node']} GPUs of {inp['gpu_mem_gb']:g} GiB, {inp['rollout_gpus']} for "
        f"rollouts; {inp['dtype']}, micro-batch {inp['micro_batch_tokens']} tokens, sequences up to "
        f"{inp['prompt_len'] + inp['response_len']}, recompute {'on' if inp['recompute'] else 'off'}, "
        f"distributed optimizer {'on' if inp['dist_opt'] else 'off'}, sequence parallelism at TP > 1: "
        f"{inp['sequence_parallel']}"
    )
    model = result["model"]
    if model["experts"]:
        head += f"; {model['experts']} experts, top-{model['topk']}, {inp['moe_dispatcher']} dispatcher"
    lines = [
        head,
        "",
        "| rank | TP | SP | PP | VPP | DP | EP | " + " | ".join(COLUMNS) + " | total GiB | step time |",
        "|---" * (len(COLUMNS) + 9) + "|",
    ]
    for r in result["feasible"]:
        mem = r["memory"]
        cells = [f"{mem[c] / GB:.2f}" for c in COLUMNS]
        lines.append(
            f"| {r['rank']} | {r['tp']} | {_sp(r)} | {r['pp']} | {r['vpp'] or '-'} | {r['dp']} | {r['ep']} | "
            + " | ".join(cells)
            + f" | {mem['total'] / GB:.2f} | {r['step_time_factor']:.2f} |"
        )
    if not result["feasible"]:
        lines.append("| - | no layout fits |" + " |" * (len(COLUMNS) + 8))
    bad = result["infeasible"] if show_all else result["infeasible"][:12]
    lines += ["", "Infeasible:"] + [
        f"- TP {r['tp']} SP {_sp(r)} PP {r['pp']} VPP {r['vpp'] or '-'} DP {r['dp']} EP {r['ep'] or '-'}: "
        + "; ".join(r["reasons"])
        for r in bad
    ]
    if len(bad) < len(result["infeasible"]):
        lines.append(f"- ... {len(result['infeasible']) - len(bad)} more (--all)")
    for r in result["rollout"]:
        lines.append(
            f"Rollout server TP {r['tp']}: weights {r['weights_per_gpu'] / GB:.1f} GiB per GPU, KV cache "
            f"{r['kv_bytes_per_token'] / 1024:.0f} KiB per token, {r['kv_tokens']:,} tokens in the static "
            f"fraction" + (f" ({r['reason']})" if "reason" in r else "")
        )
    return "\n".join(lines) + "\n"


def _sp(row: dict) -> str:
    """A layout's sequence parallelism as the table shows it (- at TP 1, where it does not apply)."""
    return "-" if row["tp"] == 1 or row["sp"] is None else ("on" if row["sp"] else "off")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        shape, recipe = load_shape(args.model)
        result = plan(shape, inputs(args, recipe))
    except ConfigError as e:
        print(f"luffy-plan: error: {e}", file=sys.stderr)
        return 2
    print(render(result, args.all), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
