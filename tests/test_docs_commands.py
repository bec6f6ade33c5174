"""Every command line in README.md and docs/*.md that runs a tool (``python tools/X.py``), an entry point
(``luffy-train``) or a module under torchrun (``torchrun ... -m luffy_megatron...``) is checked against the code: its
arguments go through the real argument parser, which stops the program right after parsing (a dry run), so a renamed
tool, flag or choice fails here. ``luffy-train`` lines whose config file exists also run ``--print-config``, which
merges the overrides into the typed config tree, so a renamed config key fails too. Placeholders (``CONFIG``, ``DIR``,
``...``, ``[optional]`` brackets) are allowed where the parser accepts any value.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENTRY_POINTS = {"luffy-train": "luffy_megatron.train.cli"}  # setup.py's console_scripts
START = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(?:srun\s+)?(python\s+(?:-m\s+luffy_megatron|tools/)|luffy-train(?=\s|$)|torchrun\s)"
)


def _commands(text: str) -> list[str]:
    """Command lines in fenced code blocks (continuations joined, comments dropped) and in inline code spans."""
    found: list[str] = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            found.append(re.sub(r"\s+#.*$", "", line).strip())
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", rest)]
    return [c for c in found if START.match(c) and ("tools/" in c or "luffy_megatron" in c or "luffy-train" in c)]


def _doc_commands() -> list[tuple[str, str]]:
    return [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in _commands(doc.read_text())]


COMMANDS = _doc_commands()


class _Parsed(Exception):
    """Raised right after a successful parse: the dry run stops before the program does any work."""


@contextlib.contextmanager
def _stop_after_parsing():
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = original(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed

    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def _target(tokens: list[str]) -> tuple[str, str, list[str]]:
    """(kind "module" | "script", name, arguments) of a command line, checking torchrun's own flags on the way."""
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens = tokens[1:]
    if tokens[0] == "srun":
        tokens = tokens[1:]
    if tokens[0] == "torchrun":
        run = get_args_parser().parse_args(tokens[1:])
        kind = "module" if run.module else "script"
        return kind, run.training_script, list(run.training_script_args)
    if tokens[0] == "python":
        return ("module", tokens[2], tokens[3:]) if tokens[1] == "-m" else ("script", tokens[1], tokens[2:])
    return "module", ENTRY_POINTS[tokens[0]], tokens[1:]


def _dry_run(kind: str, name: str, args: list[str]) -> int:
    """Exit status of parsing ``args`` with the program's own parser (0: parsed; argparse's 2: rejected)."""
    saved = sys.argv[:]
    sys.argv = [name, *args]
    try:
        with _stop_after_parsing():
            if kind == "module":
                sys.modules.pop(name, None)  # run it as __main__, not on top of an imported copy
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / name), run_name="__main__")
    except _Parsed:
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    return 1  # the program ran to its end without parsing arguments


def test_the_docs_have_commands_of_every_kind():
    kinds = {cmd.split()[0] for _, cmd in COMMANDS}
    assert {"python", "luffy-train", "torchrun"} <= kinds, kinds
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    tokens = [t for t in shlex.split(command.replace("[", " ").replace("]", " ")) if t != "..."]
    kind, name, args = _target(tokens)
    status = _dry_run(kind, name, args)
    assert status == 0, f"{doc}: `{command}` is rejected by the program's parser:\n{capsys.readouterr().err[-1500:]}"
    if name == ENTRY_POINTS["luffy-train"] and args and (ROOT / args[0]).is_file():
        from luffy_megatron.train.cli import main

        assert main([a for a in args if a != "--print-config"] + ["--print-config"]) == 0, capsys.readouterr().err
