"""bench/vs_packer.py's arithmetic: each run's own bound from its drawn waits, percentiles, and a
contender that fails becoming a row with its error (the bench goes on) rather than a crash."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vs_packer", PROJECT / "bench" / "vs_packer.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_packer"] = module
    spec.loader.exec_module(module)
    return module


def drawn(pending: float, snapshots: tuple[float, ...], image: float, late: float | None = 0.5) -> list[dict[str, Any]]:
    """A run's transitions as the sandbox's status lists them."""
    return [
        {"kind": "instance_pending", "resource": "i-1", "drawn": pending, "late": late},
        *(
            {"kind": "snapshot_pending", "resource": f"snap-{n}", "drawn": s, "late": late}
            for n, s in enumerate(snapshots)
        ),
        {"kind": "image_pending", "resource": "ami-1", "drawn": image, "late": late},
        {"kind": "instance_shutting_down", "resource": "i-1", "drawn": 30.0, "late": None},
    ]


def run(wall: float, transitions: list[dict[str, Any]], calls: int = 20, error: str | None = None) -> dict[str, Any]:
    return {"wall_s": wall, "calls": {"DescribeInstances": calls}, "transitions": transitions, "error": error}


def test_each_runs_bound_is_its_own_draws_with_no_stop(bench: ModuleType) -> None:
    # launch 12 + the slower snapshot 50 + image 9 + the machine's work 20; the stop is not on it
    transitions = [*drawn(12.0, (41.0, 50.0), 9.0), {"kind": "instance_stopping", "drawn": 30.0, "late": 1.0}]
    assert bench.run_bound(transitions, 20.0) == 91.0
    assert bench.run_bound(drawn(12.0, (), 9.0), 20.0) is None  # failed before its snapshots


def test_p90_and_the_summary_of_finished_runs(bench: ModuleType) -> None:
    assert bench.p90([5.0]) == 5.0
    assert bench.p90([float(v) for v in range(1, 11)]) == pytest.approx(9.1)
    runs = [run(100.0 + n, drawn(10.0, (50.0,), 10.0, late=float(n)), calls=18 + n) for n in range(10)]
    row = bench.summarize(runs, 20.0)  # every bound is 90
    assert row["failed"] == 0 and row["wall_s"]["median"] == 104.5 and row["wall_s"]["p90"] == pytest.approx(108.1)
    assert row["over_bound"]["median"] == pytest.approx(104.5 / 90, abs=1e-3)
    assert row["calls"] == 22.5
    assert row["late_s"]["snapshot_pending"] == {"median": 4.5, "p90": 8.1, "n": 10}
    assert "instance_shutting_down" not in row["late_s"]  # never seen to end: no lateness to report


def test_a_failing_contender_is_a_row_with_its_error(bench: ModuleType) -> None:
    error = "Error waiting for AMI: ResourceNotReady: exceeded wait attempts"
    ok = [run(100.0, drawn(10.0, (50.0,), 10.0))]
    summary = {
        "ours": bench.summarize(ok, 20.0),
        bench.DEFAULTS: bench.summarize([*ok, run(61.0, [], error=error)], 20.0),
        bench.ONE_SECOND: bench.summarize([run(70.0, [], error=error), run(71.0, [], error=error)], 20.0),
    }
    assert summary[bench.DEFAULTS]["failed"] == 1 and summary[bench.DEFAULTS]["wall_s"]["median"] == 100.0
    assert summary[bench.ONE_SECOND] == {"runs": 2, "failed": 2, "errors": [error]}
    checked = {t["target"]: t for t in bench.targets(summary)}
    assert checked["faster than Packer at 1 s polls"]["met"] is None  # not measurable, and not a pass
    assert checked["at least 1.6x faster than Packer's defaults"]["met"] is False
    result = {
        "scale": 1.0,
        "runs": 2,
        "seed": 7,
        "model": {"rate": 20},
        "throttled_calls": 0,
        "machine_work_s": 20.0,
        "when": "now",
        "summary": summary,
        "targets": bench.targets(summary),
    }
    text = bench.table(result)
    assert f"| {bench.ONE_SECOND} | failed 2 of 2: {error} |" in text
    assert f"failed 1 of 2: {error}" in text
    assert "QUICK MODE" not in text and "not judged" not in text
    quick = bench.table({**result, "scale": 0.1, "targets": bench.targets(summary, 0.1)})
    assert "QUICK MODE" in quick and "| at least 1.6x faster than Packer's defaults | 1.0 | not judged |" in quick
    assert all(t["met"] is None for t in bench.targets(summary, 0.1))
    assert "--only" not in text  # both sides ran


def test_a_run_of_one_side_replays_with_only_and_says_what_it_did_not_measure(bench: ModuleType) -> None:
    summary = {"ours": bench.summarize([run(100.0, drawn(10.0, (50.0,), 10.0))], 20.0)}
    result = {
        "scale": 1.0,
        "runs": 1,
        "seed": 1,
        "model": {"rate": 20},
        "throttled_calls": 0,
        "machine_work_s": 20.0,
        "when": "now",
        "summary": summary,
        "targets": bench.targets(summary),
    }
    text = bench.table(result)
    assert "`bench/vs_packer.py --only ours --scale 1.0 --seed 1`" in text
    assert "| faster than Packer at 1 s polls | not measured | n/a |" in text and "None" not in text


def test_packers_error_line_is_read_from_its_machine_readable_output(bench: ModuleType) -> None:
    out = "\n".join(
        [
            "1700000000,,ui,say,==> amazon-ebs: Creating AMI",
            "1700000100,,ui,error,Build 'amazon-ebs' errored: Error waiting for AMI%!(PACKER_COMMA) "
            "ResourceNotReady: exceeded wait attempts",
            "1700000100,,error-count,1",
        ]
    )
    assert bench.packer_error(out) == (
        "Build 'amazon-ebs' errored: Error waiting for AMI, ResourceNotReady: exceeded wait attempts"
    )
    assert bench.packer_error("no machine-readable lines\nlast words\n") == "last words"


def test_lateness_counts_only_the_waits_the_build_hangs_on(bench: ModuleType) -> None:
    # Two snapshots: the quicker one's end was seen late (the build was still waiting for the
    # other), which costs nothing; the builder's shutdown is off the critical path.
    transitions = [
        {"kind": "instance_pending", "resource": "i-1", "drawn": 12.0, "late": 1.0},
        {"kind": "snapshot_pending", "resource": "snap-root", "drawn": 50.0, "late": 2.0},
        {"kind": "snapshot_pending", "resource": "snap-data", "drawn": 30.0, "late": 21.0},
        {"kind": "instance_shutting_down", "resource": "i-1", "drawn": 30.0, "late": 40.0},
        {"kind": "image_pending", "resource": "ami-1", "drawn": 9.0, "late": 0.5},
    ]
    row = bench.summarize([run(80.0, transitions)], 5.0)
    assert {kind: late["median"] for kind, late in row["late_s"].items()} == {
        "instance_pending": 1.0,
        "snapshot_pending": 2.0,
        "image_pending": 0.5,
    }
