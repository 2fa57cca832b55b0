"""Cleanup as an undo stack: every cloud resource is pushed the moment it exists.

On failure, Ctrl-C or SIGTERM the stack unwinds in reverse, keeps going past an undo
that fails, and records what could not be removed. On success the temporary resources
are unwound the same way and the artefacts are kept (``keep``).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Resource:
    """One resource the build made, and what became of it."""

    kind: str  # instance, volume, key-pair, security-group, snapshot, image
    id: str
    undo: Callable[[], object] = field(repr=False)
    fate: str = "created"  # created -> kept | deleted | left
    error: str = ""


@dataclass
class UndoStack:
    """The resources of one build, newest last."""

    resources: list[Resource] = field(default_factory=list)

    def push(self, kind: str, resource_id: str, undo: Callable[[], object]) -> Resource:
        """Record a resource that now exists, with the action that removes it."""
        resource = Resource(kind, resource_id, undo)
        self.resources.append(resource)
        log.debug("created %s %s", kind, resource_id)
        return resource

    def creating(self) -> AbstractContextManager[None]:
        """Wrap "create a resource, push its undo": no interruption can fall between the two."""
        return signals_deferred("finishing the resource being created", deliver=True)

    def keep(self, resource_id: str) -> None:
        """Mark an artefact to keep: unwinding will not remove it."""
        for resource in self.resources:
            if resource.id == resource_id:
                resource.fate = "kept"

    def unwind(self) -> list[Resource]:
        """Undo every resource not kept, newest first; return those that could not be removed."""
        left = []
        with signals_deferred():
            for resource in reversed(self.resources):
                if resource.fate != "created":
                    continue
                try:
                    resource.undo()
                except Exception as exc:  # noqa: BLE001 - keep going: report it, undo the rest
                    if already_gone(exc):
                        resource.fate = "deleted"
                        continue
                    resource.fate, resource.error = "left", str(exc).splitlines()[0]
                    left.append(resource)
                    log.warning("could not remove %s %s: %s", resource.kind, resource.id, resource.error)
                else:
                    resource.fate = "deleted"
                    log.info("removed %s %s", resource.kind, resource.id)
        return left


def already_gone(exc: BaseException) -> bool:
    """Return True for an error that says the resource no longer exists (e.g. InvalidVolume.NotFound)."""
    return str(getattr(exc, "code", "")).endswith("NotFound")


@contextmanager
def signals_deferred(reason: str = "cleaning up first", *, deliver: bool = False) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block runs; deliver them when it is done.

    Used around "create a resource, push its undo" (``deliver``: the signal takes effect
    right after, so an interruption can never fall between the two and leak it) and
    around unwinding (the build is ending anyway). A second signal of the same kind is
    obeyed at once: the user insisted.
    """
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        if signum in received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("%s; %s will take effect when it is done", reason, signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received if deliver else ():
            signal.raise_signal(signum)
