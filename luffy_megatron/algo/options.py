"""The option tables of the loss: each maps a config name to the function the loss calls for it.

The names are the members of :class:`~luffy_megatron.config.Reshape` and :class:`~luffy_megatron.config.KLType`, which
the config checks accept; every table covers its enumeration (``tests/test_config.py``). The formulas are in
:mod:`luffy_megatron.algo.loss`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from luffy_megatron.config import AlgorithmConfig, KLType, Reshape, choices

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
ON_POLICY_RESHAPES: dict[Reshape, Callable[[Tensor, Tensor, AlgorithmConfig], Tensor]] = {
    Reshape.NO_RESHAPE: _on_no_reshape,
    Reshape.P_DIV_P: _on_p_div_p,
    Reshape.LOGP: _on_logp,
    Reshape.P_LOGP: _on_p_logp,
    Reshape.SQUARE_ROOT: _on_square_root,
    Reshape.POW: _on_pow,
}
#: ``algorithm.off_policy_reshape`` -> f(logp, config), the shaped off-policy probability (same names).
OFF_POLICY_RESHAPES: dict[Reshape, Callable[[Tensor, AlgorithmConfig], Tensor]] = {
    Reshape.NO_RESHAPE: _off_no_reshape,
    Reshape.P_DIV_P: _off_p_div_p,
    Reshape.LOGP: _off_logp,
    Reshape.P_LOGP: _off_p_logp,
    Reshape.SQUARE_ROOT: _off_square_root,
    Reshape.POW: _off_pow,
}
#: The reshape names both sides accept.
RESHAPES = choices(Reshape)


def _kl_k1(logp: Tensor, ref: Tensor) -> Tensor:
    return logp - ref


def _kl_k3(logp: Tensor, ref: Tensor) -> Tensor:
    d = ref - logp  # verl's low_var_kl
    return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)


#: ``algorithm.kl_type`` -> per-token KL estimate kl(logp, ref_logp).
KL_PENALTIES: dict[KLType, Callable[[Tensor, Tensor], Tensor]] = {KLType.K1: _kl_k1, KLType.K3: _kl_k3}
