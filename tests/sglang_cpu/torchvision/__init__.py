"""Test scaffolding for a CPU machine: an import-level stand-in for ``torchvision``.

SGLang imports torchvision unconditionally (``import torchvision.transforms as T`` in its multimodal helpers); the
registry's torchvision wheels need a CUDA torch. A text-only model never uses it: every submodule and name imports,
and calling any of them raises (see ``_standin.py``).
"""

from __future__ import annotations

from _standin import Missing, stand_in

__version__ = "0.0.0+cpu-test-stand-in"


def __getattr__(name: str) -> Missing:
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(f"torchvision.{name}")


stand_in(__name__)
