"""Build one rank of a model at full size on the meta device and report what Megatron allocates (JSON on stdout).

``python tests/plan_meta_worker.py HF_CONFIG_JSON TP PP VPP|0 WORLD RANK[,RANK...] DIST_OPT(0/1) DTYPE [EP]``. For each
RANK the process joins a fake process group of WORLD ranks as RANK (collectives are no-ops), so megatron-core's real
model, DDP and optimizer code run for that rank while every tensor they create lives on the meta device (no memory is
used). One ``RESULT {json}`` line per rank; its ``buffers`` are every chunk's dense then expert-parallel buffers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CUDA_TYPES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float16: "torch.cuda.HalfTensor",
}


class MetaMode(TorchFunctionMode):
    """Every explicit device becomes ``meta``; ``.cuda()`` is a no-op; meta tensors answer ``type()`` as CUDA ones
    (the check megatron's optimizers make). With ``redirect=False`` only the ``type()`` answer applies."""

    def __init__(self, redirect: bool = True) -> None:
        super().__init__()
        self.redirect = redirect

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].is_meta:
            return _CUDA_TYPES[args[0].dtype]
        if self.redirect and "device" in kwargs:
            kwargs["device"] = "meta"
        if self.redirect and func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def measure(
    hf_path: str, tp: int, pp: int, vpp_n: int | None, world: int, rank: int, use: bool, dtype: str, ep: int = 1
) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from luffy_megatron.models.builder import build_gpt_model, build_transformer_config, model_spec

    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp_n, expert_model_parallel_size=ep)
    hf = json.loads(Path(hf_path).read_text())
    spec = model_spec(hf, tp=tp)
    half = dtype != "float32"
    sp = tp > 1 and spec.family.moe_config is not None  # megatron builds MoE layers under TP only with SP
    with torch.device("meta"), MetaMode():
        cfg = build_transformer_config(
            spec, tp=tp, pp=pp, vpp=vpp_n, dtype=dtype, ep=ep, sequence_parallel=sp, perform_initialization=False
        )
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use
        )
        chunks = build_gpt_model(spec, cfg, use_transformer_engine=False, ddp_config=ddp)
    with MetaMode(redirect=False):
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-6,
                bf16=dtype == "bfloat16",
                params_dtype=cfg.params_dtype,
                use_distributed_optimizer=use,
            ),
            chunks,
        )
    out = {"weights": 0, "grads": 0, "master_weights": 0, "adam": 0, "buffers": []}
    for c in chunks:
        for b in c.buffers + c.expert_parallel_buffers:
            out["buffers"].append([str(b.param_dtype).removeprefix("torch."), b.numel])
            out["grads"] += b.grad_data.numel() * b.grad_data.element_size()
            if use:
                out["weights"] += b.param_data.numel() * b.param_data.element_size()
        if not use:
            out["weights"] += sum(p.numel() * p.element_size() for p in c.parameters())
    for o in getattr(opt, "chained_optimizers", [opt]):
        o.init_state_fn(o.optimizer, o.config)
        for state in o.optimizer.state.values():
            out["adam"] += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        if half:
            groups = o.shard_fp32_from_float16_groups if use else o.fp32_from_float16_groups
            out["master_weights"] += sum(p.numel() * p.element_size() for g in groups for p in g)
    out["pp_rank"], out["dp_rank"] = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return out


def main(argv: list[str]) -> None:
    from luffy_megatron.platform import setup_platform

    hf_path, tp, pp, vpp, world, ranks, dist_opt, dtype, *ep = argv
    setup_platform()
    new_group = dist.new_group
    dist.new_group = lambda *a, **k: new_group(*a, **{x: y for x, y in k.items() if x != "backend"})  # no gloo
    for rank in ranks.split(","):
        res = measure(
            hf_path, int(tp), int(pp), int(vpp) or None, int(world), int(rank), dist_opt == "1", dtype, int(*ep or [1])
        )
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
