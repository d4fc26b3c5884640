"""The source reads like a model codebase: no function longer than a screenful or two, no file past 600 lines."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 150
MAX_FILE_LINES = 600


def _source_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [
        REPO_ROOT / name
        for name in listed.stdout.split()
        if not name.startswith("tests/") and (REPO_ROOT / name).is_file()
    ]


def test_no_source_file_over_600_lines():
    long_files = {
        str(path.relative_to(REPO_ROOT)): n
        for path in _source_files()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"


def test_no_function_over_150_lines():
    long_functions = {}
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(REPO_ROOT)}:{node.name}"] = length
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
