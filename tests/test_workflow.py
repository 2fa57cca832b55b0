"""The CI workflow cannot run here; its YAML must parse and every command it runs must exist."""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from builder import cli
from tests.conftest import PROJECT

WORKFLOW = PROJECT / ".github/workflows/role-amis.yml"


def load() -> dict[Any, Any]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(doc, dict)
    return doc


def commands(doc: dict[Any, Any]) -> list[list[str]]:
    """Return every `python build.py ...` command of the workflow's run steps, expressions filled in."""
    found = []
    for job in doc["jobs"].values():
        for step in job["steps"]:
            for raw in step.get("run", "").splitlines():
                line = re.sub(r"\$\{\{\s*matrix\.role\s*\}\}", "web", raw).replace('"$AWS_REGION"', "eu-west-1")
                match = re.search(r"python build\.py ([^)|;&]*)", line)
                if match:
                    found.append(shlex.split(match.group(1)))
    return found


def test_workflow_triggers_permissions_and_jobs() -> None:
    doc = load()
    on = doc[True] if True in doc else doc["on"]  # YAML 1.1 reads the key `on` as true
    assert set(on["push"]["paths"]) == {"roles/**", "builder/templates/**"}
    assert doc["permissions"]["id-token"] == "write"  # OIDC, no stored keys
    build = doc["jobs"]["build"]
    assert build["needs"] == "changed"
    assert "fromJSON(needs.changed.outputs.matrix)" in build["strategy"]["matrix"]
    assert build["strategy"]["fail-fast"] is False
    uses = [s.get("uses", "") for s in build["steps"]]
    assert any(u.startswith("aws-actions/configure-aws-credentials@") for u in uses)
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "manifests/"


def test_every_command_the_workflow_runs_exists() -> None:
    found = commands(load())
    assert [c[0] for c in found] == ["changed", "web"]
    for argv in found:
        args = cli.parse(argv)  # argparse exits 2 on an unknown command or option
        assert callable(args.run)
    assert cli.parse(found[0]).format == "github-matrix"
    assert cli.parse(found[1]).if_changed


def test_the_build_job_reads_the_key_changed_prints() -> None:
    """`changed --format github-matrix` prints {"role": [...]} (test_registry checks the output)."""
    build = load()["jobs"]["build"]
    runs = " ".join(s.get("run", "") for s in build["steps"])
    assert "${{ matrix.role }}" in runs
    assert "--if-changed" in runs
