"""The embedded default corpus: the Python standard library's own documentation.

Module, class and function docstrings are read at run time from the installed interpreter's
standard library, by parsing its source files (``ast``), so nothing is imported or executed and
nothing is downloaded. Every machine with Python has it; the result is deterministic for a given
Python version.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sysconfig
from collections.abc import Iterator

# Tests, demos and vendored tools: not documentation of the library.
_SKIPPED_DIRS = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "ensurepip",
    "venv",
    "pydoc_data",
}


@dataclasses.dataclass(frozen=True)
class Docstring:
    """One document: ``title`` is the dotted name (``json.dumps``, ``collections.OrderedDict``)."""

    title: str
    text: str


def _docstrings_of(source: str, module: str) -> Iterator[Docstring]:
    tree = ast.parse(source)
    stack = [(tree, module)]
    while stack:
        node, name = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield Docstring(name, doc)
        children = [c for c in node.body if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend((child, f"{name}.{child.name}") for child in reversed(children))


def stdlib_docstrings(min_chars: int = 40, max_docs: int | None = None, root: str | None = None) -> list[Docstring]:
    """Docstrings of the standard library, in a stable order (module path, then source order).

    Args:
        min_chars: skip docstrings shorter than this (one-word stubs carry no content).
        max_docs: stop after this many documents (None: all of them, about 6,500 on Python 3.11).
        root: the library directory to read (default: the running interpreter's stdlib).
    """
    root = root or sysconfig.get_paths()["stdlib"]
    docs: list[Docstring] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for file in sorted(files):
            if not file.endswith(".py") or file.startswith("test_"):
                continue
            path = os.path.join(directory, file)
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            try:
                with open(path, encoding="utf-8") as handle:
                    source = handle.read()
                found = list(_docstrings_of(source, module))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a file this interpreter cannot parse is not documentation it ships
            for doc in found:
                if len(doc.text) >= min_chars:
                    docs.append(doc)
                    if max_docs is not None and len(docs) >= max_docs:
                        return docs
    return docs
