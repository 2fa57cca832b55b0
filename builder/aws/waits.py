"""The learned wait schedule: when to look at a resource EC2 is changing, and for how long.

How long recent waits of each kind took (per endpoint and region) is kept in a small file;
the next wait of that kind looks first when such waits have ended, and backs off
geometrically when nothing is known or a wait runs long. Never a bare sleep loop; always
within a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

from builder.errors import CloudError, WaitTimeout
from builder.files import write_atomic

log = logging.getLogger(__name__)


def waits_file() -> Path:
    """Where the recent waits are remembered (EBSROLE_WAITS, else the user's cache)."""
    return Path(os.environ.get("EBSROLE_WAITS") or Path.home() / ".cache" / "ebsrole" / "waits.json")


@dataclass(frozen=True)
class WaitPlan:
    """When to look at a resource, from how long recent waits of its kind took.

    ``first``: the first look (seconds after the wait starts); ``sure``: by when such a wait
    has always been over (the second look, when the first was early), or None when the
    waits vary; ``before``: it has never been over before this (what a first look that
    finds it done can still say about the start of the interval); ``step``: the spacing of
    later looks near the end.
    """

    first: float
    sure: float | None
    before: float
    step: float


class Waits:
    """How long recent waits of each kind took, per endpoint and region, kept in a small file.

    A wait is kept as the interval its end fell in: (the last look that found it still
    going, the first look that found it over], in seconds from its start. While the
    intervals agree (EC2 takes about the same time each build), the next wait looks first
    in the middle of what they leave open, and at its end when that is already narrow: a
    few builds in, each wait costs one look and overshoots by a few per cent. When they
    disagree (the waits vary), looks start at the typical end and come often around it.
    """

    KEEP = 5
    NARROW = 0.02  # an interval this wide relative to its end (or 50 ms) is not worth halving

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def _load(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def intervals(self, key: str) -> list[tuple[float, float]]:
        """Return the recent (before, by) intervals of ``key`` (entries of another shape are skipped)."""
        kept = []
        for entry in self._load().get(key) or []:
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, int | float) for x in entry):
                kept.append((float(entry[0]), float(entry[1])))
        return kept

    def plan(self, key: str) -> WaitPlan | None:
        """Return when to look during the next wait of ``key``, or None with no history."""
        intervals = self.intervals(key)
        if not intervals:
            return None
        before = max(lo for lo, _ in intervals)
        by = min(hi for _, hi in intervals)
        if before < by:  # one duration fits them all: it lies in (before, by]
            narrow = by - before <= max(0.05, self.NARROW * by)
            return WaitPlan(by if narrow else (before + by) / 2, by, before, max(0.1, by / 20))
        typical = statistics.median((lo + hi) / 2 for lo, hi in intervals)
        return WaitPlan(typical * 0.95, None, 0.0, max(0.1, typical / 20))

    def record(self, key: str, before: float, by: float) -> None:
        with self.lock:
            data = self._load()
            entry = [round(max(0.0, before), 3), round(max(0.0, by), 3)]
            data[key] = [*data.get(key, []), entry][-self.KEEP :]
            try:
                write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
            except OSError as exc:  # a cache: never a reason to fail
                log.debug("could not record wait times in %s: %s", self.path, exc)


def poll_delay(waited: float) -> float:
    """Return how long to sleep before the next poll of a wait that has lasted ``waited`` seconds.

    A third of the time waited so far, from 0.25 s up to 5 s: the first polls come fast (a
    quick transition is seen within a quarter second) and then spread out geometrically, so
    a wait costs a number of calls that grows with the logarithm of its length (a 15 s
    launch about 10, a one-minute snapshot about 17) and overshoots by at most a third of
    its own length (and 5 s). Packer polls every 15 s: up to 15 s lost at every wait.
    """
    return min(5.0, max(0.25, waited / 3))


class Limits(TypedDict, total=False):
    """How a wait ends besides success: ``timeout`` (s), ``failed`` states, the state a NotFound means."""

    timeout: Required[float]
    failed: Iterable[str]
    missing: str


def wait_for(
    waits: Waits,
    key: str | None,
    what: str,
    describe: Callable[[], str],
    wanted: str | Sequence[str],
    **limits: Unpack[Limits],
) -> str:
    """Poll ``describe`` (returns a state) until it is ``wanted``; fast first, then back off.

    A NotFound answer counts as the state ``missing`` (e.g. "terminated" when waiting
    for an instance to go). Raises CloudError when a ``failed`` state shows,
    WaitTimeout after ``timeout``. With a ``key`` (scope, region and kind of wait), how long
    such waits took lately is remembered (``Waits``) and sets when to look (``WaitPlan``);
    without, or when a wait runs long, looks back off geometrically (``poll_delay``).
    """
    timeout, missing = limits["timeout"], limits.get("missing", "not-yet-visible")
    wanted_states = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    bad = set(limits.get("failed", ()))
    started = time.monotonic()
    deadline = started + timeout
    plan = waits.plan(key) if key else None
    if plan:
        time.sleep(min(plan.first, max(0.0, deadline - time.monotonic())))
    still = None  # when the last look that found it still going began (s from the start)
    while True:
        asked = time.monotonic()
        try:
            state = describe()
        except CloudError as exc:
            # EC2 is eventually consistent: a resource just made may not be found for a
            # moment, and one just removed stops being found. Neither is a failure.
            if not exc.code.endswith("NotFound"):
                raise
            state = missing
        now = time.monotonic()
        if state in wanted_states:
            if key:
                # It ended after the last "still going" look began and before this one answered.
                before = still if still is not None else (plan.before if plan else 0.0)
                waits.record(key, before, now - started)
            return state
        if state in bad:
            raise CloudError("wait", "UnexpectedState", f"{what} went {state!r} (wanted {wanted_states[0]!r})")
        first_miss = still is None
        still = asked - started
        waited = now - started
        if plan and plan.sure is not None and first_miss and waited < plan.sure:
            delay = plan.sure - waited  # early: look again when such waits have always been over
        elif plan and waited < plan.step * 30:
            delay = plan.step  # near the expected end: look often
        else:
            delay = poll_delay(waited)  # nothing known, or running long: back off
        if now + delay > deadline:
            raise WaitTimeout(what, wanted_states[0], state, timeout)
        time.sleep(delay)
