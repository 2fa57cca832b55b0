"""The command line as a user runs it: output, exit codes, no tracebacks."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import GOOD_ROLE, run_cli


def test_help_lists_commands_and_exit_codes() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    for word in ("validate", "render", "audit", "exit codes", "130"):
        assert word in done.stdout


@pytest.mark.parametrize("verb", ["validate", "render", "audit"])
def test_each_command_has_help(verb: str) -> None:
    done = run_cli(verb, "--help")
    assert done.returncode == 0
    assert f"build.py {verb}" in done.stdout


def test_validate_shipped_roles() -> None:
    done = run_cli("validate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "roles/database.yaml", "ok", "roles/management.yaml", "ok", "roles/web.yaml"]


def test_invalid_role_exits_2_with_every_problem_and_no_traceback(
    roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    write_role("web", dict(GOOD_ROLE, externalize=["/etc/ssh", "/var/www/"], pakages=[]))
    done = run_cli("validate", "--roles-dir", str(roles_dir), cwd=roles_dir.parent)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert "roles/web.yaml: pakages: unknown key (did you mean 'packages'?)" in lines
    assert any(line.startswith("roles/web.yaml: externalize[0]: cannot externalize /etc/ssh") for line in lines)
    assert any(line.startswith("roles/web.yaml: externalize[1]: '/var/www/' is not normalised") for line in lines)
    assert "3 problems found" in lines
    assert "Traceback" not in done.stderr


def test_validate_json(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("web", dict(GOOD_ROLE, volume={"device": "/dev/sdz", "mount_point": "/data", "size_gib": 1}))
    done = run_cli("validate", "--format", "json", "--roles-dir", str(roles_dir))
    assert done.returncode == 2
    doc = json.loads(done.stdout)
    assert doc["valid"] is False
    assert doc["problems"][0]["key"] == "volume.device"
    assert doc["problems"][0]["file"].endswith("web.yaml")


def test_build_of_invalid_role_stops_before_anything(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("web", dict(GOOD_ROLE, externalize=["/"]))
    done = run_cli("web", "--roles-dir", str(roles_dir))
    assert done.returncode == 2
    assert "externalize[0]" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_role() -> None:
    done = run_cli("render", "wbe")
    assert done.returncode == 2
    assert done.stderr.startswith("error: roles/wbe.yaml: no such role")
    assert "hint: roles in roles: database, management, web" in done.stderr


def test_bad_flag_is_usage_error() -> None:
    done = run_cli("audit", "--format", "xml")
    assert done.returncode == 2
    assert "invalid choice: 'xml'" in done.stderr


def test_render_web_prints_three_scripts() -> None:
    done = run_cli("render", "web")
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stdout.splitlines() if line.startswith("# ===== ")]
    assert [h.split()[2] for h in headers] == ["provision.sh", "verify.sh", "image-hygiene.sh"]
    assert done.stdout.count("#!/bin/bash") == 3


def test_render_one_script_is_plain_bash() -> None:
    done = run_cli("render", "web", "--script", "verify.sh")
    assert done.returncode == 0
    assert done.stdout.startswith("#!/bin/bash\n")


def test_render_out_writes_executable_scripts(tmp_path: Path) -> None:
    done = run_cli("render", "database", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    for name in ("provision.sh", "verify.sh", "image-hygiene.sh"):
        path = tmp_path / "out" / name
        assert path.read_text().startswith("#!/bin/bash")
        assert path.stat().st_mode & 0o111
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_audit_json_lists_each_roles_paths() -> None:
    done = run_cli("audit", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema_version"] == 1
    roles = {r["role"]: r for r in doc["roles"]}
    assert [p["path"] for p in roles["web"]["paths"]] == ["/etc/apache2", "/etc/php", "/var/www"]
    assert roles["web"]["paths"][2]["target"] == "/data/var/www"
    assert roles["web"]["mount_point"] == "/data" and roles["web"]["device"] == "/dev/sdf"
    assert roles["database"]["size_gib"] == 50
    created = [p for p in roles["management"]["paths"] if p["created"]]
    assert created == [
        {
            "path": "/srv/ops",
            "target": "/data/srv/ops",
            "created": True,
            "owner": "root",
            "group": "adm",
            "mode": "2775",
        }
    ]


def test_audit_csv_and_markdown_and_table() -> None:
    rows = list(csv.DictReader(io.StringIO(run_cli("audit", "--format", "csv", "web").stdout)))
    assert [r["path"] for r in rows] == ["/etc/apache2", "/etc/php", "/var/www"]
    assert rows[0]["size_gib"] == "10"
    markdown = run_cli("audit", "--format", "markdown", "web").stdout.splitlines()
    assert markdown[0].startswith("| role | path |") and len(markdown) == 5
    table = run_cli("audit", "web").stdout.splitlines()
    assert table[0].split()[:3] == ["role", "path", "target"] and len(table) == 4


def test_every_command_is_a_reserved_role_name(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    """A role named like a command could never be built: validation refuses those names."""
    from builder.cli.registry import RESERVED, VERBS

    assert set(VERBS) <= RESERVED
    for verb in VERBS:
        write_role(verb, GOOD_ROLE)
    done = run_cli("validate", "--roles-dir", str(roles_dir))
    assert done.returncode == 2
    refused = {
        line.split(".yaml:")[0].rsplit("/", 1)[-1] for line in done.stderr.splitlines() if "not be a command" in line
    }
    assert refused == set(VERBS)
