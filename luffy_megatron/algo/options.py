"""The option tables of the loss: each maps a config name to the function the loss calls for it.

The config validation (:mod:`luffy_megatron.config_checks`) accepts exactly these names, so a new entry here is a new
valid ``algorithm.*`` value; the formulas are in :mod:`luffy_megatron.algo.loss`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from luffy_megatron.config import AlgorithmConfig

__all__ = ["KL_PENALTIES", "OFF_POLICY_RESHAPES", "ON_POLICY_RESHAPES", "RESHAPES"]


def _on_no_reshape(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.exp(logp - old_logp)


def _on_logp(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return logp - old_logp


def _on_p_logp(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    d = logp - old_logp
    return torch.exp(d) + c.on_policy_reshape_gamma * d


def _on_square_root(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.sqrt(torch.exp(logp - old_logp))


def _on_pow(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.pow(torch.exp(logp - old_logp), c.on_policy_reshape_pow_exp)


def _on_p_div_p(logp: Tensor, old_logp: Tensor, c: AlgorithmConfig) -> Tensor:
    g = c.on_policy_reshape_gamma
    p, p_old = torch.exp(logp), torch.exp(old_logp)
    return (p / (p + g)) / (p_old / (p_old + g))


def _off_no_reshape(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.exp(logp)


def _off_logp(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return logp * c.off_policy_reshape_gamma


def _off_p_logp(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return logp * c.off_policy_reshape_gamma + torch.exp(logp)


def _off_square_root(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.sqrt(torch.exp(logp))


def _off_pow(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    return torch.pow(torch.exp(logp), c.off_policy_reshape_pow_exp)


def _off_p_div_p(logp: Tensor, c: AlgorithmConfig) -> Tensor:
    p = torch.exp(logp)
    return p / (p + c.off_policy_reshape_gamma)


#: ``algorithm.on_policy_reshape`` -> r(logp, old_logp, config), the on-policy ratio (formulas in the module docstring).
ON_POLICY_RESHAPES: dict[str, Callable[[Tensor, Tensor, AlgorithmConfig], Tensor]] = {
    "no_reshape": _on_no_reshape,
    "p_div_p": _on_p_div_p,
    "logp": _on_logp,
    "p_logp": _on_p_logp,
    "square_root": _on_square_root,
    "pow": _on_pow,
}
#: ``algorithm.off_policy_reshape`` -> f(logp, config), the shaped off-policy probability (same names).
OFF_POLICY_RESHAPES: dict[str, Callable[[Tensor, AlgorithmConfig], Tensor]] = {
    "no_reshape": _off_no_reshape,
    "p_div_p": _off_p_div_p,
    "logp": _off_logp,
    "p_logp": _off_p_logp,
    "square_root": _off_square_root,
    "pow": _off_pow,
}
#: The reshape names both sides accept (the config validates against this).
RESHAPES: tuple[str, ...] = tuple(ON_POLICY_RESHAPES)


def _kl_k1(logp: Tensor, ref: Tensor) -> Tensor:
    return logp - ref


def _kl_k3(logp: Tensor, ref: Tensor) -> Tensor:
    d = ref - logp  # verl's low_var_kl
    return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)


#: ``algorithm.kl_type`` -> per-token KL estimate kl(logp, ref_logp).
KL_PENALTIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _kl_k1, "k3": _kl_k3}
