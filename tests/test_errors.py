"""builder.errors: the one exception tree, and the exit codes printed from the one enum."""

from __future__ import annotations

import ast
from pathlib import Path

from builder.errors import ExitCode, exit_code_table
from tests.conftest import PROJECT, run_cli

BUILDER = PROJECT / "builder"


def test_readme_exit_code_table_is_the_enum() -> None:
    """The README's table is exit_code_table() verbatim: one place decides the codes and their meaning."""
    readme = (PROJECT / "README.md").read_text()
    assert exit_code_table() in readme
    assert exit_code_table().count("\n") == len(ExitCode) + 2


def test_help_prints_every_exit_code_from_the_enum() -> None:
    done = run_cli("--help")
    assert done.returncode == ExitCode.OK
    epilog = done.stdout[done.stdout.index("exit codes:") :]
    listed = [line.split(None, 1) for line in epilog.splitlines()[1:] if line.strip()]
    assert [(int(code), meaning) for code, meaning in listed] == [(c.value, c.meaning) for c in ExitCode]


def test_a_bad_argument_exits_with_the_enum_value() -> None:
    done = run_cli("validate", "--roles-dir")
    assert done.returncode == ExitCode.INVALID_INPUT == 2 and "Traceback" not in done.stderr


def _defined_exceptions(path: Path) -> list[str]:
    """Return the classes ``path`` defines whose bases name an exception (…Error, …Exception, …)."""
    suffixes = ("Error", "Exception", "Failed", "Invalid", "Problem", "Refused", "Mismatch", "Lost", "Timeout")
    tree = ast.parse(path.read_text())
    return [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id.endswith(suffixes) for b in node.bases)
    ]


def test_no_module_but_errors_defines_an_exception() -> None:
    found = {
        f"{p.relative_to(BUILDER)}: {name}"
        for p in BUILDER.rglob("*.py")
        if p.name != "errors.py"
        for name in _defined_exceptions(p)
    }
    assert found == set()


def test_errors_imports_nothing_from_the_package() -> None:
    tree = ast.parse((BUILDER / "errors.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.split(".")[0] in ("builder", "tests")]
