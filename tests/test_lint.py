"""House style as a check: `ruff check` is clean over the whole tree (ruff.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is in requirements.txt"
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_string_is_left_alone_on_a_line() -> None:
    """A string statement that is not a docstring is almost always half of a split literal that lost its
    parentheses (the second half silently dropped); one did that to test_megatron's TP2 launcher."""
    import ast

    lost = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or ".data" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            body = getattr(node, "body", None)
            for i, statement in enumerate(body if isinstance(body, list) else []):
                if not isinstance(statement, ast.Expr):
                    continue
                value = statement.value
                is_text = isinstance(value, ast.JoinedStr) or (
                    isinstance(value, ast.Constant) and isinstance(value.value, str)
                )
                docstring = i == 0 and isinstance(
                    node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
                )
                if is_text and not docstring:
                    lost.append(f"{path.relative_to(ROOT)}:{statement.lineno}")
    assert not lost, lost
