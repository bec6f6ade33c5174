"""Shared by the CPU test stand-ins in this folder: a package whose every name and submodule imports, and whose every
name raises when called, so a use the stand-in does not cover fails loudly instead of computing something wrong."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any


class Missing:
    """A name of the stood-in package: its attributes are names too (constants such as ``InterpolationMode.NEAREST``
    are read at import time, e.g. as dict keys), and calling one raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._name} is not provided by the CPU test stand-in (tests/sglang_cpu)")

    def __repr__(self) -> str:
        return f"<CPU test stand-in {self._name}>"


class StandInModule(types.ModuleType):
    """A submodule of the stood-in package."""

    def __getattr__(self, name: str) -> Missing:
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing(f"{self.__name__}.{name}")


class _Loader:
    @staticmethod
    def create_module(spec: Any) -> types.ModuleType:
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    @staticmethod
    def exec_module(module: types.ModuleType) -> None:
        return None


def stand_in(package: str) -> None:
    """Make ``import package.<anything>`` give a :class:`StandInModule`."""

    class Finder:
        @staticmethod
        def find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
            if fullname.startswith(package + "."):
                return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
            return None

    sys.meta_path.append(Finder())
