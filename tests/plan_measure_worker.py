"""Measure one rank's memory in a real Megatron policy update on CPU (fp32, gloo), for the planner's validation.

What is measured (per rank, bytes):
* static: parameter storage, the DDP gradient buffers and the optimizer's states (fp32 master copies when the
  parameters are not fp32, Adam's moments), counted from the live objects after a warm-up step;
* activations: the peak, over the measured optimiser step, of the bytes of the distinct tensor storages autograd
  holds for backward (saved-tensor hooks: a storage counts from the first time it is saved until the last saved
  reference to it is released), parameters excluded.
``peak`` = static + activations: the memory a GPU would hold at the worst moment of the step, less temporaries that
live inside one operation (and the allocator's caching).
"""

from __future__ import annotations

import random
from typing import Any

import torch


class SavedTensorTracker:
    """Bytes of distinct storages held by autograd for backward, and their peak."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.refs, self.sizes = exclude, {}, {}
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or t.device.type == "meta" or key == 0:
            return t
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(self, key, t)

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held


class _Held:
    def __init__(self, tracker: SavedTensorTracker, key: int, tensor: torch.Tensor) -> None:
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self) -> None:
        self.tracker.release(self.key)


def _samples(lengths: list[int], vocab: int, seed: int):
    """One sample per length (a quarter prompt, the rest response) as a ``StepBatch``; every eighth is an off-policy
    trace."""
    from luffy_megatron.train.samples import Sample
    from luffy_megatron.train.step_batch import StepBatch

    rng = random.Random(seed)
    out = []
    for i, length in enumerate(lengths):
        prompt = [rng.randrange(vocab) for _ in range(max(1, length // 4))]
        resp = [rng.randrange(vocab) for _ in range(length - len(prompt))]
        off = i % 8 == 0
        lp = None if off else [-1.0] * len(resp)
        out.append(Sample(i, i // 8, prompt, resp, off, rollout_logprobs=lp, advantage=rng.choice([-1.0, 1.0])))
    return StepBatch.from_samples(out)


def static_bytes(policy) -> dict[str, int]:
    """Parameter storage, gradient buffers and optimizer state of this rank, from the live objects."""
    weights = sum(p.numel() * p.element_size() for c in policy.chunks for p in c.parameters())
    buffers = [b for c in policy.chunks for b in c.buffers + c.expert_parallel_buffers]
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    opt_bytes = 0
    for o in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for state in o.optimizer.state.values():
            opt_bytes += sum(t.numel() * t.element_size() for k, t in state.items() if k != "step")
    return {"weights": weights, "grads": grads, "optimizer": opt_bytes}


def measure_step(
    rank: int,
    world: int,
    hf_dir: str,
    tp: int,
    pp: int,
    vpp: int | None,
    recompute: bool,
    lengths: list[int],
    max_tokens: int,
    sequence_parallel: bool | None = None,
    ep: int = 1,
) -> dict:
    """One rank: build the policy, train one warm-up mini-batch, then measure the next one.

    ``sequence_parallel`` sets ``parallel.sequence_parallel`` (None: the config's default, on whenever TP > 1);
    ``ep`` is ``parallel.ep`` (an MoE model's expert parallelism).
    """
    from luffy_megatron.config import load_config, read_hf_config
    from luffy_megatron.models.builder import model_spec
    from luffy_megatron.platform import init_model_parallel, setup_platform

    setup_platform()
    init_model_parallel(tp, pp, vpp, seed=1, ep=ep)
    over = [
        f"parallel.ep={ep}",
        f"model.hf_path={hf_dir}",
        "model.dtype=float32",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"model.recompute_activations={recompute}",
        f"parallel.max_tokens_per_micro_batch={max_tokens}",
        "parallel.use_distributed_optimizer=false",
    ]
    if sequence_parallel is not None:
        over.append(f"parallel.sequence_parallel={str(sequence_parallel).lower()}")
    if vpp:
        over.append(f"parallel.vpp={vpp}")
    cfg = load_config(None, over)
    hf = read_hf_config(hf_dir)
    from luffy_megatron.train.policy import MegatronPolicy

    policy = MegatronPolicy(cfg, model_spec(hf, tp), pad_id=0)
    policy.train_mini_batch(_samples(lengths, hf["vocab_size"], seed=0), use_old_logprobs=False)
    static = static_bytes(policy)
    exclude = {p.untyped_storage().data_ptr() for c in policy.chunks for p in c.parameters()}
    tracker = SavedTensorTracker(exclude)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        policy.train_mini_batch(_samples(lengths, hf["vocab_size"], seed=1), use_old_logprobs=False)
    from megatron.core import parallel_state as ps

    return {
        **static,
        "activations": tracker.peak,
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
    }
