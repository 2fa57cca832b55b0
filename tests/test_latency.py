"""The sandbox's EC2 latency model: transitional states that last, and throttling."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import botocore.config
import botocore.exceptions
import pytest
import yaml

from builder.aws.ec2 import EC2
from builder.cli import output
from builder.errors import InvalidInput
from builder.reach import ssh_answers
from builder.sandbox import control
from builder.sandbox.dataplane import DataPlane
from builder.sandbox.latency import GIB, PRESETS, REALISTIC_CV, Bucket, Latency, Model
from tests.conftest import MINI_ROLE, run_cli
from tests.machines import needs_root
from tests.sandbox import REGION, World, wait_until

SCALE = 0.1  # fixed / 10: pending 1.5 s, creating 0.3 s, stopping 3 s, snapshot 4.5 s, image 1 s
BASE = "ami-000000000000000d2"


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    """A sandbox with the fixed latency model (scaled: its checks time each state) and throttling at 20 calls a second."""
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state, latency=("fixed", SCALE, 20.0))
    try:
        yield world
    finally:
        control.reset(state)


PACED = 0.3  # fixed * 0.3: a launch pending 4.5 s, time enough for a machine's sshd to come up


@pytest.fixture(scope="module")
def paced_world(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[World]:
    """A sandbox whose launches stay pending longer than its machines take to boot."""
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state, latency=("fixed", PACED, 20.0))
    try:
        yield world
    finally:
        control.reset(state)


def states(probe: Callable[[], str], final: str, since: float, limit: float = 60.0) -> tuple[list[str], float]:
    """Return the distinct states ``probe`` shows, in order, and the seconds from ``since`` (the
    call's monotonic time) until it showed ``final``.

    Sampling goes on for half a second after ``final`` (it must stay there); ``limit`` only
    bounds a stuck resource, so a slow host (a machine that takes long to halt) is not a failure.
    """
    seen: list[str] = []
    started = since
    reached: float | None = None
    while time.monotonic() - started < limit:
        state = probe()
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == final and reached is None:
            reached = time.monotonic() - started
        if reached is not None and time.monotonic() - started > reached + 0.5:
            break
        time.sleep(0.1)  # 10 calls a second: within the throttle
    return seen, reached if reached is not None else float("inf")


def test_presets_scale_and_round_trip() -> None:
    model = Model.preset("fixed", 0.1, rate=20)
    assert model.instance_pending == 1.5 and model.snapshot_pending == 4.5 and model.burst == 100
    assert Model.from_json(model.to_json()) == model
    assert not Model.preset("none").active and model.active
    with pytest.raises(InvalidInput, match="no latency preset 'glacial'"):
        Model.preset("glacial")


def latency(model: Model, written: Callable[[str], int] | None = None) -> Latency:
    """A Latency on its own (no sandbox): its draws are what the sandbox's transitions would last."""
    made = Latency(model, threading.RLock(), written)
    made.clock.stop()
    return made


EMPTY_STATUS = {"state": "/s", "machines": [], "loop_devices": [], "mounts": [], "bytes_on_disk": 0}
MIXED = ("instance_pending", "volume_creating", "snapshot_pending", "instance_stopping", "image_pending") * 40


def test_draws_for_a_seed_are_reproducible_and_seeds_differ() -> None:
    """One RNG per sandbox: the same seed, the same times for the same sequence of transitions."""

    def sequence(seed: int) -> list[float]:
        lat = latency(Model.preset("realistic", 1.0, seed=seed))
        return [lat.draw(t) for t in MIXED] + [lat.snapshot_time(2.5) for _ in range(20)]

    first = sequence(7)
    assert sequence(7) == first
    other = sequence(8)
    assert other != first and sum(a != b for a, b in zip(first, other, strict=True)) > len(first) * 0.9
    assert len(set(first)) > len(first) * 0.9  # draws, not one time repeated


@pytest.mark.parametrize("transition", [t for t in REALISTIC_CV if t != "snapshot_per_gib"])
def test_realistic_draws_have_the_presets_median_and_cv(transition: str) -> None:
    """Over many draws (fixed seed: no flakes) the sample median is the preset's time and the CV its CV."""
    scale = 0.5
    lat = latency(Model.preset("realistic", scale, seed=20261202))
    draws = [lat.draw(transition) for _ in range(20000)]
    median = PRESETS["realistic"][0][transition] * scale
    # Standard errors at 20000 draws: ~0.3 % of the median, ~0.005 of the CV; these bounds are 10x that.
    assert statistics.median(draws) == pytest.approx(median, rel=0.03)
    assert statistics.stdev(draws) / statistics.mean(draws) == pytest.approx(REALISTIC_CV[transition], abs=0.05)
    assert min(draws) > 0


def test_fixed_gives_exact_times() -> None:
    """fixed: every occurrence lasts exactly the preset's time (scaled), whatever the seed or the data."""
    for seed in (1, 2):
        lat = latency(Model.preset("fixed", 0.1, seed=seed))
        assert [lat.draw("instance_pending") for _ in range(5)] == [1.5] * 5
        assert lat.draw("instance_stopping") == 3.0 and lat.draw("image_pending") == 1.0
        assert lat.snapshot_time(0) == lat.snapshot_time(8) == 4.5


def test_snapshot_time_grows_with_the_gib_written() -> None:
    """realistic: a snapshot is a drawn base (40 s) plus a drawn 10 s per GiB its copy holds."""

    def median_time(gib: float) -> float:
        lat = latency(Model.preset("realistic", 1.0, seed=3))
        return statistics.median(lat.snapshot_time(gib) for _ in range(4000))

    medians = [median_time(g) for g in (0, 1, 4, 16)]
    assert medians == sorted(medians) and medians[0] == pytest.approx(40, rel=0.05)
    assert medians[2] == pytest.approx(80, rel=0.05) and medians[3] == pytest.approx(200, rel=0.05)

    # The sandbox's CreateSnapshot asks the data plane how much the snapshot holds.
    sizes = {"snap-small": 0, "snap-big": 20 * GIB}
    lat = latency(Model.preset("realistic", 1.0, seed=3), written=sizes.__getitem__)
    backend = SimpleNamespace(snapshots={k: SimpleNamespace(status="completed") for k in sizes})
    small = [lat._pending_snapshot(backend, "snap-small") for _ in range(50)]
    big = [lat._pending_snapshot(backend, "snap-big") for _ in range(50)]
    assert statistics.median(big) > statistics.median(small) + 150
    assert backend.snapshots["snap-big"].status == "pending"


def test_a_snapshot_written_counts_its_allocated_blocks(tmp_path: Path) -> None:
    """What the data plane reports as written: a sparse copy's allocated blocks, a tree's files; not the size."""
    plane = DataPlane(tmp_path / "data")
    sparse = tmp_path / "snap-a.img"
    with sparse.open("wb") as out:
        out.truncate(2 * GIB)  # a 2 GiB volume
        out.seek(GIB)
        out.write(b"x" * 3 * 2**20)  # 3 MiB written
    tree = tmp_path / "snap-b.tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "data").write_bytes(b"y" * 2**20)
    plane.snapshots.update({"snap-a": {"file": str(sparse)}, "snap-b": {"tree": str(tree), "layers": []}})
    assert 3 * 2**20 <= plane.snapshot_bytes("snap-a") < 4 * 2**20
    assert 2**20 <= plane.snapshot_bytes("snap-b") < 2 * 2**20
    assert plane.snapshot_bytes("snap-gone") == 0


def test_the_seed_and_model_are_recorded() -> None:
    """The seed, preset, scale and CVs are in the model's JSON (what `sandbox status --format json`
    shows as "latency"); the waits learnt under a model do not depend on its seed."""
    model = Model.preset("realistic", 0.5, rate=2, seed=424242)
    shown = json.loads(model.to_json())
    assert shown["seed"] == 424242 and shown["name"] == "realistic" and shown["scale"] == 0.5
    assert shown["cv"]["instance_pending"] == 0.4 and shown["snapshot_per_gib"] == 5.0
    assert Model.from_json(model.to_json()) == model
    other = json.loads(Model.preset("realistic", 0.5, rate=2, seed=1).to_json())
    assert control.Running(1, "e", shown).wait_scope == control.Running(2, "f", other).wait_scope
    fixed = json.loads(Model.preset("fixed", 0.5, rate=2, seed=1).to_json())
    assert control.Running(1, "e", fixed).wait_scope != control.Running(1, "e", other).wait_scope
    text = output.sandbox_status({"running": True, "endpoint": "e", "latency": shown, **EMPTY_STATUS})
    assert "seed 424242" in text and "preset realistic" in text


def test_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    for call, message in [
        (lambda: Model.preset("realistic", cv={"instance_pending": -0.1}), "cv: instance_pending: -0.1 is not"),
        (lambda: Model.preset("realistic", cv={"warp": 0.1}), "cv: no transition 'warp'"),
        (lambda: Model.preset("glacial"), "--latency: no latency preset 'glacial'"),
        (lambda: Model.preset("realistic", -1.0), "--latency-scale: -1.0 is not a factor"),
        (lambda: Model(instance_pending=-3), "instance_pending: -3 is negative"),
    ]:
        with pytest.raises(InvalidInput, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    # Before anything starts: no server, no state directory.
    with pytest.raises(InvalidInput, match="--latency-scale"):
        control.start(tmp_path / "state", latency=("realistic", -2.0, 0.0))
    assert not (tmp_path / "state").exists()
    done = run_cli("sandbox", "start", "--latency", "fixed", "--latency-scale", "-1", "--latency-seed", "3")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --latency-scale: -1.0 is not a factor (>= 0)"
    ], done.stderr


def test_bucket_admits_a_burst_then_the_rate() -> None:
    bucket = Bucket(rate=10, burst=3)
    assert [bucket.admit() for _ in range(4)] == [True, True, True, False]
    time.sleep(0.25)  # 2.5 tokens back
    assert [bucket.admit() for _ in range(3)] == [True, True, False]
    assert bucket.refused == 2


def timeline(world: World, resource: str, kind: str) -> dict[str, object]:
    """Return the sandbox's record of ``resource``'s ``kind`` transition (there is one)."""
    found = [t for t in world.status()["transitions"] if t["resource"] == resource and t["kind"] == kind]
    assert len(found) == 1, found
    return found[0]


@needs_root
def test_resources_stay_in_their_transitional_states(slow_world: World) -> None:
    """Each resource passes through its transitional state for at least the model's time.

    Only lower bounds are asserted: the model sets how long a state lasts at least, the host
    (how quickly a machine halts) may make it last longer. The sandbox's timeline records each
    transition with its drawn time and how late the first answer showing its end came: polled
    every 0.1 s, under half a second.
    """

    def recorded(resource: str, kind: str, drawn: float) -> None:
        shown = timeline(slow_world, resource, kind)
        assert shown["drawn"] == pytest.approx(drawn)
        assert isinstance(shown["late"], float) and 0 <= shown["late"] < 0.5, shown

    ec2 = slow_world.client()
    model = Model.preset("fixed", SCALE)
    shown = slow_world.status()["latency"]  # what `sandbox status --format json` shows
    assert shown["name"] == "fixed" and shown["scale"] == SCALE and isinstance(shown["seed"], int)

    def instance_state() -> str:
        return str(slow_world.describe(instance)["State"]["Name"])

    called = time.monotonic()
    instance = ec2.run_instances(ImageId=BASE, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    seen, took = states(instance_state, "running", called)
    assert seen == ["pending", "running"] and took >= model.instance_pending
    recorded(instance, "instance_pending", model.instance_pending)

    called = time.monotonic()
    volume = ec2.create_volume(Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"]
    seen, took = states(lambda: ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["State"], "available", called)
    assert seen == ["creating", "available"] and took >= model.volume_creating
    recorded(volume, "volume_creating", model.volume_creating)

    called = time.monotonic()
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    seen, took = states(
        lambda: ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["State"], "completed", called
    )
    assert seen == ["pending", "completed"] and took >= model.snapshot_pending
    recorded(snapshot, "snapshot_pending", model.snapshot_pending)

    called = time.monotonic()
    image = ec2.register_image(
        Name="latency",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot}}],
    )["ImageId"]
    seen, took = states(lambda: ec2.describe_images(ImageIds=[image])["Images"][0]["State"], "available", called)
    assert seen == ["pending", "available"] and took >= model.image_pending
    recorded(image, "image_pending", model.image_pending)

    called = time.monotonic()
    ec2.stop_instances(InstanceIds=[instance])
    seen, took = states(instance_state, "stopped", called)
    assert seen == ["stopping", "stopped"] and took >= model.instance_stopping  # however quick the machine
    recorded(instance, "instance_stopping", model.instance_stopping)
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance], WaiterConfig={"Delay": 1})

    called = time.monotonic()
    ec2.terminate_instances(InstanceIds=[instance])
    seen, took = states(instance_state, "terminated", called)
    assert seen == ["shutting-down", "terminated"] and took >= model.instance_shutting_down
    recorded(instance, "instance_shutting_down", model.instance_shutting_down)
    ec2.terminate_instances(InstanceIds=[instance])  # again: already terminated, nothing starts over
    assert instance_state() == "terminated"


