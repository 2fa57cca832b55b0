"""Role files: load, merge with defaults, validate, and turn into frozen values.

A role file is ``roles/<name>.yaml``; ``roles/defaults.yaml`` (optional, not a role)
holds values shared by every role. Validation runs before anything touches the
network and reports every problem at once, each as ``<file>: <key path>: <what>``.
Structure (keys, types, enums, patterns) comes from ``builder/schema/role.schema.json``,
the same file editors use; the rules that need the whole merged role (path
nesting, volume limits per type, protected system paths) live here.
"""

from __future__ import annotations

import copy
import difflib
import json
import posixpath
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

import jsonschema

from builder import yamlload
from builder.errors import InputFileInvalid, Problem, RoleInvalid, RoleNotFound
from builder.tags import PATHS_CHUNK as PATHS_TAG_CHUNK

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent  # the checkout, when running from one
SCHEMA_PATH = PACKAGE_DIR / "schema" / "role.schema.json"
DEFAULTS_STEM = "defaults"
DEBIAN_OWNER = "136693071363"


def default_roles_dir() -> Path:
    """Return where roles are read from without --roles-dir.

    In a checkout (build.py beside the package) that is the checkout's ``roles/``, wherever
    the command runs from; an installed ``ebsrole`` reads ``./roles``, as a user expects.
    """
    return PROJECT_DIR / "roles" if (PROJECT_DIR / "build.py").is_file() else Path("roles")


ROLES_DIR = default_roles_dir()

ROLE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

RELEASES = {"bookworm": 12, "trixie": 13}
REQUIRED = ("description", "volume.device", "volume.mount_point", "volume.size_gib", "externalize")

# Built in beneath roles/defaults.yaml. instance_type depends on arch: see _instance_types.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "base": {"release": "bookworm", "arch": "amd64", "owner": DEBIAN_OWNER},
    "packages": [],
    "services": [],
    "volume": {"type": "gp3", "filesystem": "ext4", "encrypted": True},
    "tags": {},
}

# Why a path may not move onto the data volume. The volume is mounted nofail, late in
# boot (after local-fs.target's early part): whatever the machine reads before that, or
# needs to let ops in when the volume is missing, or apt and dpkg need, stays on the root.
_RUNTIME = "by the kernel or systemd, which make or mount it at every boot"
_BOOT = "to boot: it is read before the data volume is mounted"
_NETWORK = "for networking, which is configured before the data volume is mounted"
_FIREWALL = "for the firewall, which is loaded before networking, before the data volume is mounted"
_LOGIN = "to log in (SSH, sudo, accounts), which must work when the data volume is missing"
_PACKAGES = "to manage packages: apt and dpkg must work when the data volume is missing or replaced"

