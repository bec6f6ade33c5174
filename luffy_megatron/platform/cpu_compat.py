"""Run megatron-core on CPU: the compatibility layer.

megatron-core has no CPU mode. These patches let its real code paths (GPTModel, tensor/pipeline parallel mappings,
pipeline schedules, DDP, optimizers, dist_checkpointing) run on CPU with the gloo backend. They are applied by
:func:`apply_cpu_patches`, called from exactly one place (:func:`luffy_megatron.platform.setup_platform`), and are a
no-op when CUDA is available. Each patch names the failure it fixes. (Making ``import megatron.core`` work without
triton is done earlier, for every process, by ``luffy_megatron/megatron_import.py``.)
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions (torch.cuda.current_device() returns one).
    return isinstance(device, int) and not isinstance(device, bool)


_CPU_TYPE_TO_CUDA = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU inside torch calls.

    Fixes: ``device="cuda"`` literals (pipeline schedules' token counter, optimizer and clip_grads buffers),
    ``device=torch.cuda.current_device()`` (~90 call sites: attention buffers, rotary embeddings, TP mappings),
    ``.cuda()`` (tied embeddings under PP), ``.to("cuda")``; and makes ``Tensor.type()`` answer ``torch.cuda.*``
    for CPU float tensors, which megatron's optimizers and clip_grads compare against (``param.type() ==
    'torch.cuda.FloatTensor'``) before accepting a parameter.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_TO_CUDA.get(name, name)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NullStream:
        return self

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _patch_rng_tracker() -> None:
    """Fixes the CUDA RNG tracker (``model_parallel_cuda_manual_seed``, dropout under ``get_cuda_rng_tracker().fork()``)
    calling ``torch.cuda.get_rng_state`` / ``default_generators``: its states become CPU generator states, so
    per-TP-rank dropout streams still work."""
    # Lazy, like every megatron-core import of the platform layer (see distributed.init_model_parallel).
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_shape_exchange() -> None:
    """Fixes swapped shapes under ``variable_seq_lengths`` on gloo: megatron exchanges the next activation's and the
    previous gradient's shapes with ``batch_isend_irecv`` on one group, and at PP = 2 both go to the same peer, where
    gloo matches them in posting order (the peer receives the gradient's shape as the activation's). The shapes now
    travel through megatron's own unbatched ``_p2p_ops``, which puts the two directions on different groups, as
    ``batch_p2p_comm=False`` (see models.builder) does for the tensors themselves."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    def communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        def shape(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.tensor(t.size(), dtype=torch.int64)

        recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
        recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
        reqs = p2p._p2p_ops(
            tensor_send_prev=shape(tensor_send_prev),
            tensor_recv_prev=recv_prev_shape,
            tensor_send_next=shape(tensor_send_next),
            tensor_recv_next=recv_next_shape,
            group=self.pp_group,
            prev_pipeline_rank=self.prev_rank,
            next_pipeline_rank=self.next_rank,
        )
        for req in reqs.values():
            req.wait()
        return tuple([0, 0, 0] if t is None else t.tolist() for t in (recv_prev_shape, recv_next_shape))

    p2p.P2PCommunicator._communicate_shapes = communicate_shapes


def _patch_backward_engine() -> None:
    """Fixes CUDA placements anywhere in a backward pass (megatron's tensor-parallel and expert-parallel autograd
    functions allocate on ``torch.cuda.current_device()`` there; recomputed forwards run there too): the backward
    entry points ``torch.autograd.backward`` / ``grad`` / ``Tensor.backward`` are dispatched to
    :class:`_CudaToCpuMode`, whose handler runs with the mode off, and the autograd engine keeps the modes active
    when it starts for every node and hook it runs. Both entry points start the engine through
    ``torch.autograd._engine_run_backward``, which now re-enters the mode (torch.compiler patches it the same way)."""
    import torch.autograd.graph

    engine_run = torch.autograd.graph._engine_run_backward

    @functools.wraps(engine_run)
    def run_in_cpu_mode(*args: Any, **kwargs: Any):
        with _CudaToCpuMode():
            return engine_run(*args, **kwargs)

    torch.autograd.graph._engine_run_backward = run_in_cpu_mode
    torch.autograd._engine_run_backward = run_in_cpu_mode  # type: ignore[attr-defined]


def _patch_moe_split_sizes() -> None:
    """Fixes ``all_to_all_single(): incompatible function arguments`` of the alltoall MoE dispatcher under expert
    parallelism: ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` makes the split sizes numpy arrays for CUDA tensors
    only, and torch's collective takes no tensor as a list of sizes. CPU tensors now become numpy arrays too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu  # imported by name


def _patch_uneven_collectives() -> None:
    """Fixes ``ProcessGroupGloo::allgather: invalid tensor size`` of the alltoall MoE dispatcher under TP: megatron
    gathers and reduce-scatters the routed tokens of the TP ranks in blocks of different sizes with torch's list
    collectives, which gloo runs only for equal blocks (NCCL for any). Uneven blocks now travel padded to the largest
    (all-gather) or summed whole (reduce-scatter: an all-reduce of the concatenation, each rank keeping its block)."""
    import torch.distributed as dist

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    @functools.wraps(all_gather)
    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] for t in tensor_list]
        if async_op or len(set(rows)) == 1:
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        width = max(rows)
        padded = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor
        out = torch.empty((width * len(rows), *tensor.shape[1:]), dtype=tensor.dtype)
        dist.all_gather_into_tensor(out, padded, group=group)
        for i, (t, n) in enumerate(zip(tensor_list, rows)):
            t.copy_(out[i * width : i * width + n])
        return None

    @functools.wraps(reduce_scatter)
    def reduce_scatter_uneven(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        whole = torch.cat(input_list)
        dist.all_reduce(whole, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(whole[start : start + input_list[rank].shape[0]])
        return None

    dist.all_gather, dist.reduce_scatter = all_gather_uneven, reduce_scatter_uneven


def apply_cpu_patches() -> None:
    """Apply every patch once, and only when CUDA is unavailable."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    # Fixes torch.cuda.current_device() raising "Torch not compiled with CUDA": callers pass the ordinal on as a
    # device, which _CudaToCpuMode maps to the CPU.
    torch.cuda.current_device = lambda: 0
    # Fixes torch.cuda.synchronize() in p2p communication and the async checkpoint writer.
    torch.cuda.synchronize = lambda device=None: None
    # Fixes torch.cuda.current_stream()/Stream/Event/stream() in DDP grad buffers and the p2p/overlap code.
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()
    torch.cuda.Stream = _NullStream  # type: ignore[misc,assignment]
    torch.cuda.Event = _NullStream  # type: ignore[misc,assignment]
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # Fixes memory reports (torch.cuda.memory_allocated etc.) in megatron's logging helpers.
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = lambda device=None: 0
    _patch_rng_tracker()
    _patch_shape_exchange()
    _patch_backward_engine()
    _patch_moe_split_sizes()
    _patch_uneven_collectives()
    _CudaToCpuMode().__enter__()
    _APPLIED = True
