"""EC2's waiting, modelled: transitional states that last, and API throttling.

moto is instant: an instance is `running` on the first describe, a snapshot `completed`
at once. On AWS a build is mostly waiting, and a tool is judged by how little of that
waiting it wastes. With a latency model the sandbox keeps each resource in its
transitional state for a set time before the real state shows through: an instance
`pending` after RunInstances, `stopping` after StopInstances (at least until its machine
has halted), `shutting-down` after TerminateInstances; a volume `creating`, an attachment
`attaching`; a snapshot `pending`; an image `pending` (CreateImage and CopyImage also wait
for their snapshots). The presets' times are what EC2 takes for a small Debian instance
and a fresh volume; ``scale`` shrinks them so a benchmark run stays short. Throttling is a
token bucket over every EC2 call: past it, the call fails with RequestLimitExceeded
(HTTP 503), as EC2's does.

Real EC2 varies: a launch takes 8-40 s, a snapshot's time grows with the data written. In
the ``realistic`` preset each transitional time is drawn, when its transition starts, from
a lognormal distribution whose *median* is the preset's time (scaled) and whose coefficient
of variation (standard deviation / mean) is the preset's CV for that transition. A
snapshot's time is a base plus a part per GiB written (the bytes its copy in the data plane
holds), each drawn. The draws come from one ``random.Random(seed)`` per sandbox, taken
under the sandbox lock: the same seed and the same sequence of transitions give the same
times. ``fixed`` is the same medians with no variance and no per-GiB part (each transition
lasts exactly its time); ``none`` is moto's instant EC2.

Every transition is kept on a timeline (``Transition``): what it was, which resource, the time
drawn for it, and how late a client saw it end: from the moment its final state showed to the
first Describe answer that carried that state. A benchmark reads it from the sandbox's status to
compute each build's own lower bound and each tool's overshoot per kind of wait.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any

from builder.errors import InvalidInput

# Seconds, unscaled (the median of each draw). Sources: typical Nitro launches reach
# `running` in ~10-20 s (8-40 s seen); a stop or termination of a small instance ~30 s; a new
# gp3 volume is available in a few seconds; the first snapshot of a fresh small volume takes
# about a minute, more the more blocks were written; an image is available some seconds
# after its snapshots.
TIMES: dict[str, float] = {
    "instance_pending": 15,
    "instance_stopping": 30,
    "instance_shutting_down": 30,
    "volume_creating": 3,
    "volume_attaching": 2,
    "snapshot_pending": 45,
    "image_pending": 10,
}
# realistic: a snapshot is 40 s plus 10 s per GiB written (about 100 MiB/s), so the small
# volumes a build snapshots (little written) take about fixed's 45 s.
REALISTIC_TIMES = {**TIMES, "snapshot_pending": 40, "snapshot_per_gib": 10}
# Coefficient of variation of each draw (standard deviation / mean). A launch's 0.4 puts
# 90 % of launches between about 8 and 28 s around the 15 s median.
REALISTIC_CV: dict[str, float] = {
    "instance_pending": 0.4,
    "instance_stopping": 0.3,
    "instance_shutting_down": 0.3,
    "volume_creating": 0.3,
    "volume_attaching": 0.3,
    "snapshot_pending": 0.3,
    "snapshot_per_gib": 0.3,
    "image_pending": 0.3,
}
PRESETS: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "none": ({}, {}),
    "fixed": (TIMES, {}),
    "realistic": (REALISTIC_TIMES, REALISTIC_CV),
}
TRANSITIONS = (*TIMES, "snapshot_per_gib")


def new_seed() -> int:
    """A random seed, for a sandbox started without one (it is recorded in its status)."""
    return random.SystemRandom().randrange(2**31)


@dataclass(frozen=True)
class Model:
    """How long each transition lasts (seconds, already scaled: the median of its draw), its
    spread, and the API rate limit."""

    instance_pending: float = 0
    instance_stopping: float = 0
    instance_shutting_down: float = 0
    volume_creating: float = 0
    volume_attaching: float = 0
    snapshot_pending: float = 0
    snapshot_per_gib: float = 0  # added per GiB the snapshot holds
    image_pending: float = 0
    rate: float = 0  # EC2 calls per second; 0: no throttling
    burst: int = 0  # calls at once before the rate applies (EC2's buckets are deep)
    cv: dict[str, float] = field(default_factory=dict)  # transition -> coefficient of variation
    name: str = "none"  # the preset's
    scale: float = 1.0
    seed: int = 0  # of the sandbox's random.Random: the same seed, the same draws

    def __post_init__(self) -> None:
        for name in TRANSITIONS:
            if getattr(self, name) < 0:
                raise InvalidInput(f"latency model: {name}: {getattr(self, name)} is negative")
        for name, value in self.cv.items():
            if name not in TRANSITIONS:
                raise InvalidInput(f"latency model: cv: no transition {name!r} (have: {', '.join(TRANSITIONS)})")
            if not value >= 0:  # also NaN
                raise InvalidInput(f"latency model: cv: {name}: {value} is not a coefficient of variation (>= 0)")

    @classmethod
    def preset(
        cls, name: str, scale: float = 1.0, rate: float = 0, seed: int = 0, cv: dict[str, float] | None = None
    ) -> Model:
        """Return preset ``name`` with its times multiplied by ``scale``; a burst of 5 s worth of calls.

        ``cv`` overrides the preset's coefficients of variation for the transitions it names.
        """
        if name not in PRESETS:
            raise InvalidInput(f"--latency: no latency preset {name!r} (have: {', '.join(PRESETS)})")
        if not scale >= 0:
            raise InvalidInput(f"--latency-scale: {scale} is not a factor (>= 0)")
        if not rate >= 0:
            raise InvalidInput(f"--api-rate: {rate} is not a rate (>= 0)")
        base, spread = PRESETS[name]
        times = {k: round(v * scale, 3) for k, v in base.items()}
        return cls(
            **times,
            rate=rate,
            burst=max(1, round(5 * rate)) if rate else 0,
            cv={**spread, **(cv or {})},
            name=name,
            scale=scale,
            seed=seed,
        )

    @property
    def active(self) -> bool:
        return any(getattr(self, k) for k in TRANSITIONS) or self.rate > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Model:
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in json.loads(text).items() if k in known})


def lognormal(rng: random.Random, median: float, cv: float) -> float:
    """Draw from the lognormal with this median and coefficient of variation (cv 0: the median itself).

    A lognormal's CV is sqrt(exp(sigma^2) - 1), so sigma^2 = ln(1 + cv^2); its median is exp(mu).
    """
    if median <= 0 or cv <= 0:
        return median
    return rng.lognormvariate(math.log(median), math.sqrt(math.log1p(cv * cv)))


class Clock:
    """Runs callbacks at their time, each under ``lock``, on one thread."""

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._run, daemon=True, name="latency-clock").start()

    def at(self, delay: float, callback: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._order), callback))
            self._wake.notify()

    def flush(self) -> None:
        """Run everything pending now (the sandbox is stopping: show final states)."""
        with self._wake:
            queue, self._queue = self._queue, []
        for _, _, callback in sorted(queue):
            with self.lock:
                callback()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and (not self._queue or self._queue[0][0] > time.monotonic()):
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._wake.wait(timeout)
                if self._stopped:
                    return
                _, _, callback = heapq.heappop(self._queue)
            with self.lock:
                callback()


class Bucket:
    """A token bucket: ``rate`` calls a second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.refused = 0

    def admit(self) -> bool:
        if self.rate <= 0:
            return True
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            self.refused += 1
            return False


