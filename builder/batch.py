"""Several role builds at once: one `build.py ROLE` process per role, at most N at a time.

Each build is its own process, so one failing (or crashing) cannot stop or leak the
others: each cleans up after itself as a single build does. Every line a build prints
comes out prefixed with its role; Ctrl-C and SIGTERM are passed on to every running
build, which then cleans up; roles not started yet are skipped. The result of each is
read from its manifest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from builder.cleanup import signals_deferred
from builder.errors import ExitCode

log = logging.getLogger(__name__)

# Each build runs as ``python -m builder``, importable from a checkout as from an install.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


@dataclass
class Outcome:
    """How one role's build ended."""

    role: str
    result: str  # complete | unchanged | failed | interrupted | not started
    exit_code: int | None
    ami: str | None = None
    seed_snapshot: str | None = None
    seconds: float = 0.0
    manifest: str | None = None
    error: str | None = None


def run(
    roles: Sequence[str], argv_for: dict[str, list[str]], manifests: dict[str, Path], jobs: int, out: TextIO
) -> tuple[list[Outcome], BaseException | None]:
    """Build ``roles`` with at most ``jobs`` processes at a time; return each one's outcome.

    ``argv_for[role]`` are the arguments of that role's `build.py` (its manifest path
    ``manifests[role]`` among them). When Ctrl-C or SIGTERM arrives, it is passed on to
    every running build; once they have all cleaned up, the outcomes so far are returned
    with the interruption (to be re-raised by the caller); roles not started are so marked.
    """
    pending = list(roles)
    running: dict[str, tuple[subprocess.Popen[str], float, threading.Thread]] = {}
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()
    interrupted: BaseException | None = None

    def reap(role: str) -> None:
        proc, started, pump = running.pop(role)
        proc.wait()
        pump.join()
        outcomes[role] = _outcome(role, proc.returncode, time.monotonic() - started, manifests[role])

    try:
        while pending or running:
            while pending and len(running) < jobs:
                with signals_deferred("starting a build", deliver=True):  # never a build we do not track
                    role = pending.pop(0)
                    running[role] = _start(role, argv_for[role], out, lock)
            for role in [r for r, (proc, _, _) in running.items() if proc.poll() is not None]:
                reap(role)
            time.sleep(0.05)
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C / SIGTERM: pass it on, then report
        interrupted = exc
        passed_on = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        for proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(passed_on)
        with signals_deferred("waiting for the running builds to clean up"):
            for role in list(running):
                reap(role)
        for role in pending:
            outcomes[role] = Outcome(role, "not started", None)
    return [outcomes[r] for r in roles if r in outcomes], interrupted


def _pythonpath() -> str:
    """Return PYTHONPATH with this package's parent first, so the builds run this very code."""
    return os.pathsep.join([PACKAGE_PARENT, *filter(None, [os.environ.get("PYTHONPATH")])])


def _start(
    role: str, argv: list[str], out: TextIO, lock: threading.Lock
) -> tuple[subprocess.Popen[str], float, threading.Thread]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()},
        # Its own process group: a terminal's Ctrl-C reaches the builds only through us,
        # once each, so none of them is interrupted twice.
        start_new_session=True,
    )
    pump = threading.Thread(target=_pump, args=(role, proc, out, lock), daemon=True)
    pump.start()
    return proc, time.monotonic(), pump


def _pump(role: str, proc: subprocess.Popen[str], out: TextIO, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            out.write(f"[{role}] {line}" if line.endswith("\n") else f"[{role}] {line}\n")
            out.flush()


def _outcome(role: str, code: int, seconds: float, manifest: Path) -> Outcome:
    outcome = Outcome(role, "failed", code, seconds=round(seconds, 1))
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        outcome.error = f"exit {code}, no manifest"
        if code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
            outcome.result = "interrupted"
        return outcome
    outcome.manifest = str(manifest)
    interrupted = code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED)
    outcome.result = str(doc.get("status", "failed")) if code == 0 else "interrupted" if interrupted else "failed"
    outcome.ami, outcome.seed_snapshot, outcome.error = doc.get("ami"), doc.get("seed_snapshot"), doc.get("error")
    return outcome


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """Return the end-of-run table: role, result, AMI, seed snapshot, duration."""
    rows = [("role", "result", "AMI", "seed snapshot", "duration")]
    for o in outcomes:
        result = o.result if o.exit_code in (0, None) else f"{o.result} (exit {o.exit_code})"
        rows.append((o.role, result, o.ami or "-", o.seed_snapshot or "-", f"{o.seconds:.0f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    failed = [o for o in outcomes if o.exit_code not in (0,)]
    lines += [f"{o.role}: {o.error}" for o in failed if o.error]
    return "\n".join(lines)


def summary_json(outcomes: Sequence[Outcome]) -> str:
    return json.dumps({"builds": [asdict(o) for o in outcomes]}, indent=2)


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """Return 0 when every build succeeded (or was unchanged), else the first failure's code."""
    for outcome in outcomes:
        if outcome.exit_code not in (0, None) or outcome.result == "not started":
            return int(outcome.exit_code or ExitCode.FAILED)
    return ExitCode.OK
