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
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

# Seconds, unscaled. Sources: typical Nitro launches reach `running` in ~10-20 s; a stop
# or termination of a small instance ~30 s; a new gp3 volume is available in a few
# seconds; the first snapshot of a fresh small volume takes about a minute; an image is
# available some seconds after its snapshots.
PRESETS: dict[str, dict[str, float]] = {
    "none": {},
    "realistic": {
        "instance_pending": 15,
        "instance_stopping": 30,
        "instance_shutting_down": 30,
        "volume_creating": 3,
        "volume_attaching": 2,
        "snapshot_pending": 45,
        "image_pending": 10,
    },
}


@dataclass(frozen=True)
class Model:
    """How long each transition lasts (seconds, already scaled) and the API rate limit."""

    instance_pending: float = 0
    instance_stopping: float = 0
    instance_shutting_down: float = 0
    volume_creating: float = 0
    volume_attaching: float = 0
    snapshot_pending: float = 0
    image_pending: float = 0
    rate: float = 0  # EC2 calls per second; 0: no throttling
    burst: int = 0  # calls at once before the rate applies (EC2's buckets are deep)

    @classmethod
    def preset(cls, name: str, scale: float = 1.0, rate: float = 0) -> Model:
        """Return preset ``name`` with its times multiplied by ``scale``; a burst of 5 s worth of calls."""
        if name not in PRESETS:
            raise ValueError(f"no latency preset {name!r} (have: {', '.join(PRESETS)})")
        times = {k: round(v * scale, 3) for k, v in PRESETS[name].items()}
        return cls(**times, rate=rate, burst=max(1, round(5 * rate)) if rate else 0)

    @property
    def active(self) -> bool:
        return any(v for k, v in asdict(self).items() if k not in ("rate", "burst")) or self.rate > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Model:
        return replace(cls(), **json.loads(text))


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


class Latency:
    """Applies a Model to the resources EC2 calls create or change (called under the sandbox lock)."""

    def __init__(self, model: Model, lock: threading.RLock) -> None:
        self.model = model
        self.clock = Clock(lock)
        self.bucket = Bucket(model.rate, model.burst)
        self.not_before: dict[str, float] = {}  # instance id -> earliest time `stopped` may show
        self.terminating: set[str] = set()  # a second TerminateInstances does not start it again

    def after(self, action: str, backend: Any, params: dict[str, str], ids: dict[str, list[str]]) -> None:
        """Put what ``action`` just made or changed into its transitional state."""
        m = self.model
        if action == "RunInstances":
            for instance_id in ids.get("instanceId", []):
                instance = backend.get_instance(instance_id)
                if instance.state == "running" and m.instance_pending:
                    set_state(instance, "pending", 0)
                    self.clock.at(m.instance_pending, partial(_finish, instance, "pending", "running", 16))
        elif action == "StopInstances":
            for key in (k for k in params if k.startswith("InstanceId.")):
                self.not_before[params[key]] = time.monotonic() + m.instance_stopping
        elif action == "TerminateInstances" and m.instance_shutting_down:
            for key in (k for k in params if k.startswith("InstanceId.")):
                instance = backend.get_instance(params[key])
                if instance.state == "terminated" and instance.id not in self.terminating:
                    self.terminating.add(instance.id)
                    set_state(instance, "shutting-down", 32)
                    self.clock.at(
                        m.instance_shutting_down, partial(_finish, instance, "shutting-down", "terminated", 48)
                    )
        elif action == "CreateVolume" and m.volume_creating:
            for volume_id in ids.get("volumeId", []):
                volume = backend.get_volume(volume_id)
                volume.sandbox_state = "creating"
                self.clock.at(m.volume_creating, partial(setattr, volume, "sandbox_state", None))
        elif action == "AttachVolume" and m.volume_attaching:
            volume = backend.get_volume(params["VolumeId"])
            if volume.attachment is not None:
                volume.attachment.status = "attaching"
                self.clock.at(m.volume_attaching, partial(_attached, volume.attachment))
        elif action in ("CreateSnapshot", "CopySnapshot") and m.snapshot_pending:
            for snapshot_id in ids.get("snapshotId", []):
                self._pending_snapshot(backend, snapshot_id, m.snapshot_pending)
        elif action == "RegisterImage" and m.image_pending:
            for image_id in ids.get("imageId", []):
                self._pending_image(backend, image_id, m.image_pending)
        elif action in ("CreateImage", "CopyImage"):
            for image_id in ids.get("imageId", []):
                image = backend.amis.get(image_id)
                if image is None:
                    continue
                for mapping in image.block_device_mappings:
                    snapshot_id = mapping.get("Ebs", {}).get("SnapshotId")
                    if snapshot_id in backend.snapshots and m.snapshot_pending:
                        self._pending_snapshot(backend, snapshot_id, m.snapshot_pending)
                if m.snapshot_pending + m.image_pending:
                    self._pending_image(backend, image_id, m.snapshot_pending + m.image_pending)

    def remaining_stop(self, instance_id: str) -> float:
        """Seconds until a stopping instance may show `stopped`."""
        return max(0.0, self.not_before.pop(instance_id, 0.0) - time.monotonic())

    def _pending_snapshot(self, backend: Any, snapshot_id: str, seconds: float) -> None:
        snapshot = backend.snapshots[snapshot_id]
        snapshot.status = "pending"
        self.clock.at(seconds, partial(_finish_attr, snapshot, "status", "pending", "completed"))

    def _pending_image(self, backend: Any, image_id: str, seconds: float) -> None:
        image = backend.amis[image_id]
        image.state = "pending"
        self.clock.at(seconds, partial(_finish_attr, image, "state", "pending", "available"))


def _finish(instance: Any, current: str, name: str, code: int) -> None:
    if instance.state == current:  # not changed by a later call meanwhile
        set_state(instance, name, code)


def _finish_attr(obj: Any, attr: str, current: str, final: str) -> None:
    if getattr(obj, attr) == current:
        setattr(obj, attr, final)


def _attached(attachment: Any) -> None:
    if attachment.status == "attaching":
        attachment.status = "attached"
