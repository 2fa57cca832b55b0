"""The installable package: `pip install <checkout>` gives an `ebsrole` command that works anywhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
ROLES = sorted(p.name for p in (PROJECT / "roles").glob("*.yaml") if p.stem != "defaults")


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False, env={**os.environ, **env}
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's wheel, built offline with the dev venv's backend."""
    out = tmp_path_factory.mktemp("wheel")
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(PROJECT)],
        cwd=out,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("ebsrole-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a directory of its own (its dependencies: the dev venv's)."""
    target = tmp_path_factory.mktemp("site")
    done = _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], target
    )
    assert done.returncode == 0, done.stderr
    return target


def test_the_wheel_ships_templates_schema_and_sandbox_data_and_nothing_else_of_the_checkout(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        *(f"builder/templates/{p.name}" for p in (PROJECT / "builder" / "templates").iterdir()),
        "builder/schema/role.schema.json",
        "builder/sandbox/debian-amis.json",
        "builder/sandbox/stage.sh",
        "builder/__main__.py",
    }
    assert shipped <= names
    assert {n.split("/")[0] for n in names} == {"builder", "ebsrole-0.1.0.dist-info"}
    entry_points = zipfile.ZipFile(wheel).read("ebsrole-0.1.0.dist-info/entry_points.txt").decode()
    assert "ebsrole = builder.__main__:main" in entry_points


def test_runtime_dependencies_are_requirements_txt_and_moto_is_the_sandbox_extra(wheel: Path) -> None:
    wanted = [line.split("#")[0].strip() for line in (PROJECT / "requirements.txt").read_text().splitlines()]
    wanted = [w for w in wanted if w]
    metadata = zipfile.ZipFile(wheel).read("ebsrole-0.1.0.dist-info/METADATA").decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    runtime = [r for r in requires if "extra ==" not in r]
    assert sorted(runtime) == sorted(w for w in wanted if not w.startswith("moto"))
    assert [r for r in requires if "extra ==" in r] == ["moto[server]<5.3,>=5.2.5; extra == 'sandbox'"]
    assert [w for w in wanted if w.startswith("moto")] == ["moto[server]>=5.2.5,<5.3"]


def test_the_installed_command_reads_its_packaged_templates_and_the_roles_of_the_current_directory(
    installed: Path, tmp_path: Path
) -> None:
    ebsrole = [str(installed / "bin" / "ebsrole")]
    env = {"PYTHONPATH": str(installed)}
    where = _run([sys.executable, "-c", "import builder; print(builder.__file__)"], tmp_path, **env)
    assert where.stdout.strip() == str(installed / "builder" / "__init__.py")

    missing = _run([*ebsrole, "validate"], tmp_path, **env)
    assert (missing.returncode, missing.stderr.splitlines()[0]) == (2, "error: roles: no such roles directory")

    shutil.copytree(PROJECT / "roles", tmp_path / "roles")
    valid = _run([*ebsrole, "validate"], tmp_path, **env)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.splitlines() == [f"ok  roles/{name}" for name in ROLES]

    rendered = _run([*ebsrole, "render", "web", "--script", "verify.sh"], tmp_path, **env)
    checkout = _run([sys.executable, str(PROJECT / "build.py"), "render", "web", "--script", "verify.sh"], tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == checkout.stdout and "set -euo pipefail" in rendered.stdout


def test_installed_and_checkout_fingerprints_agree(installed: Path, tmp_path: Path) -> None:
    """The templates moved into the package: the fingerprints of existing AMIs must still match.

    (Checked at the move: `fingerprint web database` gave the same values before and after it.)
    """
    args = [
        "fingerprint",
        "web",
        "database",
        "--base-ami",
        "ami-0123456789abcdef0",
        "--roles-dir",
        str(PROJECT / "roles"),
    ]
    ours = _run([str(installed / "bin" / "ebsrole"), *args], tmp_path, PYTHONPATH=str(installed))
    checkout = _run([sys.executable, str(PROJECT / "build.py"), *args], tmp_path)
    assert ours.returncode == checkout.returncode == 0, ours.stderr + checkout.stderr
    # Two template directories at different places, the same fingerprints: only file names count.
    assert ours.stdout == checkout.stdout
    assert [line.split()[0] for line in ours.stdout.splitlines()] == ["web", "database"]


@pytest.mark.slow
def test_a_fresh_venv_installs_the_checkout_from_another_directory(tmp_path: Path) -> None:
    """Issue 14's "done when": pip install <checkout>, ebsrole --help, ebsrole validate (downloads, ~30 s)."""
    venv.create(tmp_path / "v", with_pip=True)
    pip = _run([str(tmp_path / "v" / "bin" / "pip"), "install", "-q", str(PROJECT)], tmp_path)
    assert pip.returncode == 0, pip.stderr
    ebsrole = str(tmp_path / "v" / "bin" / "ebsrole")

    helped = _run([ebsrole, "--help"], tmp_path)
    assert helped.returncode == 0 and "validate" in helped.stdout, helped.stderr

    valid = _run([ebsrole, "validate", "--roles-dir", str(PROJECT / "roles")], tmp_path)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.splitlines() == [f"ok  {PROJECT / 'roles' / name}" for name in ROLES]

    # The runtime install is lean: the sandbox says how to get what it needs.
    sandbox = _run([ebsrole, "sandbox", "start"], tmp_path, EBSROLE_SANDBOX=str(tmp_path / "state"))
    assert sandbox.returncode == 7
    assert sandbox.stderr.splitlines()[-1] == "hint: pip install 'ebsrole[sandbox]'"
    assert not (tmp_path / "state").exists()