@needs_root
def test_throttling_answers_request_limit_exceeded(slow_world: World) -> None:
    no_retry = slow_world.client(REGION, config=botocore.config.Config(retries={"total_max_attempts": 1}))
    time.sleep(5)  # a full bucket: 100 calls at once, then 20 a second
    codes = []
    for _ in range(200):
        try:
            no_retry.describe_regions()
        except botocore.exceptions.ClientError as exc:
            codes.append(exc.response["Error"]["Code"])
    assert codes and set(codes) == {"RequestLimitExceeded"}
    assert slow_world.status()["throttled"] >= len(codes)


def test_a_group_in_use_is_not_deleted_until_its_instance_has_terminated(slow_world: World) -> None:
    """As EC2 does (moto does not): DeleteSecurityGroup answers DependencyViolation while an
    instance that uses the group is shutting down; EC2.delete_security_group rides it out."""
    ec2 = slow_world.client()
    group = ec2.create_security_group(GroupName="in-use", Description="in use")["GroupId"]
    instance = ec2.run_instances(ImageId=BASE, MinCount=1, MaxCount=1, SecurityGroupIds=[group])["Instances"][0]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        ec2.delete_security_group(GroupId=group)
    assert refused.value.response["Error"]["Code"] == "DependencyViolation"
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    asked = time.monotonic()
    tool = EC2.connect(REGION, None, slow_world.endpoint, credentials=control.credentials(slow_world.state))
    tool.delete_security_group(group, timeout=60)
    assert time.monotonic() - asked >= Model.preset("fixed", SCALE).instance_shutting_down - 0.5
    assert slow_world.describe(instance["InstanceId"])["State"]["Name"] == "terminated"
    assert group not in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}


