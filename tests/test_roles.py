"""Role validation: one good and one bad case per rule; messages name file and key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from builder.errors import RoleInvalid, RoleNotFound
from builder.roles import PROTECTED_TREES, load_role, load_roles, role_names
from tests.conftest import GOOD_ROLE

DELETE = object()


def changed(**changes: Any) -> dict[str, Any]:
    """Return GOOD_ROLE with dotted keys set (or removed with DELETE)."""
    role = copy.deepcopy(GOOD_ROLE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = role
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return role


def problems_of(roles_dir: Path, name: str = "r") -> list[str]:
    """Return the problems of role ``name``, loaded as the command line loads it (its commands reserved)."""
    from builder.cli.registry import RESERVED

    with pytest.raises(RoleInvalid) as caught:
        load_roles([name], roles_dir, reserved=RESERVED)
    return [str(p) for p in caught.value.problems]


# (id, changes that break one rule, expected key path, expected words in the message)
BAD = [
    ("unknown key", {"pakages": ["x"]}, "pakages", "did you mean 'packages'"),
    ("unknown nested key", {"volume__sise_gib": 3}, "volume.sise_gib", "did you mean 'size_gib'"),
    ("missing description", {"description": DELETE}, "description", "missing"),
    ("empty description", {"description": ""}, "description", "must not be empty"),
    ("missing size", {"volume__size_gib": DELETE}, "volume.size_gib", "missing"),
    ("no paths", {"externalize": []}, "externalize", "at least one"),
    ("relative path", {"externalize": ["var/www"]}, "externalize[0]", "absolute path"),
    ("dot-dot path", {"externalize": ["/var/www/../lib/x"]}, "externalize[0]", "'..'"),
    ("dot path", {"externalize": ["/var/./www"]}, "externalize[0]", "'.'"),
    ("trailing slash", {"externalize": ["/var/www/"]}, "externalize[0]", "not normalised"),
    ("double slash", {"externalize": ["/var//www"]}, "externalize[0]", "not normalised"),
    ("newline in path", {"externalize": ["/var/www\n/etc"]}, "externalize[0]", "control character"),
    ("tab in path", {"externalize": ["/srv/a\tb"]}, "externalize[0]", "control character"),
    ("duplicate path", {"externalize": ["/var/www", "/var/www"]}, "externalize[1]", "repeats externalize[0]"),
    ("nested path", {"externalize": ["/var/www", "/var/www/html"]}, "externalize[1]", "inside /var/www"),
    (
        "nested path reversed",
        {"externalize": ["/var/www/html", "/var/www"]},
        "externalize[1]",
        "/var/www/html is inside /var/www",
    ),
    (
        "mount point inside path",
        {"volume__mount_point": "/srv/data", "externalize": ["/srv"]},
        "externalize[0]",
        "contains the mount point",
    ),
    ("path inside mount point", {"externalize": ["/data/www"]}, "externalize[0]", "inside the mount point"),
    ("path is mount point", {"externalize": ["/data"]}, "externalize[0]", "contains the mount point"),
    ("root", {"externalize": ["/"]}, "externalize[0]", "needed to boot"),
    ("etc itself", {"externalize": ["/etc"]}, "externalize[0]", "contains /etc/"),
    ("usr below", {"externalize": ["/usr/share/doc"]}, "externalize[0]", "/usr is needed"),
    ("etc ssh", {"externalize": ["/etc/ssh"]}, "externalize[0]", "/etc/ssh is needed"),
    ("fstab", {"externalize": ["/etc/fstab"]}, "externalize[0]", "/etc/fstab is needed"),
    ("dpkg", {"externalize": ["/var/lib/dpkg"]}, "externalize[0]", "/var/lib/dpkg is needed"),
    ("var lib", {"externalize": ["/var/lib"]}, "externalize[0]", "contains /var/"),
    ("home", {"externalize": ["/home/admin"]}, "externalize[0]", "/home is needed"),
    ("mount point protected", {"volume__mount_point": "/usr/data"}, "volume.mount_point", "/usr is needed"),
    ("mount point root", {"volume__mount_point": "/"}, "volume.mount_point", "must be an absolute path of letters"),
    ("mount point with space", {"volume__mount_point": "/my data"}, "volume.mount_point", "absolute path of letters"),
    ("mount point dot-dot", {"volume__mount_point": "/data/../x"}, "volume.mount_point", "'..'"),
    (
        "mapping without mode",
        {"externalize": [{"path": "/srv/x", "owner": "root", "group": "root"}]},
        "externalize[0]",
        "missing 'mode'",
    ),
    (
        "mapping unquoted mode",
        {"externalize": [{"path": "/srv/x", "owner": "root", "group": "root", "mode": 488}]},
        "externalize[0].mode",
        "must be a string",
    ),
    (
        "mapping bad mode",
        {"externalize": [{"path": "/srv/x", "owner": "root", "group": "root", "mode": "0999"}]},
        "externalize[0].mode",
        "octal mode",
    ),
    (
        "mapping bad owner",
        {"externalize": [{"path": "/srv/x", "owner": "Bad Name", "group": "root", "mode": "0750"}]},
        "externalize[0].owner",
        "user or group name",
    ),
    (
        "mapping protected path",
        {"externalize": [{"path": "/etc/ssh/x", "owner": "root", "group": "root", "mode": "0750"}]},
        "externalize[0].path",
        "/etc/ssh is needed",
    ),
    ("path not a string", {"externalize": [5]}, "externalize[0]", "an absolute path, or a mapping"),
    ("device name", {"volume__device": "/dev/sda"}, "volume.device", "/dev/sdf ... /dev/sdp"),
    ("device nvme", {"volume__device": "/dev/nvme1n1"}, "volume.device", "/dev/sdf"),
    ("volume type", {"volume__type": "gp4"}, "volume.type", "one of gp3, gp2, io1, io2"),
    ("size not a number", {"volume__size_gib": "10"}, "volume.size_gib", "whole number"),
    ("size zero", {"volume__size_gib": 0}, "volume.size_gib", "at least 1"),
    ("gp2 too big", {"volume__type": "gp2", "volume__size_gib": 20000}, "volume.size_gib", "1 to 16384"),
    (
        "io1 too small",
        {"volume__type": "io1", "volume__size_gib": 2, "volume__iops": 100},
        "volume.size_gib",
        "4 to 16384",
    ),
    ("io1 without iops", {"volume__type": "io1"}, "volume.iops", "required for io1"),
    ("io2 iops ratio", {"volume__type": "io2", "volume__iops": 20000}, "volume.iops", "1000 IOPS per GiB"),
    ("gp2 with iops", {"volume__type": "gp2", "volume__iops": 3000}, "volume.iops", "take no iops"),
    ("gp3 iops too low", {"volume__iops": 1000}, "volume.iops", "3000 to 80000"),
    ("gp3 iops ratio", {"volume__iops": 6000}, "volume.iops", "500 IOPS per GiB"),
    (
        "throughput on io1",
        {"volume__type": "io1", "volume__iops": 200, "volume__throughput": 200},
        "volume.throughput",
        "only gp3",
    ),
    ("gp3 throughput ratio", {"volume__throughput": 1000}, "volume.throughput", "per IOPS"),
    ("throughput too high", {"volume__throughput": 5000}, "volume.throughput", "at most 2000"),
    ("filesystem", {"volume__filesystem": "btrfs"}, "volume.filesystem", "one of ext4, xfs"),
    ("encrypted not bool", {"volume__encrypted": "yes please"}, "volume.encrypted", "true or false"),
    (
        "kms without encryption",
        {"volume__encrypted": False, "volume__kms_key_id": "alias/x"},
        "volume.kms_key_id",
        "encrypted is false",
    ),
    ("kms key form", {"volume__kms_key_id": "my key"}, "volume.kms_key_id", "KMS key"),
    ("release", {"base__release": "buster"}, "base.release", "bookworm, trixie"),
    ("arch", {"base__arch": "x86_64"}, "base.arch", "amd64, arm64"),
    ("owner", {"base__owner": "debian"}, "base.owner", "12-digit"),
    ("ami id", {"base__ami": "ami-12"}, "base.ami", "AMI id"),
    ("ami and name", {"base__ami": "ami-0123456789abcdef0", "base__name": "debian-*"}, "base", "not both"),
    ("instance type form", {"instance_type": "large"}, "instance_type", "instance type"),
    ("arch mismatch arm", {"base__arch": "arm64", "instance_type": "t3.small"}, "instance_type", "does not run arm64"),
    ("arch mismatch amd", {"instance_type": "m7g.large"}, "instance_type", "does not run amd64"),
    ("types and type", {"instance_type": "t3.small", "instance_types": ["t3a.small"]}, "instance_types", "not both"),
    ("types empty", {"instance_types": []}, "instance_types", "at least 1"),
    ("types not a list", {"instance_types": "t3.small"}, "instance_types", "must be a list"),
    ("types item form", {"instance_types": ["t3.small", "large"]}, "instance_types[1]", "instance type"),
    ("types arch", {"instance_types": ["t3.small", "m7g.large"]}, "instance_types[1]", "does not run amd64"),
    ("types repeat", {"instance_types": ["t3.small", "t3.small"]}, "instance_types[1]", "repeats instance_types[0]"),
    ("package name", {"packages": ["Apache2!"]}, "packages[0]", "Debian package name"),
    ("duplicate package", {"packages": ["apache2", "apache2=2.4"]}, "packages[1]", "repeats packages[0]"),
    ("service name", {"services": ["apache 2"]}, "services[0]", "systemd unit"),
    ("duplicate service", {"services": ["apache2", "apache2.service"]}, "services[1]", "repeats services[0]"),
    ("packages not a list", {"packages": "apache2"}, "packages", "must be a list"),
    ("tag aws prefix", {"tags": {"aws:x": "y"}}, "tags", "not starting with aws:"),
    ("tag own prefix", {"tags": {"ebsrole:role": "y"}}, "tags", "ebsrole:"),
    ("tag value not string", {"tags": {"env": True}}, "tags.env", "must be a string"),
]


@pytest.mark.parametrize(("changes", "key", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_role_names_file_key_and_problem(
    roles_dir: Path, write_role: Callable[..., Path], changes: dict[str, Any], key: str, words: str
) -> None:
    write_role("r", changed(**changes))
    problems = problems_of(roles_dir)
    prefix = f"r.yaml: {key}: "
    matching = [p for p in problems if prefix in p and words in p]
    assert matching, f"no problem at {key!r} mentioning {words!r} in {problems}"
    assert all("\n" not in p for p in problems)


GOOD = [
    ("minimal", {}),
    ("mapping path", {"externalize": [{"path": "/srv/up loads", "owner": "www-data", "group": "33", "mode": "2750"}]}),
    ("space and quote in path", {"externalize": ['/srv/it\'s a "dir"']}),
    ("sibling prefixes are not nested", {"externalize": ["/var/www", "/var/www2"]}),
    ("xvd device", {"volume__device": "/dev/xvdp"}),
    ("io2 with iops", {"volume__type": "io2", "volume__size_gib": 100, "volume__iops": 64000}),
    ("gp3 tuned", {"volume__size_gib": 100, "volume__iops": 16000, "volume__throughput": 1000}),
    ("xfs", {"volume__filesystem": "xfs"}),
    ("trixie by number", {"base__release": 13}),
    ("arm64", {"base__arch": "arm64", "instance_type": "c7g.large"}),
    ("arm64 types", {"base__arch": "arm64", "instance_types": ["t4g.small", "c7g.large"]}),
    ("pinned ami", {"base__ami": "ami-0123456789abcdef0"}),
    ("kms alias", {"volume__kms_key_id": "alias/ebs-data"}),
    ("var log allowed", {"externalize": ["/var/log/apache2"]}),
    ("tags", {"tags": {"env": "prod", "cost-center": "42"}}),
]


@pytest.mark.parametrize("changes", [c[1] for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_role_loads(roles_dir: Path, write_role: Callable[..., Path], changes: dict[str, Any]) -> None:
    write_role("r", changed(**changes))
    role = load_role("r", roles_dir)
    assert role.name == "r"
    assert role.externalize


def test_every_problem_is_reported_at_once(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("a", changed(externalize=["/etc/ssh", "relative"], volume__type="gp4"))
    write_role("b", changed(description=DELETE))
    with pytest.raises(RoleInvalid) as caught:
        load_roles(None, roles_dir)
    text = caught.value.render()
    assert "a.yaml: externalize[0]" in text
    assert "a.yaml: externalize[1]" in text
    assert "a.yaml: volume.type" in text
    assert "b.yaml: description: missing" in text
    assert "4 problems found" in text


def test_defaults_apply_and_role_overrides(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role(
        "defaults",
        {"volume": {"device": "/dev/xvdg", "mount_point": "/srv/data", "size_gib": 5}, "tags": {"team": "ops"}},
    )
    write_role("r", {"description": "d", "volume": {"size_gib": 8}, "externalize": ["/var/www"], "tags": {"env": "x"}})
    role = load_role("r", roles_dir)
    assert role.volume.device == "/dev/xvdg"
    assert role.volume.mount_point == "/srv/data"
    assert role.volume.size_gib == 8
    assert role.volume.type == "gp3" and role.volume.encrypted is True
    assert dict(role.tags) == {"team": "ops", "env": "x"}
    assert role.base.owner == "136693071363"
    assert role.base.name_pattern == "debian-12-amd64-2*"
    assert role.instance_type == "t3.small"
    assert role_names(roles_dir) == ["r"]


def test_problem_in_defaults_names_the_defaults_file(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("defaults", {"volume": {"type": "gp9"}})
    write_role("r", GOOD_ROLE)
    assert any(
        p.startswith(f"{roles_dir}/defaults.yaml: volume.type:") or "defaults.yaml: volume.type:" in p
        for p in problems_of(roles_dir)
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("description: a\ndescription: b\n", "duplicate key 'description'"),
        ("description: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("", "must be a mapping"),
        ("1: x\n", "must be a string"),
    ],
    ids=["duplicate key", "syntax", "list", "empty", "int key"],
)
def test_yaml_problems(roles_dir: Path, write_role: Callable[..., Path], text: str, words: str) -> None:
    write_role("r", text)
    problems = problems_of(roles_dir)
    assert any("r.yaml" in p and words in p for p in problems), problems


def test_syntax_error_names_line(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("r", "description: ok\nvolume:\n  size_gib: [\n")
    assert any("line 4" in p or "line 3" in p for p in problems_of(roles_dir))


@pytest.mark.parametrize("name", ["Web", "web_1", "validate", "audit", "1web"])
def test_bad_role_names(roles_dir: Path, write_role: Callable[..., Path], name: str) -> None:
    write_role(name, GOOD_ROLE)
    assert any("role names" in p for p in problems_of(roles_dir, name))


def test_unknown_role_lists_known(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("web", GOOD_ROLE)
    with pytest.raises(RoleNotFound) as caught:
        load_roles(["wbe"], roles_dir)
    assert "wbe.yaml: no such role" in caught.value.render()
    assert "web" in caught.value.render()


def test_protected_list_is_normalised() -> None:
    assert all(p.startswith("/") and not p.endswith("/") for p in PROTECTED_TREES)


def test_shipped_roles_are_valid() -> None:
    roles = {r.name: r for r in load_roles()}
    assert set(roles) >= {"web", "database", "management"}
    assert [p.path for p in roles["web"].externalize] == ["/etc/apache2", "/etc/php", "/var/www"]
    assert roles["web"].services == ("apache2.service",)
    assert "mariadb-server" in roles["database"].packages
    assert "/var/lib/mysql" in [p.path for p in roles["database"].externalize]


def test_instance_types_are_an_ordered_fallback_that_replaces_the_defaults(
    roles_dir: Path, write_role: Callable[..., Path]
) -> None:
    from builder.fingerprint import role_values

    write_role("defaults", {"instance_type": "t3.medium"})
    write_role("one", GOOD_ROLE)
    write_role("list", changed(instance_types=["t3.small", "t3a.small", "m6i.large"]))
    write_role("single", changed(instance_types=["t3.small"]))
    write_role("plain", changed(instance_type="t3.small"))
    one, listed, single, plain = load_roles(["one", "list", "single", "plain"], roles_dir)
    assert one.instance_types == ("t3.medium",) and one.instance_type == "t3.medium"
    # The role's list replaces the defaults' instance_type (no "both" problem across files).
    assert listed.instance_types == ("t3.small", "t3a.small", "m6i.large") and listed.instance_type == "t3.small"
    # A one-item list is instance_type: the same fingerprint inputs as before the list existed.
    assert {**role_values(single), "name": "plain"} == role_values(plain)
    assert "instance_types" not in role_values(plain)
    assert list(role_values(listed)["instance_types"]) == ["t3.small", "t3a.small", "m6i.large"]


def test_both_type_keys_in_the_defaults_file_name_it(roles_dir: Path, write_role: Callable[..., Path]) -> None:
    write_role("defaults", {"instance_type": "t3.small", "instance_types": ["t3a.small"]})
    write_role("r", GOOD_ROLE)
    assert [p for p in problems_of(roles_dir) if "defaults.yaml: instance_types: " in p and "not both" in p]
