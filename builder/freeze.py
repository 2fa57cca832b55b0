"""Freeze a role instance's data volume around a snapshot's start, guarded on the instance.

Three rules, each enforced by the script the instance runs (sent over SSH on stdin, never
written to a file there):

- Only the data volume is ever frozen. The mount point must be a mount of its own whose
  device is the role's volume: by its EBS volume id (the Nitro name
  ``/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…``), or, where that name does not
  exist (Xen), by the device name the volume was attached at. An unmounted volume
  (``nofail`` lets an instance boot without it) would freeze the filesystem holding the
  empty mount point, root: refused, as is anything else mounted there.
- A frozen filesystem always thaws. Before the freeze a watchdog is started: a transient
  systemd timer (``systemd-run --on-active``) that runs ``fsfreeze --unfreeze`` after a
  bounded time, in its own unit, so it outlives the SSH session, the client, and a lost
  connection. A normal thaw cancels it.
- How long the filesystem stayed frozen is measured on the instance's clock and returned.

The scripts wrap their body in a function called on the last line: bash reads stdin as it
runs, so a script cut short in transit is a syntax error and does nothing at all.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import jinja2

from builder.errors import BuildError, CommandResult, FreezeRefused, RemoteCommandFailed, TemplateError
from builder.remote import Remote
from builder.render import environment

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds a filesystem may stay frozen before the watchdog thaws it
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 900.0
BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_"
UNIT_PREFIX = "ebsrole-thaw-"
REFUSED = 3  # the scripts' exit status for "this is not the data volume"
T = TypeVar("T")


class Volume(Protocol):
    """What freezing needs to know of an instance's data volume (``backups.RoleInstance`` is one)."""

    @property
    def instance_id(self) -> str: ...
    @property
    def volume_id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def mount_point(self) -> str: ...


@dataclass(frozen=True)
class Frozen:
    """A filesystem frozen on an instance, and the watchdog that thaws it by ``timeout``."""

    instance_id: str
    mount_point: str
    unit: str  # the watchdog's transient unit, without .timer/.service
    frozen_at: float  # the instance's clock, seconds since the epoch
    timeout: float


@dataclass(frozen=True)
class Thawed:
    """How a freeze ended: ``seconds`` frozen, thawed ``by`` "ebsrole" or "watchdog"."""

    seconds: float
    by: str


# ---------------------------------------------------------------- the scripts

_COMMON = """\
set -euo pipefail
export LC_ALL=C PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck disable=SC2034  # each script uses part of these
{
MOUNT_POINT={{ mount_point | sh }}
VOLUME_ID={{ volume_id | sh }}
DEVICE={{ device | sh }}
UNIT={{ unit | sh }}
BY_ID={{ by_id | sh }}
TIMEOUT_MS={{ timeout_ms | sh }}
}
refuse() { printf 'refused: %s\\n' "$*" >&2; exit {{ refused | sh }}; }
now() { date +%s.%N; }
majmin() { printf '%d:%d' "0x$(stat -Lc %t -- "$1")" "0x$(stat -Lc %T -- "$1")"; }
# waiting: armed; anything else (elapsed, running, dead, not loaded): it fired or is gone.
watchdog_state() { systemctl show -p SubState --value -- "$UNIT.timer" 2>/dev/null || true; }

# Print the block device of the volume: by EBS volume id (Nitro), else the device name it
# was attached at and its sd/xvd alias (Xen).
volume_device() {
  local c candidates=("$BY_ID${VOLUME_ID//-/}")
  if [[ ! -e ${candidates[0]} ]]; then
    candidates+=("$DEVICE")
    case $DEVICE in
      /dev/sd*) candidates+=("/dev/xvd${DEVICE#/dev/sd}") ;;
      /dev/xvd*) candidates+=("/dev/sd${DEVICE#/dev/xvd}") ;;
    esac
  fi
  for c in "${candidates[@]}"; do
    if [[ -b $c ]]; then readlink -f -- "$c"; return 0; fi
  done
  refuse "volume $VOLUME_ID is not attached: none of ${candidates[*]} is a block device"
}

# Refuse unless MOUNT_POINT is a mount of its own, of the volume, and not of the root filesystem.
check_mount() {
  local mounted root dev source
  [[ $MOUNT_POINT == /* && $MOUNT_POINT != / ]] || refuse "$MOUNT_POINT is the root filesystem"
  [[ ! -L $MOUNT_POINT ]] || refuse "$MOUNT_POINT is a symbolic link"
  mountpoint -q -- "$MOUNT_POINT" \\
    || refuse "the volume is not mounted at $MOUNT_POINT (freezing it would freeze the root filesystem)"
  # The last line is the mount on top: the one fsfreeze would freeze.
  mounted=$(findmnt -rn -o MAJ:MIN --mountpoint "$MOUNT_POINT" | tail -n 1)
  source=$(findmnt -rn -o SOURCE --mountpoint "$MOUNT_POINT" | tail -n 1)
  root=$(findmnt -rn -o MAJ:MIN --mountpoint / | tail -n 1)
  [[ $mounted != "$root" ]] || refuse "$MOUNT_POINT is a mount of the root filesystem ($source, $root)"
  dev=$(volume_device)
  [[ $mounted == "$(majmin "$dev")" ]] \\
    || refuse "$MOUNT_POINT is a mount of $source ($mounted), not of volume $VOLUME_ID ($dev, $(majmin "$dev"))"
  echo "volume=$dev"
}
"""