# Each tree, and anything inside it or containing it, is refused, with its reason.
PROTECTED_TREES: dict[str, str] = {
    "/bin": _BOOT,
    "/boot": _BOOT,
    "/dev": _RUNTIME,
    "/home": _LOGIN,
    "/lib": _BOOT,
    "/lib32": _BOOT,
    "/lib64": _BOOT,
    "/libx32": _BOOT,
    "/lost+found": _RUNTIME,
    "/proc": _RUNTIME,
    "/root": _LOGIN,
    "/run": _RUNTIME,
    "/sbin": _BOOT,
    "/sys": _RUNTIME,
    "/tmp": _RUNTIME,  # noqa: S108 - a forbidden path, not a temporary file
    "/usr": _BOOT,
    "/etc/alternatives": _PACKAGES,
    "/etc/apt": _PACKAGES,
    "/etc/binfmt.d": _BOOT,
    "/etc/cloud": _NETWORK,
    "/etc/crypttab": _BOOT,
    "/etc/default": _BOOT,
    "/etc/dhcp": _NETWORK,
    "/etc/dhcpcd.conf": _NETWORK,
    "/etc/dpkg": _PACKAGES,
    "/etc/environment": _LOGIN,
    "/etc/fstab": _BOOT,
    "/etc/group": _LOGIN,
    "/etc/grub.d": _BOOT,
    "/etc/gshadow": _LOGIN,
    "/etc/hostname": _NETWORK,
    "/etc/hosts": _NETWORK,
    "/etc/init.d": _BOOT,
    "/etc/initramfs-tools": _BOOT,
    "/etc/iproute2": _NETWORK,
    "/etc/iptables": _FIREWALL,
    "/etc/kernel": _BOOT,
    "/etc/ld.so.cache": _BOOT,
    "/etc/ld.so.conf": _BOOT,
    "/etc/ld.so.conf.d": _BOOT,
    "/etc/localtime": _BOOT,
    "/etc/login.defs": _LOGIN,
    "/etc/machine-id": _BOOT,
    "/etc/modprobe.d": _BOOT,
    "/etc/modules": _BOOT,
    "/etc/modules-load.d": _BOOT,
    "/etc/netplan": _NETWORK,
    "/etc/network": _NETWORK,
    "/etc/NetworkManager": _NETWORK,
    "/etc/nftables.conf": _FIREWALL,
    "/etc/nsswitch.conf": _LOGIN,
    "/etc/pam.d": _LOGIN,
    "/etc/passwd": _LOGIN,
    "/etc/resolv.conf": _NETWORK,
    "/etc/security": _LOGIN,
    "/etc/shadow": _LOGIN,
    "/etc/shells": _LOGIN,
    "/etc/ssh": _LOGIN,
    "/etc/sudoers": _LOGIN,
    "/etc/sudoers.d": _LOGIN,
    "/etc/sysctl.conf": _BOOT,
    "/etc/sysctl.d": _BOOT,
    "/etc/systemd": _BOOT,
    "/etc/tmpfiles.d": _BOOT,
    "/etc/udev": _BOOT,
    "/var/cache/apt": _PACKAGES,
    "/var/cache/debconf": _PACKAGES,
    "/var/lib/apt": _PACKAGES,
    "/var/lib/cloud": _NETWORK,
    "/var/lib/dbus": _BOOT,
    "/var/lib/dhcp": _NETWORK,
    "/var/lib/dpkg": _PACKAGES,
    "/var/lib/systemd": _BOOT,
    "/var/lib/ucf": _PACKAGES,
    "/var/lock": _RUNTIME,
    "/var/run": _RUNTIME,
    "/var/tmp": _RUNTIME,  # noqa: S108 - forbidden, not used
}

# EC2's tag limits: 50 tags per resource, keys up to 128 and values up to 256 characters.
TAGS_PER_RESOURCE = 50
TAG_VALUE_MAX = 256
# The most tags the tool puts on one resource of a role: a copied AMI carries Name, the six
# every resource of a build carries (build-id, role, kind, created-by, created-at,
# temporary), status, base-ami, fingerprint, mount-point, device, seed-snapshot,
# root-snapshot and copied-from (15), plus one paths tag per PATHS_TAG_CHUNK characters
# of the externalized paths (paths, paths-2, ...).
TOOL_TAGS = 15
# Linux's limits, in bytes: a whole path (PATH_MAX counts the closing NUL) and one
# component; systemd's for a unit name (the mount unit it generates from /etc/fstab).
PATH_MAX = 4096
NAME_MAX = 255
UNIT_NAME_MAX = 255

# EBS limits per volume type (EC2 CreateVolume): size GiB, IOPS, IOPS per GiB.
VOLUME_LIMITS: dict[str, dict[str, Any]] = {
    "gp3": {"size": (1, 65536), "iops": (3000, 80000), "iops_per_gib": 500},
    "gp2": {"size": (1, 16384), "iops": None, "iops_per_gib": None},
    "io1": {"size": (4, 16384), "iops": (100, 64000), "iops_per_gib": 50},
    "io2": {"size": (4, 65536), "iops": (100, 256000), "iops_per_gib": 1000},
}
GP3_THROUGHPUT_PER_IOPS = 0.25  # MiB/s per provisioned IOPS
UNIT_SUFFIXES = (".service", ".socket", ".timer", ".path", ".mount", ".target")


