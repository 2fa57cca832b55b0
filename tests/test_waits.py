"""The learned wait schedule under EC2's variance: the fit of recent waits, where the looks go,
and what a series of waits drawn like EC2's costs in looks and in seconds past their end."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from pathlib import Path

import pytest

from builder.aws import waits as waits_module
from builder.aws.waits import SimulatedClock, Waits, fit, schedule, wait_for
from builder.errors import WaitTimeout


def lognormal(rng: random.Random, median: float, cv: float) -> float:
    return rng.lognormvariate(math.log(median), math.sqrt(math.log1p(cv * cv)))


def test_the_fit_recovers_a_lognormal_from_intervals_alone() -> None:
    rng = random.Random(3)
    draws = [lognormal(rng, 40.0, 0.3) for _ in range(60)]
    # Each end known only as the interval between two looks, 4 s apart, or as (0, first look].
    intervals = [(0.0, 30.0) if x <= 30 else (30 + 4 * ((x - 30) // 4), 30 + 4 * ((x - 30) // 4 + 1)) for x in draws]
    mu, sigma = fit(intervals)
    assert math.exp(mu) == pytest.approx(statistics.median(draws), rel=0.08)
    assert sigma == pytest.approx(statistics.stdev(math.log(x) for x in draws), abs=0.06)


def test_looks_go_where_the_ends_are_and_fewer_when_looks_cost_more() -> None:
    snapshot = schedule(math.log(45), 0.29)
    launch = schedule(math.log(15), 0.39)
    assert list(snapshot) == sorted(snapshot) and snapshot[0] < 45 < snapshot[-1]
    assert snapshot[0] > 45 * math.exp(-2.58 * 0.29)  # not before nearly every end
    gaps = [b - a for a, b in itertools.pairwise(snapshot)]
    assert max(gaps) < 8  # an end in the thick of it is seen within seconds
    assert statistics.median(b - a for a, b in itertools.pairwise(launch)) < statistics.median(gaps)
    assert len(schedule(math.log(45), 0.29, cost=3.0)) < len(snapshot)


@pytest.mark.parametrize(("median", "cv"), [(15.0, 0.4), (45.0, 0.3), (10.0, 0.3)])
def test_varying_waits_cost_few_looks_and_little_time_past_their_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, median: float, cv: float
) -> None:
    """Waits drawn like EC2's (a launch, a snapshot, an image): once learnt, three or four looks
    each and an end seen within a tenth of the wait (and a second or so) after it. The schedule
    it replaced (the typical end, then every twentieth of it) took six or seven looks."""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    waits, rng = Waits(tmp_path / "waits.json"), random.Random(11)
    looks: list[int] = []
    late: list[float] = []
    for _ in range(60):
        ends, start, count = lognormal(rng, median, cv), clock.now, 0

        def describe(ends: float = ends, start: float = start) -> str:
            nonlocal count
            count += 1
            return "done" if clock.now - start >= ends else "going"

        wait_for(waits, "k", "thing", describe, "done", timeout=3600)
        looks.append(count)
        late.append(clock.now - start - ends)
    learnt_looks, learnt_late = looks[8:], late[8:]
    assert statistics.fmean(learnt_looks) <= 4.5, learnt_looks
    assert statistics.fmean(learnt_late) <= 0.1 * median + 1.5, learnt_late


def test_a_slow_first_wait_does_not_keep_the_looks_late(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one slow wait (1.5 times the usual), the waits that follow all end sooner: the looks
    come back to where they end. (A schedule that took a first look finding it over as "it always
    ends there" kept looking at the slow time: 20-26 s late for every snapshot.)"""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    waits, rng, median = Waits(tmp_path / "waits.json"), random.Random(5), 45.0
    ends = [1.5 * median] + [min(lognormal(rng, median, 0.3), 1.3 * median) for _ in range(20)]
    late: list[float] = []
    for end in ends:
        start = clock.now
        wait_for(
            waits, "k", "thing", lambda e=end, s=start: "done" if clock.now - s >= e else "going", "done", timeout=600
        )
        late.append(clock.now - start - end)
    assert statistics.fmean(late[-10:]) < 0.12 * median, late