_CHECK = """\
main() {
  check_mount
}
main
"""

# sync first: fsfreeze flushes too, but a long flush inside the watchdog's window could let
# it fire before the freeze completes (and find nothing to thaw).
_FREEZE = """\
main() {
  local fsfreeze
  check_mount
  fsfreeze=$(command -v fsfreeze) || refuse "fsfreeze is not installed (util-linux)"
  sync -f -- "$MOUNT_POINT"
  systemd-run --quiet --collect --unit="$UNIT" --description="ebsrole: thaw $MOUNT_POINT if its snapshot run dies" \\
    --on-active="${TIMEOUT_MS}ms" --timer-property=AccuracySec=100ms -- "$fsfreeze" --unfreeze -- "$MOUNT_POINT"
  if ! fsfreeze --freeze -- "$MOUNT_POINT"; then
    systemctl stop -- "$UNIT.timer" 2>/dev/null || true
    exit 1
  fi
  echo "frozen_at=$(now)"
  # The watchdog fired while fsfreeze was flushing: nothing thaws this freeze but us.
  if [[ $(watchdog_state) != waiting ]]; then
    fsfreeze --unfreeze -- "$MOUNT_POINT" || true
    echo "freezing $MOUNT_POINT took longer than the watchdog's $TIMEOUT_MS ms; thawed again" >&2
    exit 1
  fi
}
main
"""

_THAW = """\
main() {
  local state
  state=$(watchdog_state)
  if fsfreeze --unfreeze -- "$MOUNT_POINT"; then
    echo "thawed_at=$(now)"
    echo "thawed_by=ebsrole"
  elif [[ $state != waiting || $(watchdog_state) != waiting ]]; then
    echo "thawed_by=watchdog"  # it thawed first: fsfreeze found nothing frozen
  else
    exit 1  # the watchdog stays armed: it thaws in the end
  fi
  systemctl stop -- "$UNIT.timer" "$UNIT.service" 2>/dev/null || true
}
main
"""


