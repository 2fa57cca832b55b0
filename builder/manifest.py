"""The build manifest: what a build made and what became of it, written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder import __version__
from builder.aws.ec2 import EC2, now_iso
from builder.cleanup import Resource
from builder.files import write_atomic
from builder.roles import Role

SCHEMA_VERSION = 1
MANIFEST_DIR = Path("manifests")


@dataclass
class Manifest:
    """One build's record; ``path`` is where it is written."""

    build_id: str
    role: str
    region: str
    path: Path
    started_at: str
    tool: str = f"ebsrole {__version__}"
    status: str = "running"  # running | complete | unchanged | failed | interrupted
    error: str | None = None
    base_ami: str | None = None
    fingerprint: str | None = None
    ami: str | None = None
    seed_snapshot: str | None = None
    root_snapshot: str | None = None
    data_volume: str | None = None
    snapshot_way: str = ""  # frozen (data and root frozen on the running builder) | stopped (--stop)
    device: str = ""
    mount_point: str = ""
    externalized: list[str] = field(default_factory=list)
    scripts: dict[str, str] = field(default_factory=dict)
    resources: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    published: list[dict[str, Any]] = field(default_factory=list)  # SSM parameters: name, value, outcome, error
    api_calls: int = 0
    api_calls_by_action: dict[str, int] = field(default_factory=dict)
    finished_at: str | None = None

    @classmethod
    def begin(cls, role: Role, region: str, build_id: str, path: Path | None) -> Manifest:
        """Return the manifest of a build that starts now."""
        return cls(
            build_id=build_id,
            role=role.name,
            region=region,
            started_at=now_iso(),
            path=path or MANIFEST_DIR / f"{role.name}-{build_id}.json",
            device=role.volume.device,
            mount_point=role.volume.mount_point,
            externalized=[p.path for p in role.externalize],
        )

    def finish(self, resources: list[Resource], ec2: EC2) -> None:
        """Record the resources' fates and the API calls made."""
        self.resources = [
            {"kind": r.kind, "id": r.id, "fate": r.fate, **({"error": r.error} if r.error else {})} for r in resources
        ]
        self.api_calls = ec2.total_calls
        self.api_calls_by_action = dict(sorted(ec2.calls.items()))
        self.finished_at = now_iso()

    def to_json(self) -> str:
        """Return the manifest as stable JSON."""
        doc = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        doc["path"] = str(self.path)
        return json.dumps(doc, indent=2, default=str) + "\n"


def write_manifest(manifest: Manifest) -> Path:
    """Write the manifest atomically; return its path."""
    write_atomic(manifest.path, manifest.to_json())
    return manifest.path