def test_a_wait_much_slower_than_lately_costs_a_few_looks_not_one_per_planned_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launches learnt at 12-18 s, then one takes 32 s (EC2 has such days): past the planned looks
    they come an eighth of the time waited apart, so it costs a handful more looks and is seen
    within an eighth of its length. (Looking as often as the last planned gap took twelve.)"""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    waits = Waits(tmp_path / "waits.json")
    for before, by in [(11.0, 12.5), (15.0, 16.2), (17.0, 18.4), (13.1, 14.0), (14.2, 15.5)]:
        waits.record("k", before, by)
    plan = waits.plan("k")
    assert plan is not None and plan.looks[-1] < 28
    count, start = 0, clock.now

    def describe() -> str:
        nonlocal count
        count += 1
        return "done" if clock.now - start >= 32.0 else "going"

    wait_for(waits, "k", "thing", describe, "done", timeout=600)
    past_plan = count - len(plan.looks)
    assert 1 <= past_plan <= 5, (count, plan.looks)
    assert clock.now - start - 32.0 <= 32.0 / 8 + 0.5


def _learnt_launches(waits: Waits) -> None:
    for before, by in [(11.0, 12.5), (15.0, 16.2), (17.0, 18.4), (13.1, 14.0), (14.2, 15.5)]:
        waits.record("k", before, by)


@pytest.mark.parametrize("ends", [9.0, 15.0, 32.0])
def test_a_sooner_check_ends_a_wait_at_once_with_the_first_planned_look_and_one_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: float
) -> None:
    """A launch whose sshd answers once it runs: the first planned look (it learns the address),
    then the check, asked every PROBE_EVERY, brings the next look forward. A fast, a usual and a
    slow launch each cost at most three looks (the slow one also a look that guards against a
    failure) and are seen within a probe's interval; without the check the slow one costs eight."""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    waits = Waits(tmp_path / "waits.json")
    _learnt_launches(waits)
    plan = waits.plan("k")
    assert plan is not None and len(plan.looks) >= 3
    count, asked, start = 0, 0, clock.now

    def describe() -> str:
        nonlocal count
        count += 1
        return "running" if clock.now - start >= ends else "pending"

    def answers() -> bool:
        nonlocal asked
        asked += 1
        return clock.now - start >= ends

    wait_for(waits, "k", "instance", describe, "running", timeout=600, sooner=answers)
    first = plan.looks[0]
    assert count == (1 if ends <= first else 2 if ends <= 2 * first else 3), (count, plan.looks)
    assert clock.now - start - ends <= waits_module.PROBE_EVERY + 1e-9 or ends <= first
    assert asked > 1  # asked between the looks, not only at them


def test_a_sooner_check_that_a_look_contradicts_is_not_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that says yes too early (another machine's sshd at that address) costs one look;
    after that the planned looks' back-off finds the end, as without a check."""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    waits = Waits(tmp_path / "waits.json")
    _learnt_launches(waits)
    count, asked, start = 0, 0, clock.now

    def describe() -> str:
        nonlocal count
        count += 1
        return "running" if clock.now - start >= 20.0 else "pending"

    def lies() -> bool:
        nonlocal asked
        asked += 1
        return True

    wait_for(waits, "k", "instance", describe, "running", timeout=600, sooner=lies)
    assert asked == 1 and count <= 10
    assert clock.now - start - 20.0 <= 20.0 / 8 + 0.5


def test_a_sooner_check_never_answering_still_times_out_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard looks spread out with the time waited, but never past the deadline: a wait of
    100 s ends at 100 s (not early because the next guard look would fall later), in few looks."""
    clock = SimulatedClock()
    monkeypatch.setattr(waits_module, "time", clock)
    count = 0

    def describe() -> str:
        nonlocal count
        count += 1
        return "pending"

    with pytest.raises(WaitTimeout):
        wait_for(Waits(tmp_path / "w.json"), None, "instance", describe, "running", timeout=100, sooner=lambda: False)
    assert clock.now == pytest.approx(100.0, abs=0.3) and count <= 9