@dataclass(frozen=True)
class Base:
    """Where the base AMI comes from."""

    release: str  # codename, e.g. bookworm
    version: int  # e.g. 12
    arch: str  # amd64 | arm64
    owner: str
    name_pattern: str
    ami: str | None

    @property
    def ec2_architecture(self) -> str:
        """Return EC2's name for the architecture (x86_64 or arm64)."""
        return "x86_64" if self.arch == "amd64" else "arm64"


@dataclass(frozen=True)
class Volume:
    """The EBS data volume of a role."""

    device: str
    mount_point: str
    size_gib: int
    type: str
    iops: int | None
    throughput: int | None
    filesystem: str
    encrypted: bool
    kms_key_id: str | None


@dataclass(frozen=True)
class ExternalPath:
    """A directory moved onto the data volume and replaced by a symlink."""

    path: str
    owner: str | None = None
    group: str | None = None
    mode: str | None = None

    @property
    def created(self) -> bool:
        """Return True when the tool creates the directory (no package does)."""
        return self.owner is not None

    def target(self, mount_point: str) -> str:
        """Return where the directory lives on the volume."""
        return mount_point.rstrip("/") + self.path


@dataclass(frozen=True)
class Role:
    """A validated role with defaults applied."""

    name: str
    file: str
    description: str
    base: Base
    instance_type: str  # the first of instance_types: the one preferred
    # The builder's types in order of preference: when one has no capacity in an AZ (or is
    # not offered there), the next is tried. One item when the role gives instance_type.
    instance_types: tuple[str, ...]
    packages: tuple[str, ...]
    services: tuple[str, ...]
    volume: Volume
    externalize: tuple[ExternalPath, ...]
    tags: tuple[tuple[str, str], ...]
    root_kms_key_id: str | None = None  # root.kms_key_id: the root volume's, so the AMI's root snapshot's key
    copy_kms_key_ids: tuple[tuple[str, str], ...] = ()  # (region, key) for copies
    deprecate_after_days: int | None = None
    deregistration_protection: bool = False  # on the newest AMI; the previous newest loses it

    def copy_key(self, region: str) -> str | None:
        """Return the KMS key of copies to ``region`` (copy_kms_key_ids), or None: that region's default key."""
        return dict(self.copy_kms_key_ids).get(region)

    def targets(self) -> list[tuple[str, str]]:
        """Return (path, place on the volume) for each externalized directory."""
        return [(p.path, p.target(self.volume.mount_point)) for p in self.externalize]


# ---------------------------------------------------------------- file discovery


def role_names(roles_dir: Path = ROLES_DIR) -> list[str]:
    """Return the names of the role files in ``roles_dir``, sorted."""
    return sorted(p.stem for p in roles_dir.glob("*.yaml") if p.is_file() and p.stem != DEFAULTS_STEM)


