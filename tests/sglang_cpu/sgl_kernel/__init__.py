"""Test scaffolding for a CPU machine: an import-level stand-in for SGLang's ``sgl_kernel`` (CUDA-only wheels).

SGLang's CPU engine imports its kernels from ``sgl_kernel`` unconditionally. For a dense model on the ``torch_native``
attention backend it calls only :func:`assign_req_to_token_pool_cpu`, written here in plain torch. Every other name
(``from sgl_kernel import X``, ``sgl_kernel.sub.X``) imports and raises when called (see ``_standin.py``).
"""

from __future__ import annotations

import torch
from _standin import Missing, stand_in


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_len: int,
) -> None:
    """Write request ``i``'s slice of ``out_cache_loc`` into ``req_to_token[req_pool_indices[i], start:end]``.

    ``out_cache_loc`` holds the slices of every request one after another, in request order.
    """
    offset = 0
    for pool_index, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = end - start
        assert 0 <= start <= end <= max_len, (start, end, max_len)
        req_to_token[pool_index, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name: str) -> Missing:
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"sgl_kernel.{name}")


stand_in(__name__)
