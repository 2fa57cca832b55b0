"""builder.tags: the tag schema's builders and its parser agree, through EC2 (moto) and back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from builder import __version__, tags

REGION = "eu-west-1"
BUILDER = Path(__file__).resolve().parent.parent / "builder"


@pytest.fixture
def client() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _snapshot(client: Any, tagged: dict[str, str]) -> dict[str, Any]:
    """Create a snapshot tagged at creation; return EC2's description of it."""
    volume = client.create_volume(AvailabilityZone=f"{REGION}a", Size=1)["VolumeId"]
    made = client.create_snapshot(VolumeId=volume, TagSpecifications=tags.tag_specs("snapshot", tagged))
    return dict(client.describe_snapshots(SnapshotIds=[made["SnapshotId"]])["Snapshots"][0])


def test_build_artefact_round_trips_through_ec2(client: Any) -> None:
    stamp = tags.BuildStamp("20240101T000000Z-0123abcd", "web", "2024-01-01T00:00:00Z", {"team": "ops"})
    paths = [f"/srv/{'d' * 60}{n}" for n in range(8)]  # over one PATHS_CHUNK: paths, paths-2, ...
    facts = tags.image_facts("ami-0base", "fp1", "/data", "/dev/sdf", paths)
    made = stamp.artefact(tags.KIND_IMAGE, tags.STATUS_COMPLETE, {**facts, **tags.pairing("snap-s", "snap-r")})
    seen = tags.parse(_snapshot(client, made))
    assert tags.tag("paths-2") in seen.all and seen.paths == tuple(paths)
    assert (seen.build_id, seen.role, seen.kind, seen.status) == (stamp.build_id, "web", "image", "complete")
    assert (seen.base_ami, seen.fingerprint, seen.mount_point, seen.device) == ("ami-0base", "fp1", "/data", "/dev/sdf")
    assert (seen.seed_snapshot, seen.root_snapshot, seen.temporary) == ("snap-s", "snap-r", False)
    assert seen.all["team"] == "ops" and seen.by_tool


def test_keys_and_values_stay_what_existing_resources_carry() -> None:
    """The tags are the tool's database: resources made by older versions must still be found."""
    stamp = tags.BuildStamp("b1", "web", "t0")
    assert stamp.temporary(tags.KIND_BUILDER_VOLUME) == {
        "ebsrole:build-id": "b1",
        "ebsrole:role": "web",
        "ebsrole:kind": "builder-volume",
        "ebsrole:created-by": f"ebsrole {__version__}",
        "ebsrole:created-at": "t0",
        "ebsrole:temporary": "true",
    }
    assert tags.data_volume("web", "prod") == {
        "ebsrole:data-of": "web",
        "ebsrole:kind": "data-volume",
        "ebsrole:backup-target": "web@prod",
    }
    assert tags.dlm_snapshot("web", "")["ebsrole:scheduled-by"] == "dlm"


def test_nightly_snapshot_round_trips(client: Any) -> None:
    nightly = tags.Nightly("web", "prod", "2024-02-03", "i-1", "vol-1", f"{REGION}b", "/dev/sdf", "m-1")
    made = tags.nightly_snapshot(nightly)
    seen = tags.parse(_snapshot(client, made))
    assert seen.all["Name"] == "web-prod nightly 2024-02-03" and seen.kind == tags.KIND_NIGHTLY
    assert (seen.role, seen.env, seen.date, seen.source_volume, seen.source_az) == (
        "web",
        "prod",
        "2024-02-03",
        "vol-1",
        f"{REGION}b",
    )
    assert (
        seen.marker == "m-1"
        and tags.view(tags.nightly_snapshot(nightly.__class__("w", "", "d", "", "", "", ""))).marker is None
    )


def test_every_family_says_created_by_the_tool() -> None:
    made = [
        tags.BuildStamp("b", "r", "t").temporary(tags.KIND_KEY_PAIR),
        tags.BuildStamp("b", "r", "t").artefact(tags.KIND_IMAGE, tags.STATUS_PENDING),
        tags.nightly_snapshot(tags.Nightly("r", "", "d", "i", "v", "a", "/dev/sdf")),
        tags.dlm_snapshot("r", "e"),
        tags.dlm_policy("r", "e"),
        tags.launched("n", "r", "e", "snap-1"),
        tags.drill("d1", "r"),
    ]
    assert all(tags.view(m).created_by == f"ebsrole {__version__}" and tags.view(m).by_tool for m in made)
    assert not tags.view({tags.CREATED_BY: "terraform"}).by_tool


def test_copy_keeps_the_source_but_not_its_pairing_on_snapshots() -> None:
    source = {"Name": "ebsrole-web-b1", tags.ROLE: "web", **tags.pairing("snap-s", "snap-r")}
    source[tags.AMI] = "ami-1"  # what a build's AMI says of itself
    image = tags.view(tags.copied_image(source, "eu-west-1/ami-1", "snap-S", "snap-R", "ami-2"))
    snap = tags.copied_snapshot(source, "eu-west-1/ami-1", tags.KIND_SEED_SNAPSHOT, "ami-2")
    assert (image.seed_snapshot, image.all[tags.COPIED_FROM]) == ("snap-S", "eu-west-1/ami-1")
    assert image.all[tags.AMI] == "ami-2"
    assert tags.SEED_SNAPSHOT not in snap and "Name" not in snap and snap[tags.AMI] == "ami-2"


def test_no_module_but_tags_spells_a_tag_key() -> None:
    """created-by, and every other ebsrole:* key, is written in builder/tags.py alone."""
    spelt = re.compile(r"""["']ebsrole:[a-z]|\btag\(["']|created-by["']""")
    offenders = [
        f"{path.relative_to(BUILDER)}:{n}"
        for path in BUILDER.rglob("*.py")
        if path.name != "tags.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if spelt.search(line)
    ]
    assert offenders == []
