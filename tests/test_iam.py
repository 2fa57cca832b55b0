"""The IAM policy (builder/iam.py, `iam-policy`) against what the commands really call.

The sandbox's endpoint counts every request it answers by ``service:Action`` (IAM's names;
``api_calls_by_operation`` of its status, reachable only with its credentials). Each
command runs against it as a user runs it, and the actions it made the endpoint see must
all be in that command's policy; the policy's actions no run used are reported (printed and
warned), not failed: error paths (a failed build's cleanup) are in the policy too.

DLM is not served by the sandbox (builder/sandbox/auth.py SERVICES: ec2, ssm, sts, kms, autoscaling) and moto
(5.2.5) has no DLM at all: ``schedule --apply`` runs in-process with moto for STS, and
botocore's ``before-call`` event records each operation the tool's clients call; for DLM
the same hook answers in place of the missing service (an empty list, then the created
policy), so that the create-then-update path runs.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.awsrequest
import pytest
import yaml
from moto import mock_aws

from builder import iam, tags
from builder.aws.ec2 import EC2
from builder.cli.registry import VERBS
from builder.roles import load_roles
from builder.schedule import schedule
from tests.conftest import MINI_ROLE, PROJECT, run_cli
from tests.machines import needs_root
from tests.sandbox import World

SECOND_REGION = "eu-west-1"
USED: dict[str, set[str]] = {}  # command -> actions the endpoint saw, over the module's runs


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roles")
    (path / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    return path


def operations(world: World) -> Counter[str]:
    return Counter(world.status()["api_calls_by_operation"])


def run(world: World, roles: Path, command: str, *args: str, code: int = 0) -> dict[str, Any]:
    """Run ``build.py ARGS --roles-dir --sandbox``; record what the endpoint saw under ``command``; return its JSON.

    ``code``: the exit code the run must end with.
    """
    before = operations(world)
    done = world.cli(*args, "--roles-dir", str(roles), "--sandbox")
    seen = operations(world) - before
    assert done.returncode == code, f"{args}: {done.stderr[-3000:]}"
    USED.setdefault(command, set()).update(seen)
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def missing_and_unused(command: str, used: set[str]) -> tuple[set[str], set[str]]:
    allowed = iam.actions_of(iam.policy([command]))
    return used - allowed, set(iam.ACTIONS[command]) - used


@pytest.fixture(scope="module")
def runs(world: World, roles: Path) -> Iterator[dict[str, set[str]]]:
    """Every command that calls AWS, once (a few twice), against one sandbox and one build."""
    built = run(world, roles, "build", "mini", "--format", "json")["builds"][0]
    run(world, roles, "fingerprint", "fingerprint", "mini", "--format", "json")
    run(world, roles, "changed", "changed", "--format", "json")
    run(world, roles, "audit", "audit", "--registered", "mini", "--format", "json")
    launched = run(world, roles, "launch", "launch", "mini", "--from", "seed", "--env", "prod", "--wait",
                   "--format", "json")  # fmt: skip
    instance = launched["instances"][0]["instance_id"]
    run(world, roles, "snapshot", "snapshot", "mini", "--as-of", "2026-03-01", "--format", "json")
    group = ("--asg", "mini-prod", "--min", "0", "--max", "1", "--desired", "0")
    run(world, roles, "template", "template", "mini", "--env", "prod", *group, "--format", "json")
    run(world, roles, "template", "template", "mini", "--env", "prod", *group, "--refresh", "--format", "json")
    night = run(world, roles, "snapshot", "snapshot", "mini", "--as-of", "2026-03-02", "--keep-daily", "1",
                "--update-template", "--format", "json")  # fmt: skip
    assert [t["result"] for t in night["templates"]] == ["updated"], night
    drill = run(world, roles, "drill", "drill", "mini", "--source-env", "prod", "--format", "json")
    assert drill["passed"], drill
    run(world, roles, "copy", "copy", "mini", "--to", SECOND_REGION, "--format", "json")
    run(world, roles, "schedule", "schedule", "mini")  # prints the policy: the account id from STS
    # share: the AMI's snapshots use the default key, so a grant is refused (exit 2) after its checks.
    run(world, roles, "share", "share", "mini", "--accounts", "111122223333", "--format", "json", code=2)
    run(world, roles, "share", "share", "mini", "--accounts", "111122223333", "--revoke", "--format", "json")
    world.client().terminate_instances(InstanceIds=[instance])
    second = run(world, roles, "build", "mini", "--deprecate-after", "30", "--protect", "--format", "json")
    second = second["builds"][0]
    pruned = run(world, roles, "prune", "prune", "mini", "--keep", "1", "--format", "json")
    assert built["ami"] in json.dumps(pruned) and second["ami"] != built["ami"], pruned
    run(world, roles, "sweep", "sweep", "--format", "json")
    run(world, roles, "sweep", "sweep", "--volumes", "--format", "json")
    yield USED


@needs_root
@pytest.mark.parametrize("command", [c for c in iam.ACTIONS if c != "schedule"] + ["schedule"])
def test_each_command_calls_only_what_its_policy_allows(runs: dict[str, set[str]], command: str) -> None:
    used = runs[command]
    assert used, f"{command} made the endpoint see nothing: the recorder is broken"
    missing, unused = missing_and_unused(command, used)
    if command == "schedule":  # DLM: see test_schedule_apply_calls_only_what_its_policy_allows
        unused -= {a for a in unused if a.startswith(("dlm:", "iam:"))}
    if unused:
        note = f"{command}: policy actions this run never used: {', '.join(sorted(unused))}"
        print(note)
        warnings.warn(note, stacklevel=1)
    assert not missing, f"{command} called actions its policy lacks: {sorted(missing)}"


class MissingDLM:
    """Records each operation the tool's clients call; answers DLM's (moto has none) from a dict."""

    def __init__(self) -> None:
        self.called: list[str] = []
        self.policies: dict[str, dict[str, Any]] = {}

    def __call__(self, model: Any, params: dict[str, Any], **_: Any) -> Any:
        service = model.service_model.signing_name
        self.called.append(f"{service}:{model.name}")
        if service != "dlm":
            return None  # moto answers
        ok = botocore.awsrequest.AWSResponse("https://dlm.invalid", 200, {}, None)
        if model.name == "GetLifecyclePolicies":
            listed = [{"PolicyId": k, "Tags": v.get("Tags", {})} for k, v in self.policies.items()]
            return ok, {"Policies": listed}
        if model.name == "CreateLifecyclePolicy":
            self.policies[f"policy-{len(self.policies):017x}"] = json.loads(params["body"])  # the request sent
            return ok, {"PolicyId": next(reversed(self.policies))}
        return ok, {}


def test_schedule_apply_calls_only_what_its_policy_allows() -> None:
    """schedule --apply, twice (create, then update), without --execution-role-arn: STS from moto, DLM recorded."""
    hook = MissingDLM()
    with mock_aws():
        session = boto3.session.Session(region_name=SECOND_REGION)
        session.events.register("before-call", hook)
        ec2 = EC2(session.client("ec2"), session)
        options: dict[str, Any] = {"execution_role_arn": None, "env": "prod", "time": "03:00", "keep_daily": 7,
                                   "keep_weekly": 4, "copy_to": None}  # fmt: skip
        first = schedule("mini", lambda: ec2, apply=True, **options)
        second = schedule("mini", lambda: ec2, apply=True, **options)
    assert (first.done, second.done) == ("created", "updated")
    used = set(hook.called)
    assert used >= {"sts:GetCallerIdentity", "dlm:CreateLifecyclePolicy", "dlm:UpdateLifecyclePolicy"}
    missing, unused = missing_and_unused("schedule", used | {"iam:PassRole"})  # DLM checks PassRole itself
    assert not missing and not unused, (missing, unused)
    passed = next(s for s in iam.policy(["schedule"])["Statement"] if s["Action"] == ["iam:PassRole"])
    role = first.policy["ExecutionRoleArn"]
    assert re.fullmatch(passed["Resource"].replace("*", "[0-9]+"), role), (passed, role)


# ---------------------------------------------------------------- the policy document


def test_every_command_is_either_in_the_table_or_offline() -> None:
    assert set(VERBS) | {"build"} == set(iam.ACTIONS) | iam.OFFLINE


def test_removals_need_the_tools_tag_and_reads_have_no_scope() -> None:
    document = iam.policy(list(iam.ACTIONS))
    by_action: dict[str, list[dict[str, Any]]] = {}
    for statement in document["Statement"]:
        for action in statement["Action"]:
            by_action.setdefault(action, []).append(statement)
    for action in ("ec2:TerminateInstances", "ec2:DeleteVolume", "ec2:DeleteSnapshot", "ec2:DeregisterImage",
                   "ec2:DeleteKeyPair", "ec2:DeleteSecurityGroup"):  # fmt: skip
        (statement,) = by_action[action]
        assert statement["Condition"] == {"StringLike": {f"aws:ResourceTag/{tags.CREATED_BY}": f"{tags.TOOL} *"}}
    assert all("Condition" not in s for s in by_action["ec2:DescribeImages"])
    at_create = next(s for s in by_action["ec2:CreateTags"] if "ec2:CreateAction" in str(s.get("Condition")))
    assert "RunInstances" in at_create["Condition"]["StringEquals"]["ec2:CreateAction"]
    assert all("Condition" in s for s in by_action["ec2:CreateTags"])  # never tag anything, anyhow
    # IAM's limit for a managed policy: 6,144 characters without whitespace.
    assert len(json.dumps(document, separators=(",", ":"))) < 6144


def test_snapshot_may_tag_its_snapshots_at_creation_only() -> None:
    (statement,) = [s for s in iam.policy(["snapshot"])["Statement"] if "ec2:CreateTags" in s["Action"]]
    assert statement["Condition"] == {"StringEquals": {"ec2:CreateAction": ["CreateSnapshot"]}}


def test_kms_statements_come_with_a_roles_customer_managed_key(roles_dir: Path) -> None:
    arn = "arn:aws:kms:eu-central-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for name, key in (("mini", arn), ("other", "alias/ebs-data")):
        role = {**MINI_ROLE, "volume": {**MINI_ROLE["volume"], "kms_key_id": key}}
        (roles_dir / f"{name}.yaml").write_text(yaml.safe_dump(role))
    loaded = load_roles(None, roles_dir)
    kms = [s for s in iam.policy(["build"], loaded)["Statement"] if s["Action"][0].startswith("kms:")]
    grants = [s for s in kms if s["Action"] == ["kms:CreateGrant"]]
    assert all(s["Condition"]["Bool"] == {"kms:GrantIsForAWSResource": "true"} for s in grants) and len(grants) == 2
    assert [s["Resource"] for s in kms if "kms:Decrypt" in s["Action"]] == [[arn], ["arn:aws:kms:*:*:key/*"]]
    by_alias = next(s for s in kms if s["Resource"] == ["arn:aws:kms:*:*:key/*"] and "kms:Decrypt" in s["Action"])
    assert by_alias["Condition"] == {"ForAnyValue:StringEquals": {"kms:ResourceAliases": ["alias/ebs-data"]}}
    assert not any(s["Action"][0].startswith("kms:") for s in iam.policy(["fingerprint"], loaded)["Statement"])
    plain = load_roles(None, _copy_without_keys(roles_dir))
    assert not any(s["Action"][0].startswith("kms:") for s in iam.policy(["build"], plain)["Statement"])


def _copy_without_keys(roles_dir: Path) -> Path:
    plain = roles_dir.parent / "plain"
    shutil.rmtree(plain, ignore_errors=True)
    plain.mkdir()
    (plain / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    return plain


# ---------------------------------------------------------------- the command


def test_iam_policy_command(roles_dir: Path) -> None:
    (roles_dir / "mini.yaml").write_text(yaml.safe_dump(MINI_ROLE))
    done = run_cli("iam-policy", "--commands", "build,snapshot", "--roles-dir", str(roles_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == iam.policy(["build", "snapshot"])
    text = run_cli("iam-policy", "--commands", "snapshot", "--format", "text", "--roles-dir", str(roles_dir))
    assert text.returncode == 0 and re.search(r"^ec2:CreateSnapshot +snapshot$", text.stdout, re.M), text.stdout
    keyed = run_cli("iam-policy", "--commands", "launch", "--kms-key-arn", "alias/k", "--roles-dir", str(roles_dir))
    assert "alias/k" in keyed.stdout
    for bad, says in (("build,bogus", "unknown command 'bogus'"), ("validate", "'validate' calls no AWS API")):
        refused = run_cli("iam-policy", "--commands", bad, "--roles-dir", str(roles_dir))
        assert refused.returncode == 2 and says in refused.stderr and "build, audit" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_reference_shows_what_the_command_prints() -> None:
    """docs/reference/iam.md carries `iam-policy --format text` verbatim: every action, every command."""
    doc = (PROJECT / "docs/reference/iam.md").read_text()
    printed = run_cli("iam-policy", "--format", "text", "--roles-dir", str(PROJECT / "roles"))
    assert printed.returncode == 0, printed.stderr
    assert f"```text\n{printed.stdout}```" in doc
    build = run_cli("iam-policy", "--commands", "build", "--roles-dir", str(PROJECT / "roles"))
    assert f"```json\n{build.stdout}```" in doc
