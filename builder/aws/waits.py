"""The learned wait schedule: when to look at a resource EC2 is changing, and for how long.

How long recent waits of each kind took (per endpoint and region) is kept in a small file.
While they agree, the next wait of that kind looks where they have ended. When they vary (EC2
does: a launch takes 8-40 s), their distribution is fitted and the looks are placed where
they buy the most: each look costs an EC2 call, each second past the end costs a second of
the build. Without history, or when a wait runs long, looks back off geometrically. Never a
bare sleep loop; always within a deadline.
"""

from __future__ import annotations

import json
import logging
import math
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

    ``looks``: when to look (seconds after the wait starts), in order; ``step``: the spacing of
    later looks near the end, once the planned looks found it still going.
    """

    looks: tuple[float, ...]
    step: float


# How many seconds of waiting one look (a Describe call) is worth when the waits vary: the
# looks are placed to minimise the expected seconds past the end plus this per look. 0.75 s
# gives about three looks a wait for EC2's spread (a launch, a snapshot, an image) and ends
# seen within a few seconds.
LOOK_COST = 0.75


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def fit(intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Fit a lognormal to waits known only as intervals (before, by]: return (mu, sigma) of its log.

    The maximum-likelihood fit for interval-censored data (each wait's likelihood is the
    probability of ending in its interval), by a grid search around the intervals' centre.
    """
    centres = [math.log(max(hi if lo <= 0 else math.sqrt(lo * hi), 1e-3)) for lo, hi in intervals]
    centre = statistics.fmean(centres)
    bounds = [(math.log(lo) if lo > 0 else -math.inf, math.log(max(hi, 1e-3))) for lo, hi in intervals]
    best = (-math.inf, centre, 0.1)
    for i in range(-20, 21):
        mu = centre + 0.03 * i
        for j in range(25):
            sigma = 0.02 * 1.17**j  # 0.02 to 0.87
            likelihood = 0.0
            for lo, hi in bounds:
                p = _phi((hi - mu) / sigma) - (_phi((lo - mu) / sigma) if lo > -math.inf else 0.0)
                likelihood += math.log(max(p, 1e-12))
            if likelihood > best[0]:
                best = (likelihood, mu, sigma)
    return best[1], best[2]


def schedule(mu: float, sigma: float, cost: float = LOOK_COST, points: int = 80) -> tuple[float, ...]:
    """Return the looks that minimise expected seconds past the end + ``cost`` per look, for a lognormal end.

    Dynamic programming over a grid of times from its 0.5th to its 99.5th percentile: the
    best next look after each, given that the wait was still going there.
    """
    z = 2.5758  # the 99.5th percentile of the standard normal
    low, high = math.exp(mu - z * sigma), math.exp(mu + z * sigma)
    times = [low + (high - low) * i / (points - 1) for i in range(points)]
    cdf = [_phi((math.log(t) - mu) / sigma) for t in times]
    # E[X; X <= t] of the lognormal: its mean times the cdf at t shifted by sigma^2.
    partial = [math.exp(mu + sigma * sigma / 2) * _phi((math.log(t) - mu - sigma * sigma) / sigma) for t in times]

    def between(i: int, j: int) -> float:
        """Expected seconds past the end for an end in (times[i], times[j]] seen by a look at times[j]."""
        low_cdf, low_partial = (cdf[i], partial[i]) if i >= 0 else (0.0, 0.0)
        return (cdf[j] - low_cdf) * times[j] - (partial[j] - low_partial)

    after = [0.0] * points  # expected cost from look i on, given the end was after it (unnormalised)
    following: list[int | None] = [None] * points
    after[-1] = cost * (1 - cdf[-1])  # past the grid (one time in 200): one more look, about
    for i in range(points - 2, -1, -1):
        after[i] = math.inf
        for j in range(i + 1, points):
            total = cost * (1 - cdf[i]) + between(i, j) + after[j]
            if total < after[i]:
                after[i], following[i] = total, j
    look = min(range(points), key=lambda j: between(-1, j) + after[j])
    looks = [times[look]]
    while (nxt := following[look]) is not None:
        look = nxt
        looks.append(times[look])
    return tuple(looks)