def display_path(path: Path) -> str:
    """Return ``path`` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_roles(
    names: Sequence[str] | None = None, roles_dir: Path = ROLES_DIR, reserved: Collection[str] = ()
) -> list[Role]:
    """Load and validate the named roles (all roles when ``names`` is empty or None).

    ``reserved`` are names a role may not have (the command line's commands, which
    it passes in: a role named like one could never be built).

    Raises RoleNotFound for a name without a file, RoleInvalid with every problem
    of every file otherwise.
    """
    known = role_names(roles_dir)
    wanted = list(dict.fromkeys(names)) if names else known
    for name in wanted:
        if name not in known:
            raise RoleNotFound(name, display_path(roles_dir), known)
    problems: list[Problem] = []
    defaults = _load_defaults(roles_dir, problems)
    roles = []
    for name in wanted:
        role = _load_one(roles_dir / f"{name}.yaml", defaults, problems, reserved)
        if role is not None:
            roles.append(role)
    if problems:
        raise RoleInvalid(problems)
    return roles


def load_role(name: str, roles_dir: Path = ROLES_DIR) -> Role:
    """Load and validate one role; raises like :func:`load_roles`."""
    return load_roles([name], roles_dir)[0]


# ---------------------------------------------------------------- YAML


def _read_yaml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    """Return the file's top-level mapping, or None after recording why not."""
    shown = display_path(path)
    try:
        data = yamlload.load(path, shown)
    except InputFileInvalid as exc:
        problems.append(exc.problem)
        return None
    if not isinstance(data, dict):
        problems.append(Problem(shown, "", "must be a mapping of keys (description, volume, ...)"))
        return None
    return data


# ---------------------------------------------------------------- schema checks


@cache
def _schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    return schema


@cache
def _validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(_schema())


def _schema_errors(data: Mapping[str, Any]) -> list[jsonschema.ValidationError]:
    """Return the schema violations in ``data``, in document order."""
    return sorted(_validator().iter_errors(data), key=lambda e: [str(p) for p in e.path])


def key_path(parts: Iterable[Any]) -> str:
    """Render a path of keys and indexes as ``volume.size_gib`` or ``externalize[2]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    return json.dumps(value) if isinstance(value, bool | int | float | None) else type(value).__name__


_TYPE_WORDS = {
    "string": "a string",
    "integer": "a whole number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "number": "a number",
}


def _schema_of(error: jsonschema.ValidationError) -> Mapping[str, Any]:
    """Return the schema node that refused the value (always a mapping in our schema)."""
    return cast(Mapping[str, Any], error.schema)


def _instance_of(error: jsonschema.ValidationError) -> Any:
    """Return the refused value."""
    return error.instance


def _explain(error: jsonschema.ValidationError, shown: str) -> Iterator[Problem]:
    """Turn one jsonschema error into the user's words."""
    if error.validator == "additionalProperties":
        allowed = sorted(_schema_of(error).get("properties", {}))
        for key in sorted(set(_instance_of(error)) - set(allowed)):
            guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {guess[0]!r}?)" if guess else f"; known keys: {', '.join(allowed)}"
            yield Problem(shown, key_path([*error.path, key]), f"unknown key{hint}")
        return
    yield Problem(shown, key_path(error.path), _message(error))


def _message(error: jsonschema.ValidationError) -> str:
    kind, schema, value = str(error.validator), _schema_of(error), _instance_of(error)
    got = f" (got {_show(value)})"
    if kind == "type":
        wanted = _TYPE_WORDS.get(str(error.validator_value), str(error.validator_value))
        return str(schema.get("x-type-error") or f"must be {wanted}") + got
    if kind == "enum":
        return "must be one of " + ", ".join(dict.fromkeys(map(str, schema["enum"]))) + got
    if kind == "pattern":
        return str(schema.get("x-error", "has the wrong form")) + got
    if kind in ("minimum", "maximum"):
        return f"must be {'at least' if kind == 'minimum' else 'at most'} {schema[kind]}{got}"
    if kind == "minLength":
        return "must not be empty" if schema[kind] <= 1 else f"must be at least {schema[kind]} characters"
    if kind == "maxLength":
        return f"must be at most {schema[kind]} characters long"
    if kind in ("minItems", "maxItems"):
        return f"must list {'at least' if kind == 'minItems' else 'at most'} {schema[kind]}" + got
    if kind == "maxProperties":
        return f"must have at most {schema[kind]} entries"
    if kind == "required":
        return "missing " + ", ".join(repr(k) for k in schema["required"] if k not in value)
    if kind == "propertyNames":
        return f"key {_show(value)}: {schema['propertyNames'].get('x-error', 'not allowed')}"
    return str(error.message)


