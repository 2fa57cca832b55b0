"""Read a YAML file that may be hostile: bounded, strict, text only (pure, no network).

Role files come from pull requests. Each limit below keeps reading one such file to a
fraction of a second and to a value the rest of the tool can walk safely:

- the file is at most ``MAX_BYTES`` (a role file is a few KiB);
- it is UTF-8 text, and every string in it can be written back as UTF-8 (a ``"\\ud800"``
  escape, a lone surrogate, cannot: it would crash rendering later);
- values nest at most ``MAX_DEPTH`` deep (a role needs 4);
- it holds at most ``MAX_NODES`` values once aliases are expanded, so that an alias bomb
  ("billion laughs": each anchor a list of the one before) stops while it is read,
  not minutes later when something walks the expanded value; an alias to a node that
  contains it (a cycle) is refused;
- mapping keys are strings and never repeat (YAML would keep the last one silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode

from builder.errors import InputFileInvalid

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 10_000


def load(path: Path, shown: str) -> Any:
    """Return the data in the YAML file ``path`` (named ``shown`` in messages).

    Raises InputFileInvalid naming the file (and line and column when known) when it
    cannot be read, is too large, is not UTF-8, is not valid YAML or passes a limit.
    """
    text = _read_text(path, shown)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise InputFileInvalid(shown, _where(exc), _what(exc)) from None


def _read_text(path: Path, shown: str) -> str:
    """Return the file's text; read at most one byte past the limit (a device never ends)."""
    try:
        if not path.is_file():
            raise InputFileInvalid(shown, "", "is not a regular file")
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise InputFileInvalid(shown, "", f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise InputFileInvalid(shown, "", f"is larger than {MAX_BYTES // 1024} KiB: a role file is a few KiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start : exc.start + 1].hex()
        raise InputFileInvalid(
            shown, f"line {line}", f"is not UTF-8 text (byte 0x{bad} at offset {exc.start})"
        ) from None


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"line {mark.line + 1} column {mark.column + 1}" if mark else ""


def _what(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    return problem if getattr(exc, "context", None) == _LIMIT else f"invalid YAML: {problem}"


_LIMIT = "over a limit"  # the context of the errors raised for the limits, not for YAML's syntax


def _refuse(problem: str, mark: Any) -> ComposerError:
    return ComposerError(_LIMIT, None, problem, mark)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts what it composes against the limits, aliases expanded."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0  # depth of the node being composed
        self._deepest = 0  # deepest level reached so far, aliases expanded
        self._nodes = 0  # values composed so far, aliases expanded
        self._open: set[str] = set()  # anchors whose node is being composed
        self._extent: dict[str, tuple[int, int]] = {}  # anchor -> (values, height)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event: Event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped
        if isinstance(event, AliasEvent):
            self._count_alias(event)
            return super().compose_node(parent, index)
        anchor: str | None = getattr(event, "anchor", None)
        self._enter(event.start_mark)
        start, outer_deepest, level = self._nodes, self._deepest, self._depth
        self._deepest = level
        if anchor:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor or "")
        if anchor:
            self._extent[anchor] = (self._nodes - start, self._deepest - level + 1)
        self._deepest = max(outer_deepest, self._deepest)
        if isinstance(node, ScalarNode):
            _check_encodable(node)
        return node

    def _enter(self, mark: Any) -> None:
        self._depth += 1
        self._nodes += 1
        if self._depth > MAX_DEPTH:
            raise _refuse(f"values nest more than {MAX_DEPTH} deep", mark)
        if self._nodes > MAX_NODES:
            raise _refuse(f"holds more than {MAX_NODES} values", mark)

    def _count_alias(self, event: AliasEvent) -> None:
        anchor = event.anchor or ""
        if anchor in self._open:
            raise _refuse(f"alias *{anchor} refers to a value that contains it", event.start_mark)
        values, height = self._extent.get(anchor, (1, 1))  # unknown: YAML's own error follows
        self._nodes += values
        self._deepest = max(self._deepest, self._depth + height)
        if self._nodes > MAX_NODES:
            raise _refuse(f"aliases expand to more than {MAX_NODES} values (an alias bomb?)", event.start_mark)
        if self._depth + height > MAX_DEPTH:
            raise _refuse(f"values nest more than {MAX_DEPTH} deep once alias *{anchor} is expanded", event.start_mark)


def _check_encodable(node: ScalarNode) -> None:
    try:
        node.value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(node.value[exc.start])
        raise _refuse(
            f"holds U+{code:04X}, a lone surrogate, which is not a character (a \\u escape?)", node.start_mark
        ) from None


def _construct_mapping(loader: _BoundedLoader, node: MappingNode) -> dict[Any, Any]:
    """Construct a mapping whose keys are strings that never repeat."""
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} must be a string", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=True)
    return seen


_BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