class Waits:
    """How long recent waits of each kind took, per endpoint and region, kept in a small file.

    A wait is kept as the interval its end fell in: (the last look that found it still
    going, the first look that found it over], in seconds from its start. While the
    intervals agree (EC2 takes about the same time each build), the next wait looks first
    in the middle of what they leave open, and at its end when that is already narrow: a
    few builds in, each wait costs one look and overshoots by a few per cent. When they
    disagree (the waits vary), a lognormal is fitted to them and the looks are placed by
    ``schedule``: about three looks, and an end seen within a few seconds.
    """

    KEEP = 8

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
        mu, sigma = fit(intervals)
        # A wait or two say little about the spread: assume EC2's own (a CV near 0.3) at first.
        looks = schedule(mu, max(sigma, 0.3 / len(intervals)), LOOK_COST)
        # Past the planned looks (EC2 slower than lately): as often as the last of them, at
        # least a twentieth of the wait apart.
        step = max(looks[-1] - looks[-2] if len(looks) > 1 else 0.0, looks[-1] / 20, 0.1)
        return WaitPlan(looks, step)

    def record(self, key: str, before: float, by: float) -> None:
        with self.lock:
            data = self._load()
            entry = [round(max(0.0, before), 3), round(max(0.0, by), 3)]
            data[key] = [*data.get(key, []), entry][-self.KEEP :]
            try:
                write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
            except OSError as exc:  # a cache: never a reason to fail
                log.debug("could not record wait times in %s: %s", self.path, exc)


class SimulatedClock:
    """Time for simulating a series of waits (tests, bench/wait_schedule.py): sleeping moves it on.

    Stands in for the module's ``time`` (``monotonic`` and ``sleep``), so the schedule runs as it
    does against EC2, in no time.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


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
    """How a wait ends besides success: ``timeout`` (s), ``failed`` states, the state a NotFound means.

    ``sooner``: a check that costs no EC2 call and says the wait may be over now (the
    builder's sshd answers: it is running). Between looks it is asked every PROBE_EVERY
    seconds and a yes brings the next look forward; the looks themselves, after the first
    planned one, only guard against a failure (a launch that ends terminated) and spread out
    with the time waited. A yes that a look then contradicts is not asked again.
    """

    timeout: Required[float]
    failed: Iterable[str]
    missing: str
    sooner: Callable[[], bool]


PROBE_EVERY = 0.25  # seconds between two asks of a wait's ``sooner`` check


def guard_delay(waited: float) -> float:
    """Return the sleep before the next look of a wait a ``sooner`` check watches: the time waited (2-60 s).

    Those looks are only there to see a failure, so they double the wait each time: a 15 s
    launch costs two or three, and a failure is seen within the time already waited.
    """
    return min(60.0, max(2.0, waited))


def _sleep(seconds: float, sooner: Callable[[], bool] | None) -> bool:
    """Sleep ``seconds``, asking ``sooner`` every PROBE_EVERY; return True when it said yes (and stop then)."""
    if sooner is None:
        time.sleep(seconds)
        return False
    end = time.monotonic() + seconds
    while True:
        if sooner():
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(PROBE_EVERY, left))


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
    without, or when a wait runs long, looks back off geometrically (``poll_delay``). With a
    ``sooner`` check (see ``Limits``) the looks after the first planned one only guard against
    a failure (``guard_delay``) and the check says when to look.
    """
    timeout, missing = limits["timeout"], limits.get("missing", "not-yet-visible")
    wanted_states = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    bad = set(limits.get("failed", ()))
    sooner = limits.get("sooner")
    started = time.monotonic()
    deadline = started + timeout
    plan = waits.plan(key) if key else None
    # With a sooner check, only the first planned look is kept (it also finds what the check
    # needs, such as an address); the check then says when to look.
    looks = list(plan.looks) if plan else []
    held: list[float] = []  # with a sooner check, the planned looks after the first: kept for if it fails
    if sooner:
        looks, held = looks[:1], looks[1:]
    woken = False  # the last sleep was cut short by the sooner check
    if looks:
        woken = _sleep(min(looks.pop(0), max(0.0, deadline - time.monotonic())), sooner)
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
                # It ended after the last "still going" look began and before this one answered;
                # a first look that finds it over says only that (never what earlier waits did).
                waits.record(key, still if still is not None else 0.0, now - started)
            return state
        if state in bad:
            raise CloudError("wait", "UnexpectedState", f"{what} went {state!r} (wanted {wanted_states[0]!r})")
        if woken:  # the check said over, the look says not: looks alone from now on
            log.debug("%s: the sooner check said yes but it is %s; not asked again", what, state)
            sooner, woken, looks = None, False, held
        still = asked - started
        waited = now - started
        while looks and looks[0] <= waited:  # a slow answer: skip the looks it overran
            looks.pop(0)
        if looks:
            delay = looks.pop(0) - waited  # the planned looks
        elif sooner is not None:
            delay = min(guard_delay(waited), max(0.0, deadline - now))  # looks that only guard
        elif plan and waited < 2 * plan.looks[-1]:
            # Past them, EC2 is slower than lately: as often as the last of them at first, then
            # an eighth of the time waited apart (a wait half again as long as planned costs
            # about four more looks, not one per planned gap).
            delay = min(poll_delay(waited), max(plan.step, waited / 8))
        else:
            delay = poll_delay(waited)  # nothing known, or running long: back off
        if now + delay > deadline or now >= deadline:
            raise WaitTimeout(what, wanted_states[0], state, timeout)
        woken = _sleep(delay, sooner)