# ---------------------------------------------------------------- merge and rules


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge mappings recursively; lists and scalars in ``over`` replace ``base``'s."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_defaults(roles_dir: Path, problems: list[Problem]) -> dict[str, Any]:
    path = roles_dir / f"{DEFAULTS_STEM}.yaml"
    if not path.exists():
        return {}
    data = _read_yaml(path, problems)
    if data is None:
        return {}
    shown = display_path(path)
    errors = _schema_errors(data)
    problems.extend(p for error in errors for p in _explain(error, shown))
    both = [Problem(shown, key, message) for key, message in _type_key_problems(data)]
    problems.extend(both)
    return {} if errors or both else data


def _load_one(
    path: Path, defaults: Mapping[str, Any], problems: list[Problem], reserved: Collection[str]
) -> Role | None:
    shown = display_path(path)
    before = len(problems)
    if not ROLE_NAME.match(path.stem) or path.stem in {*reserved, DEFAULTS_STEM}:
        problems.append(
            Problem(
                shown,
                "",
                "role names (the file name) must be lower-case letters, digits and '-', "
                "start with a letter, and not be a command of build.py",
            )
        )
    data = _read_yaml(path, problems)
    if data is None:
        return None
    errors = _schema_errors(data)
    problems.extend(p for error in errors for p in _explain(error, shown))
    # Check the rules on what is left once the values the schema refused are taken
    # out, so that one run reports every problem, not only the first kind.
    bad = [path for error in errors for path in _refused_paths(error)]
    pruned = _prune(data, bad)
    problems.extend(Problem(shown, key, message) for key, message in _type_key_problems(pruned))
    if "instance_type" in pruned or "instance_types" in pruned:  # the role's choice replaces the defaults'
        defaults = {k: v for k, v in defaults.items() if k not in ("instance_type", "instance_types")}
    merged = _merge(_merge(BUILTIN_DEFAULTS, defaults), pruned)
    refused = [key_path(path) for path in bad]
    problems.extend(Problem(shown, key, msg) for key, msg in _rule_problems(merged) if not _below_any(key, refused))
    if len(problems) > before:
        return None
    return _build_role(path.stem, shown, merged)


def _refused_paths(error: jsonschema.ValidationError) -> list[list[Any]]:
    """Return the key paths whose values the schema refused (an unknown key, not its parent)."""
    if error.validator == "additionalProperties":
        known = _schema_of(error).get("properties", {})
        return [[*error.path, key] for key in _instance_of(error) if key not in known]
    return [list(error.path)]


def _below_any(key: str, refused: Sequence[str]) -> bool:
    """Return True when ``key`` is one of ``refused`` or inside one of them."""
    return any(key == r or key.startswith((f"{r}.", f"{r}[")) for r in refused)