# The builder's whole image at one point in time: data and root frozen in one script that never
# writes to a disk while they are frozen (no file, no log; its output goes to the SSH channel), and
# that waits for the end of its input (the tool closes it once the snapshot calls have returned:
# it sends nothing more) before it thaws, data first, root last. Both watchdogs are armed before
# anything is frozen; a lost session is an end of input too, so it thaws at once.
_FREEZE_ALL = """\
main() {
  local fsfreeze
  check_mount
  fsfreeze=$(command -v fsfreeze) || refuse "fsfreeze is not installed (util-linux)"
  sync
  systemd-run --quiet --collect --unit="$UNIT" --description="ebsrole: thaw $MOUNT_POINT if the build dies" \\
    --on-active="${TIMEOUT_MS}ms" --timer-property=AccuracySec=100ms -- "$fsfreeze" --unfreeze -- "$MOUNT_POINT"
  systemd-run --quiet --collect --unit="$UNIT-root" --description="ebsrole: thaw / if the build dies" \\
    --on-active="${TIMEOUT_MS}ms" --timer-property=AccuracySec=100ms -- "$fsfreeze" --unfreeze -- /
  if ! fsfreeze --freeze -- "$MOUNT_POINT"; then
    systemctl stop -- "$UNIT.timer" "$UNIT-root.timer" 2>/dev/null || true
    exit 1
  fi
  if ! fsfreeze --freeze -- /; then
    fsfreeze --unfreeze -- "$MOUNT_POINT" || true
    systemctl stop -- "$UNIT.timer" "$UNIT-root.timer" 2>/dev/null || true
    exit 1
  fi
  echo "frozen_at=$(now)"
  while read -r -t "$((TIMEOUT_MS / 1000 + 1))" _; do :; done || true
  thawed_by=ebsrole
  fsfreeze --unfreeze -- "$MOUNT_POINT" || thawed_by=watchdog
  fsfreeze --unfreeze -- / || thawed_by=watchdog
  echo "thawed_at=$(now)"
  echo "thawed_by=$thawed_by"
  systemctl stop -- "$UNIT.timer" "$UNIT.service" "$UNIT-root.timer" "$UNIT-root.service" 2>/dev/null || true
}
main
"""