def set_state(instance: Any, name: str, code: int) -> None:
    instance._state.name, instance._state.code = name, code


GIB = 2**30
# Which Describe answer shows a transition's end: the action, the resource id's tag in its answer.
SHOWN_BY: dict[str, tuple[str, tuple[str, ...]]] = {
    "DescribeInstances": ("instanceId", ("instance_pending", "instance_stopping", "instance_shutting_down")),
    "DescribeVolumes": ("volumeId", ("volume_creating", "volume_attaching")),
    "DescribeSnapshots": ("snapshotId", ("snapshot_pending",)),
    "DescribeImages": ("imageId", ("image_pending",)),
}


@dataclass
class Transition:
    """One transition of one resource: its drawn time, when its end showed and was first seen (monotonic).

    ``drawn`` is the transition's own draw; an image made by CreateImage or CopyImage is
    pending that plus its slowest snapshot's time.
    """

    kind: str  # a TRANSITIONS name: "instance_pending", "snapshot_pending", ...
    resource: str
    drawn: float
    started: float
    ended: float | None = None
    seen: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Seconds only, none of the process's clock: kind, resource, drawn, and ``late``
        (from the end to the first answer showing it; None while not ended or not seen)."""
        late = self.seen - self.ended if self.seen is not None and self.ended is not None else None
        return {
            "kind": self.kind,
            "resource": self.resource,
            "drawn": round(self.drawn, 3),
            "late": None if late is None else round(late, 3),
        }


class Latency:
    """Applies a Model to the resources EC2 calls create or change (called under the sandbox lock).

    ``written`` returns the bytes a snapshot holds (its copy in the data plane): the
    per-GiB part of its time.
    """

    def __init__(self, model: Model, lock: threading.RLock, written: Callable[[str], int] | None = None) -> None:
        self.model = model
        self.clock = Clock(lock)
        self.bucket = Bucket(model.rate, model.burst)
        self.rng = random.Random(model.seed)  # noqa: S311 (a simulation's draws, no secret)
        self.written = written or (lambda snapshot_id: 0)
        self.not_before: dict[str, float] = {}  # instance id -> earliest time `stopped` may show
        self.terminating: set[str] = set()  # a second TerminateInstances does not start it again
        self.timeline: list[Transition] = []
        self.unseen: dict[str, list[Transition]] = {}  # resource id -> its transitions not yet seen to end
        self.on_running: Callable[[Any], None] | None = None  # given a launched instance once it shows running

    def draw(self, transition: str) -> float:
        """Seconds this occurrence of ``transition`` lasts: a draw around the model's median."""
        return lognormal(self.rng, getattr(self.model, transition), self.model.cv.get(transition, 0.0))

    def begin(self, kind: str, resource: str, drawn: float) -> Transition:
        """Put a transition that has just started, with its drawn time, on the timeline."""
        transition = Transition(kind, resource, drawn, time.monotonic())
        self.timeline.append(transition)
        self.unseen.setdefault(resource, []).append(transition)
        return transition

    def ended(self, resource: str, kind: str) -> None:
        """The resource's ``kind`` transition shows its final state from now on."""
        for transition in self.unseen.get(resource, []):
            if transition.kind == kind and transition.ended is None:
                transition.ended = time.monotonic()

    def seen(self, action: str, ids: list[str]) -> None:
        """A Describe answer just showed these resources: their ended transitions have been seen."""
        kinds = SHOWN_BY.get(action, ("", ()))[1]
        now = time.monotonic()
        for resource in ids:
            pending = self.unseen.get(resource)
            if not pending:
                continue
            for transition in pending:
                if transition.kind in kinds and transition.ended is not None:
                    transition.seen = now
            pending[:] = [t for t in pending if t.seen is None]
            if not pending:
                del self.unseen[resource]

    def snapshot_time(self, gib: float) -> float:
        """Seconds a snapshot holding ``gib`` GiB stays pending: a drawn base plus a drawn part per GiB."""
        base = self.draw("snapshot_pending")
        return base + gib * self.draw("snapshot_per_gib") if self.model.snapshot_per_gib and gib else base

    def after(self, action: str, backend: Any, params: dict[str, str], ids: dict[str, list[str]]) -> None:
        """Put what ``action`` just made or changed into its transitional state."""
        m = self.model
        if action == "RunInstances":
            for instance_id in ids.get("instanceId", []):
                instance = backend.get_instance(instance_id)
                if instance.state == "running" and m.instance_pending:
                    set_state(instance, "pending", 0)
                    self._at(
                        self.begin("instance_pending", instance_id, self.draw("instance_pending")),
                        partial(self._running, instance),
                    )
        elif action == "StopInstances":
            for key in (k for k in params if k.startswith("InstanceId.")):
                stop = self.begin("instance_stopping", params[key], self.draw("instance_stopping"))
                self.not_before[params[key]] = stop.started + stop.drawn
        elif action == "TerminateInstances" and m.instance_shutting_down:
            for key in (k for k in params if k.startswith("InstanceId.")):
                instance = backend.get_instance(params[key])
                if instance.state == "terminated" and instance.id not in self.terminating:
                    self.terminating.add(instance.id)
                    set_state(instance, "shutting-down", 32)
                    self._at(
                        self.begin("instance_shutting_down", instance.id, self.draw("instance_shutting_down")),
                        partial(_finish, instance, "shutting-down", "terminated", 48),
                    )
        elif action == "CreateVolume" and m.volume_creating:
            for volume_id in ids.get("volumeId", []):
                volume = backend.get_volume(volume_id)
                volume.sandbox_state = "creating"
                self._at(
                    self.begin("volume_creating", volume_id, self.draw("volume_creating")),
                    partial(_ready, volume),
                )
        elif action == "AttachVolume" and m.volume_attaching:
            volume = backend.get_volume(params["VolumeId"])
            if volume.attachment is not None:
                volume.attachment.status = "attaching"
                self._at(
                    self.begin("volume_attaching", volume.id, self.draw("volume_attaching")),
                    partial(_attached, volume.attachment),
                )
        elif action in ("CreateSnapshot", "CopySnapshot") and m.snapshot_pending:
            for snapshot_id in ids.get("snapshotId", []):
                self._pending_snapshot(backend, snapshot_id)
        elif action == "RegisterImage" and m.image_pending:
            for image_id in ids.get("imageId", []):
                self._pending_image(backend, image_id, 0.0)
        elif action in ("CreateImage", "CopyImage"):
            for image_id in ids.get("imageId", []):
                image = backend.amis.get(image_id)
                if image is None:
                    continue
                # The image is available its own time after its slowest snapshot.
                slowest = 0.0
                for mapping in image.block_device_mappings:
                    snapshot_id = mapping.get("Ebs", {}).get("SnapshotId")
                    if snapshot_id in backend.snapshots and m.snapshot_pending:
                        slowest = max(slowest, self._pending_snapshot(backend, snapshot_id))
                if m.snapshot_pending + m.image_pending:
                    self._pending_image(backend, image_id, slowest)

    def remaining_stop(self, instance_id: str) -> float:
        """Seconds until a stopping instance may show `stopped`."""
        return max(0.0, self.not_before.pop(instance_id, 0.0) - time.monotonic())

    def _pending_snapshot(self, backend: Any, snapshot_id: str) -> float:
        """Make the snapshot pending for its drawn time; return that time."""
        seconds = self.snapshot_time(self.written(snapshot_id) / GIB if self.model.snapshot_per_gib else 0.0)
        snapshot = backend.snapshots[snapshot_id]
        snapshot.status = "pending"
        self._at(
            self.begin("snapshot_pending", snapshot_id, seconds),
            partial(_finish_attr, snapshot, "status", "pending", "completed"),
        )
        return seconds

    def _pending_image(self, backend: Any, image_id: str, after: float) -> None:
        """Make the image pending ``after`` seconds (its snapshots') plus its own drawn time."""
        image = backend.amis[image_id]
        image.state = "pending"
        pending = self.begin("image_pending", image_id, self.draw("image_pending"))
        finish = partial(_finish_attr, image, "state", "pending", "available")
        self.clock.at(after + pending.drawn, partial(self._end, pending, finish))

    def _running(self, instance: Any) -> bool:
        """End a launch's pending; then tell ``on_running`` (its sshd becomes reachable then)."""
        if not _finish(instance, "pending", "running", 16):
            return False
        if self.on_running is not None:
            self.on_running(instance)
        return True

    def _at(self, transition: Transition, finish: Callable[[], bool]) -> None:
        """Finish ``transition`` after its drawn time."""
        self.clock.at(transition.drawn, partial(self._end, transition, finish))

    def _end(self, transition: Transition, finish: Callable[[], bool]) -> None:
        """Show the final state, unless a later call changed the resource meanwhile (then it never ends)."""
        if finish():
            transition.ended = time.monotonic()
        else:
            self._forget(transition)

    def _forget(self, transition: Transition) -> None:
        pending = self.unseen.get(transition.resource, [])
        if transition in pending:
            pending.remove(transition)


def _finish(instance: Any, current: str, name: str, code: int) -> bool:
    if instance.state != current:  # changed by a later call meanwhile
        return False
    set_state(instance, name, code)
    return True


def _finish_attr(obj: Any, attr: str, current: str, final: str) -> bool:
    if getattr(obj, attr) != current:
        return False
    setattr(obj, attr, final)
    return True


def _attached(attachment: Any) -> bool:
    if attachment.status != "attaching":
        return False
    attachment.status = "attached"
    return True


def _ready(volume: Any) -> bool:
    if volume.sandbox_state != "creating":
        return False
    volume.sandbox_state = None
    return True
