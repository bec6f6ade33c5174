"""House rules over the whole package, read as source: file and function sizes, formatting never switched off, and
every enumeration of names written once.

An enumeration is a tuple, list, set or frozenset literal of two or more strings, the string keys of a dict literal,
or the values of an ``Enum`` class. Two with the same set of names are one list kept twice: define it once (see
``luffy_megatron/config.py``'s option enumerations) and derive the other from it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "luffy_megatron"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 90
# "path" -> why it is longer than MAX_FILE_LINES (it must still stay under MAX_NAMED_FILE_LINES).
LONG_FILES: dict[str, str] = {
    "luffy_megatron/config.py": "the one typed configuration tree: every key with its comment and every option family",
}
MAX_NAMED_FILE_LINES = 500
# "path:function" -> why it is longer than MAX_FUNCTION_LINES. Empty: none is.
LONG_FUNCTIONS: dict[str, str] = {}


def sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_file_over_the_limit():
    lines = {path: text.count("\n") for path, text in sources().items()}
    long = {path: n for path, n in lines.items() if n > MAX_FILE_LINES and path not in LONG_FILES}
    assert long == {}, f"files over {MAX_FILE_LINES} lines: {long}"
    named = {path: lines[path] for path in LONG_FILES if lines[path] > MAX_NAMED_FILE_LINES}
    assert named == {}, f"files over {MAX_NAMED_FILE_LINES} lines even with a reason: {named}"


def test_no_function_over_the_limit():
    found = {}
    for path, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[f"{path}:{node.name}"] = lines
    unexplained = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
    assert unexplained == {}, f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}"
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert stale == [], f"LONG_FUNCTIONS lists functions that are now short enough (remove them): {stale}"


def test_formatting_is_never_switched_off():
    """Every Python file is formatted as ruff formats it: no statement is squeezed onto one line to pass the line
    rules (the file rule above names its exceptions instead)."""
    marker = "# fmt: " + "skip"
    root = PACKAGE.parent
    found = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("luffy_megatron", "tools", "tests", "examples")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith(marker)
    ]
    assert found == [], f"{marker} in {found}"


def enumerations(tree: ast.Module) -> list[tuple[int, frozenset[str]]]:
    """(line, names) of every enumeration in a module (see the module docstring)."""
    out = []
    tables = {id(n.value) for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign)) and _at_top(tree, n)}
    for node in ast.walk(tree):
        names: list = []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            names = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            names = names if len(names) == len(node.elts) else []
        elif isinstance(node, ast.Dict) and id(node) in tables:  # a table; dicts inside functions are records
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            names = keys if len(keys) == len(node.keys) else []
        elif isinstance(node, ast.ClassDef) and any(getattr(b, "id", "").endswith("Enum") for b in node.bases):
            members = [s.value for s in node.body if isinstance(s, ast.Assign)]
            names = [m.value for m in members if isinstance(m, ast.Constant)]
        names = [n for n in names if any(ch.isalnum() for ch in n)]  # not punctuation such as (".", "/")
        if len(set(names)) >= 2:
            out.append((node.lineno, frozenset(names)))
    return out


def _at_top(tree: ast.Module, node: ast.AST) -> bool:
    """Whether an assignment is at module or class level (not inside a function)."""
    return node in tree.body or any(isinstance(c, ast.ClassDef) and node in c.body for c in tree.body)


def test_no_enumeration_is_written_twice():
    places = defaultdict(list)
    for path, text in sources().items():
        for line, names in enumerations(ast.parse(text)):
            places[names].append(f"{path}:{line}")
    twice = {tuple(sorted(names)): where for names, where in places.items() if len(where) > 1}
    assert twice == {}, f"the same names listed in several places: {twice}"


def test_the_scan_sees_enumerations():
    """The scanner finds each kind it claims to and skips records and punctuation (so an empty result above means
    something)."""
    tree = ast.parse(
        "A = ('x', 'y')\n"
        "B = Literal['x', 'y']\n"
        "C = {'x': 1, 'y': 2}\n"
        "class D(str, Enum):\n    X = 'x'\n    Y = 'y'\n"
        "E = ('x', 1)\n"
        "def f():\n    return {'x': 1, 'y': 2}, ('.', '/')\n"
    )
    assert sorted(line for line, names in enumerations(tree) if names == {"x", "y"}) == [1, 2, 3, 4]
    assert len(enumerations(tree)) == 4
