"""`fpa-prep corpus`: the demo's built-in corpus, gathered from the running Python's standard library.

No download: every Python installation has its standard library. For each module (tests, idlelib,
tkinter, lib2to3, ensurepip, turtledemo and site-packages left out) two documents are written: its
source code and its docstrings (module, classes, functions, with their qualified names). Modules are
taken in a fixed pseudo-random order (sha256 of the relative path) until the size budget is reached,
so the output is deterministic for a given Python version (recorded with its checksum in a .json).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sys
import sysconfig
from typing import Iterator, Optional

from data_prep.common import atomic_write_json, ensure_writable_dir

EXCLUDED_TOP = {"site-packages", "dist-packages", "test", "idlelib", "tkinter", "lib2to3", "turtledemo",
                "ensurepip", "__phello__"}
EXCLUDED_ANY = {"test", "tests", "__pycache__"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def module_files(root: Optional[str] = None) -> list[str]:
    """Relative paths of the eligible .py files, in the corpus order (sha256 of the path)."""
    root = root or stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and (parts[0] in EXCLUDED_TOP or parts[0].startswith("config-")):
            dirnames[:] = []
            continue
        if EXCLUDED_ANY.intersection(parts):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                found.append("/".join(parts + [name]))
    return sorted(found, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def docstrings(tree: ast.Module, qualname: str) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the module and every class and function inside it."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield qualname, doc

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                d = ast.get_docstring(child, clean=True)
                if d:
                    yield name, d
                yield from visit(child, name)

    yield from visit(tree, qualname)


def gather(max_bytes: int, root: Optional[str] = None) -> Iterator[dict]:
    """Documents ({text, path, kind}) until about max_bytes of UTF-8 text."""
    root = root or stdlib_root()
    used = 0
    for rel in module_files(root):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
            continue
        docs = [{"text": source, "path": rel, "kind": "source"}]
        pieces = [f"{name}\n{doc}" for name, doc in docstrings(tree, module_name(rel))]
        if pieces:
            docs.append({"text": "\n\n".join(pieces) + "\n", "path": rel, "kind": "docstrings"})
        for d in docs:
            if d["text"].strip():
                yield d
                used += len(d["text"].encode("utf-8"))
        if used >= max_bytes:
            return


def write_corpus(out_dir: str, max_mb: float = 8.0, name: str = "stdlib") -> dict:
    """Write `<out_dir>/<name>.jsonl` (+ `<name>.json` describing it); returns that description."""
    out_dir = ensure_writable_dir(out_dir)
    path = os.path.join(out_dir, name + ".jsonl")
    digest = hashlib.sha256()
    counts = {"source": 0, "docstrings": 0}
    size = 0
    with open(path + ".tmp", "wb") as f:
        for d in gather(int(max_mb * (1 << 20))):
            line = (json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            size += len(line)
            counts[d["kind"]] += 1
    os.replace(path + ".tmp", path)
    info = {
        "file": os.path.basename(path),
        "bytes": size,
        "sha256": digest.hexdigest(),
        "documents": sum(counts.values()),
        "documents_by_kind": counts,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "stdlib": stdlib_root(),
        "max_mb": max_mb,
    }
    atomic_write_json(os.path.join(out_dir, name + ".json"), info)
    return info