@needs_root
def test_a_build_rides_out_the_modelled_waits(slow_world: World, tmp_path: Path) -> None:
    """Every wait of a build (pending, stopping, snapshots, image, shutting down) lasts; it still completes."""
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    started = time.monotonic()
    done = slow_world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert done.returncode == 0, done.stderr
    build = json.loads(done.stdout)["builds"][0]
    assert build["result"] == "complete"
    model = Model.preset("fixed", SCALE)
    assert time.monotonic() - started >= model.instance_pending + model.instance_stopping + model.snapshot_pending
    ec2 = slow_world.client()
    assert ec2.describe_images(ImageIds=[build["ami"]])["Images"][0]["State"] == "available"


@needs_root
def test_a_launched_machines_sshd_answers_only_once_it_shows_running(paced_world: World) -> None:
    """As on EC2, nothing answers SSH at an instance that is still pending, though its machine has
    long booted (4.5 s pending); once it shows running, its sshd answers at its address."""
    ec2 = paced_world.client()
    called = time.monotonic()
    instance = ec2.run_instances(ImageId=BASE, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    address = paced_world.describe(instance)["PublicIpAddress"]
    answered_pending = []
    while (shown := paced_world.describe(instance))["State"]["Name"] == "pending":
        answered_pending.append(ssh_answers(address, 22))
        time.sleep(0.2)
    assert shown["State"]["Name"] == "running" and time.monotonic() - called >= 4.5
    assert len(answered_pending) > 5 and not any(answered_pending)
    wait_until(lambda: ssh_answers(address, 22), 30, "its sshd to answer once running")
    ec2.terminate_instances(InstanceIds=[instance])


@needs_root
def test_a_build_sees_its_builder_run_when_its_sshd_answers_not_by_polling(paced_world: World, tmp_path: Path) -> None:
    """A first build (nothing learnt) of a builder pending 4.5 s: a look at once (its address),
    looks that only guard against a failure 2 and 4 s in, then its sshd answers and one look
    confirms. Polling alone looked about ten times; the end is seen within a second."""
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    before = paced_world.status()["api_calls_by_action"].get("DescribeInstances", 0)
    done = paced_world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert done.returncode == 0, done.stderr
    status = paced_world.status()
    assert status["api_calls_by_action"]["DescribeInstances"] - before <= 5
    pending = [t for t in status["transitions"] if t["kind"] == "instance_pending"][-1]  # the builder's
    assert pending["late"] is not None and pending["late"] < 1.0, pending


@needs_root
def test_a_build_gets_through_throttling(
    tmp_path_factory: pytest.TempPathFactory, rootfs: Path, tmp_path: Path
) -> None:
    """At one EC2 call a second (a burst of 5) a build is refused calls, and completes: they are retried."""
    state = tmp_path_factory.mktemp("sandbox")
    world = World.start(state, latency=("none", 1.0, 1.0))
    try:
        roles = tmp_path / "roles"
        roles.mkdir()
        (roles / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
        done = world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["builds"][0]["result"] == "complete"
        assert world.status()["throttled"] > 0  # it was refused, not merely slow
    finally:
        control.reset(state)


@needs_root
def test_stopping_during_copies_names_the_copies_left(slow_world: World, tmp_path: Path) -> None:
    """Copies take the modelled snapshot and image time; stopped (SIGTERM, as Ctrl-C), the tool names each copy EC2 still makes."""
    roles = tmp_path / "roles"
    roles.mkdir()
    (roles / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    built = slow_world.cli("mini", "--roles-dir", str(roles), "--sandbox", "--format", "json")
    assert built.returncode == 0, built.stderr
    ami = json.loads(built.stdout)["builds"][0]["ami"]
    log = tmp_path / "copy.log"
    regions = ("eu-west-1", "eu-central-1")
    args = ["copy", "mini", "--ami", ami, *[a for r in regions for a in ("--to", r)]]
    proc = slow_world.popen(*args, "--roles-dir", str(roles), "--sandbox", log=log)
    deadline = time.monotonic() + 60
    while "at once" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # both CopyImage calls answered; their snapshots take 4.5 s
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    output = log.read_text()
    for region in regions:
        left = [line for line in output.splitlines() if f"copy to {region}: AMI ami-" in line]
        assert left and "left copying" in left[0], output
        copied = left[0].split("AMI ")[1].split()[0]
        # It is EC2's to finish: the copy goes on, and is there to be picked up or removed.
        assert slow_world.client(region).describe_images(ImageIds=[copied])["Images"]