def render(body: str, volume: Volume, unit: str = "", timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return the script ``body`` with the volume's values, each shell-quoted (the strict renderer)."""
    values = {
        "mount_point": volume.mount_point,
        "volume_id": volume.volume_id,
        "device": volume.device,
        "unit": unit,
        "timeout_ms": int(timeout * 1000),
        "refused": REFUSED,
        "by_id": BY_ID,
    }
    try:
        return environment().from_string(_COMMON + body).render(values)
    except jinja2.TemplateError as exc:
        raise TemplateError("builder/freeze.py", str(exc)) from exc


SCRIPTS = {"check": _CHECK, "freeze": _FREEZE, "thaw": _THAW, "freeze-all": _FREEZE_ALL}


# ---------------------------------------------------------------- orchestration


def check_mount(remote: Remote, volume: Volume) -> str:
    """Return the instance's device of the volume mounted at its mount point.

    Raises FreezeRefused when the mount point is not a mount of the volume (or is root).
    """
    result = _run(remote, volume, render(_CHECK, volume), "checking the mount")
    return _values(result.stdout).get("volume", "")


def freeze(remote: Remote, volume: Volume, timeout: float = DEFAULT_TIMEOUT) -> Frozen:
    """Arm a watchdog that thaws after ``timeout`` seconds, then freeze the volume's filesystem.

    Raises FreezeRefused (nothing frozen) when the mount point is not the volume's own
    mount, RemoteCommandFailed when fsfreeze fails (the watchdog is cancelled).
    """
    unit = f"{UNIT_PREFIX}{secrets.token_hex(6)}"
    result = _run(remote, volume, render(_FREEZE, volume, unit, timeout), f"freezing {volume.mount_point}", timeout)
    frozen = Frozen(volume.instance_id, volume.mount_point, unit, float(_values(result.stdout)["frozen_at"]), timeout)
    log.info(
        "%s: %s frozen; the watchdog %s thaws it within %.0f s", volume.instance_id, volume.mount_point, unit, timeout
    )
    return frozen


def thaw(remote: Remote, volume: Volume, frozen: Frozen) -> Thawed:
    """Thaw the volume's filesystem and cancel the watchdog; return how long it was frozen.

    When the watchdog thawed first, the time frozen is its bound. Raises RemoteCommandFailed
    (the watchdog stays armed and thaws it in the end) when fsfreeze cannot thaw.
    """
    script = render(_THAW, volume, frozen.unit, frozen.timeout)
    what = f"thawing {frozen.mount_point} (the watchdog {frozen.unit} thaws it within {frozen.timeout:.0f} s)"
    values = _values(_run(remote, volume, script, what, frozen.timeout).stdout)
    if values.get("thawed_by") == "watchdog":
        log.warning(
            "%s: %s was thawed by the watchdog after %.0f s", frozen.instance_id, frozen.mount_point, frozen.timeout
        )
        return Thawed(frozen.timeout, "watchdog")
    seconds = max(0.0, float(values["thawed_at"]) - frozen.frozen_at)
    log.info("%s: %s thawed after %.3f s frozen", frozen.instance_id, frozen.mount_point, seconds)
    return Thawed(seconds, "ebsrole")


def while_frozen(
    remote: Remote, volume: Volume, action: Callable[[], T], timeout: float = DEFAULT_TIMEOUT
) -> tuple[T, Thawed]:
    """Freeze the volume, run ``action``, thaw (also when ``action`` fails); return its value and the thaw.

    Raises what ``freeze``, ``action`` or ``thaw`` raise; after a failed thaw the watchdog
    still thaws within ``timeout`` seconds of the freeze.
    """
    frozen = freeze(remote, volume, timeout)
    try:
        value = action()
    except BaseException:
        _thaw_after_failure(remote, volume, frozen)
        raise
    return value, thaw(remote, volume, frozen)


def while_all_frozen(
    remote: Remote, volume: Volume, action: Callable[[], T], timeout: float = DEFAULT_TIMEOUT
) -> tuple[T, Thawed]:
    """Freeze the data volume's filesystem, then root, run ``action``, thaw both; return its value and the thaw.

    One remote script does it all (``_FREEZE_ALL``): this session only reads from it and, when
    ``action`` returns or fails, closes its input. Raises FreezeRefused (nothing frozen) when the
    mount point is not the volume's own mount, RemoteCommandFailed when a freeze fails, and what
    ``action`` raises (after the thaw).
    """
    unit = f"{UNIT_PREFIX}{secrets.token_hex(6)}"
    script = render(_FREEZE_ALL, volume, unit, timeout)
    held = remote.hold("sudo -n bash -s", script, "frozen_at=", timeout + 60)
    if held.result is not None:
        _run(remote, volume, script, f"freezing {volume.mount_point} and /", timeout, done=held.result)
        raise RemoteCommandFailed(held.result, f"{volume.instance_id}: freezing {volume.mount_point} and /")
    frozen_at = float(_values(held.out.text())["frozen_at"])
    log.info(
        "%s: %s and / frozen; the watchdog %s thaws them within %.0f s",
        volume.instance_id,
        volume.mount_point,
        unit,
        timeout,
    )
    try:
        value = action()
    finally:
        ended = held.release(timeout + 60)
        result = _run(remote, volume, script, f"thawing {volume.mount_point} and /", timeout, done=ended)
    values = _values(result.stdout)
    if values.get("thawed_by") == "watchdog":
        log.warning("%s: the watchdog thawed %s and / after %.0f s", volume.instance_id, volume.mount_point, timeout)
        return value, Thawed(timeout, "watchdog")
    seconds = max(0.0, float(values["thawed_at"]) - frozen_at)
    log.info("%s: %s and / thawed after %.3f s frozen", volume.instance_id, volume.mount_point, seconds)
    return value, Thawed(seconds, "ebsrole")


def _thaw_after_failure(remote: Remote, volume: Volume, frozen: Frozen) -> None:
    try:
        thaw(remote, volume, frozen)
    except (BuildError, OSError) as exc:  # the action's error is the one to report; the watchdog remains
        log.warning("%s: %s: thaw failed (%s); the watchdog thaws it", frozen.instance_id, frozen.mount_point, exc)


def _run(
    remote: Remote, volume: Volume, script: str, what: str, timeout: float = 0.0, *, done: CommandResult | None = None
) -> CommandResult:
    """Run ``script`` with sudo (or take ``done``, its result already); raise FreezeRefused or RemoteCommandFailed."""
    result = done or remote.run("sudo -n bash -s", stdin=script, timeout=timeout + 60)
    if result.exit_status == REFUSED:
        reason = (
            result.stderr.strip().splitlines()[-1].removeprefix("refused: ") if result.stderr.strip() else "refused"
        )
        raise FreezeRefused(volume.instance_id, volume.mount_point, volume.volume_id, reason)
    if result.exit_status != 0:
        raise RemoteCommandFailed(result, f"{volume.instance_id}: {what}")
    return result


def _values(stdout: str) -> dict[str, str]:
    """Return the ``key=value`` lines of a script's output (the last of each key)."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