def _prune(data: Any, paths: list[list[Any]]) -> Any:
    """Return a deep copy of ``data`` without the values at ``paths`` (list items become None)."""
    pruned = copy.deepcopy(data)
    for path in sorted(paths, key=len, reverse=True):
        node = pruned
        for part in path[:-1]:
            node = node[part]
        if not path:
            continue
        if isinstance(node, list):
            node[path[-1]] = None
        elif isinstance(node, dict):
            node.pop(path[-1], None)
    return pruned


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _rule_problems(role: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (key path, message) for every rule the merged role breaks."""
    for key in REQUIRED:
        if _get(role, key) is None:
            yield key, "missing (set it in the role file or in roles/defaults.yaml)"
    if _get(role, "externalize") == []:
        yield "externalize", "must list at least one directory"
    yield from _base_problems(role)
    yield from _volume_problems(role.get("volume", {}))
    yield from _unique("packages", role.get("packages", []), _package_name)
    yield from _unique("services", role.get("services", []), unit_name)
    yield from _path_problems(role)
    yield from _tag_problems(role)


def tool_tag_count(paths: Sequence[str]) -> int:
    """Return how many tags the tool itself puts on a role's AMI (the most on any resource)."""
    return TOOL_TAGS + max(1, -(-len(" ".join(paths)) // PATHS_TAG_CHUNK))


def _tag_problems(role: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    tags = role.get("tags")
    if not isinstance(tags, Mapping):
        return
    paths = [p for p in map(_path_of, role.get("externalize") or []) if p is not None]
    own = tool_tag_count(paths)
    allowed = TAGS_PER_RESOURCE - own
    if len(tags) > allowed:
        yield (
            "tags",
            f"{len(tags)} tags (with roles/defaults.yaml's), but a role may have at most {allowed}: "
            f"EC2 allows {TAGS_PER_RESOURCE} per resource and the tool adds {own} of its own to the AMI "
            f"(one more per {PATHS_TAG_CHUNK} characters of externalized paths)",
        )


def _base_problems(role: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    base = role["base"]
    if "ami" in base and "name" in base:
        yield "base", "give either ami (a pinned image) or name (a lookup pattern), not both"
    arch = base.get("arch", "amd64")
    want = "an arm64 (Graviton, e.g. t4g)" if arch == "arm64" else "an amd64 (e.g. t3)"
    for key, itype in _given_types(role):
        if _is_graviton(itype) != (arch == "arm64"):
            yield key, f"{itype} does not run {arch}: base.arch {arch} needs {want} type"
    yield from _unique("instance_types", role.get("instance_types") or [], str)


def _given_types(role: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield (key path, instance type) for each type the role names (instance_type or instance_types)."""
    single = role.get("instance_type")
    if isinstance(single, str):
        yield "instance_type", single
    for index, itype in enumerate(role.get("instance_types") or []):
        if isinstance(itype, str):
            yield f"instance_types[{index}]", itype


def _type_key_problems(data: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield a problem when one file gives both instance_type and instance_types."""
    if "instance_type" in data and "instance_types" in data:
        yield (
            "instance_types",
            "give either instance_type (one type) or instance_types (types to try in order), not both",
        )


def _is_graviton(instance_type: str) -> bool:
    family = instance_type.split(".", 1)[0]
    return family == "a1" or re.match(r"^[a-z]+[0-9]+[a-z]*g[a-z]*$", family) is not None


def _volume_problems(vol: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    vtype, size, iops, thr = vol.get("type"), vol.get("size_gib"), vol.get("iops"), vol.get("throughput")
    limits = VOLUME_LIMITS.get(str(vtype))
    if limits is None:
        return
    low, high = limits["size"]
    if size is not None and not low <= size <= high:
        yield "volume.size_gib", f"{vtype} volumes must be {low} to {high} GiB (got {size})"
    if limits["iops"] is None and iops is not None:
        yield "volume.iops", f"{vtype} volumes take no iops (only gp3, io1 and io2 do)"
    if vtype in ("io1", "io2") and iops is None:
        yield "volume.iops", f"required for {vtype} volumes"
    if limits["iops"] and iops is not None:
        low, high = limits["iops"]
        if not low <= iops <= high:
            yield "volume.iops", f"{vtype} volumes take {low} to {high} IOPS (got {iops})"
        elif size is not None and iops > size * limits["iops_per_gib"]:
            yield (
                "volume.iops",
                (
                    f"{vtype} allows at most {limits['iops_per_gib']} IOPS per GiB: "
                    f"{iops} IOPS needs at least {-(-iops // limits['iops_per_gib'])} GiB"
                ),
            )
    if thr is not None and vtype != "gp3":
        yield "volume.throughput", f"only gp3 volumes take a throughput (type is {vtype})"
    elif thr is not None and thr > (iops or 3000) * GP3_THROUGHPUT_PER_IOPS:
        yield (
            "volume.throughput",
            (
                f"gp3 allows at most {GP3_THROUGHPUT_PER_IOPS} MiB/s per IOPS: {thr} MiB/s "
                f"needs iops of at least {int(thr / GP3_THROUGHPUT_PER_IOPS)}"
            ),
        )
    if vol.get("kms_key_id") and vol.get("encrypted") is False:
        yield "volume.kms_key_id", "set, but volume.encrypted is false"
    mount_point = vol.get("mount_point")
    if isinstance(mount_point, str):
        for message in _system_path_problems(mount_point, "mount the volume on"):
            yield "volume.mount_point", message
        for message in _mount_point_lengths(mount_point):
            yield "volume.mount_point", message


def _mount_point_lengths(mount_point: str) -> Iterator[str]:
    """Yield what makes ``mount_point`` too long for its tag or for systemd's mount unit."""
    if len(mount_point) > TAG_VALUE_MAX:
        yield (
            f"is {len(mount_point)} characters long: at most {TAG_VALUE_MAX} "
            "(the AMI's ebsrole:mount-point tag holds it)"
        )
    unit = _mount_unit(mount_point)
    if len(unit) > UNIT_NAME_MAX:
        yield (
            f"makes a systemd mount unit name of {len(unit)} characters, over systemd's {UNIT_NAME_MAX}: "
            "the volume would not be mounted at boot (each '-' counts 4)"
        )


def _mount_unit(mount_point: str) -> str:
    """Return the name systemd gives the mount unit of ``mount_point`` (as systemd-escape --path)."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in ":_.") else _hex_escape(c) for c in mount_point.strip("/"))
    name = name.replace("\\x2f", "-")
    if name.startswith("."):
        name = "\\x2e" + name[1:]
    return (name or "-") + ".mount"


def _hex_escape(char: str) -> str:
    return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8"))


def _package_name(spec: str) -> str:
    return re.split(r"[=/]", spec, maxsplit=1)[0]


def unit_name(name: str) -> str:
    """Return the full systemd unit name (``apache2`` -> ``apache2.service``)."""
    return name if name.endswith(UNIT_SUFFIXES) else f"{name}.service"


def _unique(key: str, values: Sequence[str], norm: Any) -> Iterator[tuple[str, str]]:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if not isinstance(value, str):
            continue
        first = seen.setdefault(norm(value), index)
        if first != index:
            yield f"{key}[{index}]", f"{value!r} repeats {key}[{first}]"


def _path_of(item: Any) -> str | None:
    path = item.get("path") if isinstance(item, Mapping) else item
    return path if isinstance(path, str) else None


def _path_problems(role: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Rules for externalized paths: form, protected paths, duplicates, nesting."""
    items = role.get("externalize") or []
    mount_point = _get(role, "volume.mount_point")
    clean: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        key = f"externalize[{index}]" + (".path" if isinstance(item, Mapping) else "")
        path = _path_of(item)
        if path is None:
            continue
        found = list(_system_path_problems(path, "externalize"))
        yield from ((key, message) for message in found)
        if not found:
            clean.append((index, path))
    for (i, a), (j, b) in ((x, y) for x in clean for y in clean if x[0] < y[0]):
        if a == b:
            yield f"externalize[{j}]", f"{b} repeats externalize[{i}]"
        elif _inside(b, a) or _inside(a, b):
            inner, outer = (b, a) if _inside(b, a) else (a, b)
            yield f"externalize[{j}]", f"{inner} is inside {outer} (externalize[{i}]): list only {outer}"
    if isinstance(mount_point, str):
        for index, path in clean:
            target = mount_point.rstrip("/") + path
            if len(target.encode("utf-8")) >= PATH_MAX:
                yield (
                    f"externalize[{index}]",
                    f"on the volume it becomes {mount_point}{path}, {len(target.encode('utf-8'))} bytes: "
                    f"Linux paths hold at most {PATH_MAX - 1} (PATH_MAX)",
                )
            if path == mount_point or _inside(mount_point, path):
                yield f"externalize[{index}]", f"{path} contains the mount point {mount_point}"
            elif _inside(path, mount_point):
                yield (
                    f"externalize[{index}]",
                    (f"{path} is inside the mount point {mount_point}: it is on the volume already"),
                )


def _length_problem(path: str) -> str | None:
    """Return why ``path`` is too long for Linux (PATH_MAX, NAME_MAX, in bytes), or None."""
    size = len(path.encode("utf-8"))
    if size >= PATH_MAX:
        return f"is {size} bytes long: Linux paths hold at most {PATH_MAX - 1} (PATH_MAX)"
    longest = max(path.split("/"), key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > NAME_MAX:
        return f"has a component of {len(longest.encode('utf-8'))} bytes: Linux allows {NAME_MAX} (NAME_MAX)"
    return None


def _inside(path: str, parent: str) -> bool:
    """Return True when ``path`` is strictly below ``parent``."""
    return parent == "/" or path.startswith(parent.rstrip("/") + "/")


def _system_path_problems(path: str, what: str) -> Iterator[str]:
    """Yield what is wrong with ``path`` as a place for data."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        yield f"{path!r} contains a control character or newline"
        return
    if not path.startswith("/"):
        yield f"{path!r} must be an absolute path"
        return
    if ".." in path.split("/") or "." in path.split("/"):
        yield f"{path!r} must not contain '.' or '..' components"
        return
    if posixpath.normpath(path) != path or path.startswith("//"):
        yield f"{path!r} is not normalised (write {posixpath.normpath(path)!r})"
        return
    too_long = _length_problem(path)
    if too_long:
        yield too_long
        return
    for tree, reason in PROTECTED_TREES.items():
        if path == tree or _inside(path, tree):
            yield f"cannot {what} {path}: {tree} is needed {reason}"
            return
        if _inside(tree, path):
            yield f"cannot {what} {path}: it contains {tree}, which is needed {reason}"
            return


# ---------------------------------------------------------------- values


def _instance_types(role: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the builder's types in order: instance_types, else instance_type, else the arch's default."""
    given = role.get("instance_types") or [role.get("instance_type")]
    if all(isinstance(t, str) for t in given):
        return tuple(given)
    return ("t4g.small",) if role["base"]["arch"] == "arm64" else ("t3.small",)


def _build_role(name: str, shown: str, role: Mapping[str, Any]) -> Role:
    base, vol = role["base"], role["volume"]
    release = str(base["release"])
    codename = next((c for c, n in RELEASES.items() if release in (c, str(n))), release)
    version = RELEASES[codename]
    return Role(
        name=name,
        file=shown,
        description=role["description"],
        base=Base(
            release=codename,
            version=version,
            arch=base["arch"],
            owner=base["owner"],
            name_pattern=base.get("name") or f"debian-{version}-{base['arch']}-2*",
            ami=base.get("ami"),
        ),
        instance_type=_instance_types(role)[0],
        instance_types=_instance_types(role),
        packages=tuple(role["packages"]),
        services=tuple(unit_name(s) for s in role["services"]),
        volume=Volume(
            device=vol["device"],
            mount_point=vol["mount_point"],
            size_gib=vol["size_gib"],
            type=vol["type"],
            iops=vol.get("iops"),
            throughput=vol.get("throughput"),
            filesystem=vol["filesystem"],
            encrypted=vol["encrypted"],
            kms_key_id=vol.get("kms_key_id"),
        ),
        externalize=tuple(
            ExternalPath(**item) if isinstance(item, Mapping) else ExternalPath(item) for item in role["externalize"]
        ),
        tags=tuple(sorted(role["tags"].items())),
        root_kms_key_id=(role.get("root") or {}).get("kms_key_id"),
        copy_kms_key_ids=tuple(sorted((role.get("copy_kms_key_ids") or {}).items())),
        deprecate_after_days=role.get("deprecate_after_days"),
        deregistration_protection=bool(role.get("deregistration_protection", False)),
    )
