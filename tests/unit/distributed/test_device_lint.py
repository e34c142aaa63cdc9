"""Device and backend names live in one module: no hard-coded "cuda", ".cuda()", "nccl", "gloo" elsewhere.

Code is read token by token, so strings in comments and docstrings are allowed (they
explain *why* the compatibility layer exists) while string literals and ``.cuda()`` calls
in code are not. Allowed files: the device module and the CPU compatibility layer.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "carft_nemo"
ALLOWED = {PACKAGE / "distributed" / "device.py", PACKAGE / "distributed" / "cpu_compat.py"}
# Python >= 3.12 splits f-strings into FSTRING_START/MIDDLE/END tokens
STRING_TOKENS = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
FORBIDDEN = re.compile(r"\b(cuda|nccl|gloo)\b", re.IGNORECASE)


def _docstring_lines(source: str) -> set[int]:
    """Line numbers of module/class/function docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def violations(source: str) -> list[tuple[int, str]]:
    """(line, offending token) for every device/backend name used in code."""
    docstrings = _docstring_lines(source)
    found: list[tuple[int, str]] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type in STRING_TOKENS and tok.start[0] not in docstrings and FORBIDDEN.search(tok.string):
            found.append((tok.start[0], tok.string))
        # .cuda() / .cuda(device): an attribute call, whatever the receiver
        if (
            tok.type == tokenize.NAME
            and tok.string == "cuda"
            and i > 0
            and tokens[i - 1].string == "."
            and i + 1 < len(tokens)
            and tokens[i + 1].string == "("
        ):
            found.append((tok.start[0], ".cuda()"))
    return found


def test_linter_catches_what_it_should() -> None:
    bad = 'import torch\nx = torch.ones(2, device="cuda")\ny = x.cuda()\nbackend = "nccl"\nz = f"{1}gloo"\n'
    assert [line for line, _ in violations(bad)] == [2, 3, 4, 5]
    ok = '"""Runs on cuda with nccl."""\n# gloo on CPU\nimport torch\nok = torch.cuda.is_available()\n'
    assert violations(ok) == []


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p not in ALLOWED)


def test_package_is_found() -> None:
    assert len(_package_files()) > 10 and all(p.exists() for p in ALLOWED)


def test_no_device_or_backend_names_outside_device_module() -> None:
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {token}"
        for path in _package_files()
        for line, token in violations(path.read_text())
    ]
    if problems:
        pytest.fail("hard-coded device/backend names (use carft_nemo.distributed.device):\n" + "\n".join(problems))
