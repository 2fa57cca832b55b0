"""Reaching instances: the address and proxy a Reach picks, the SSH source a security group
admits (moto), launches without a public IP, and real OpenSSH ``ssh -W`` proxies to a real sshd.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from builder.aws import resources
from builder.aws.ec2 import EC2
from builder.errors import InvalidInput, SSHConnectFailed
from builder.keys import KeyPair
from builder.manifest import Manifest
from builder.pipeline import BuildOptions, _Build, temporary_credentials
from builder.reach import Reach, expand, ssh_answers
from builder.remote import Remote
from builder.roles import load_role
from tests.conftest import run_cli
from tests.machines import Booted, boot, needs_root

TARGET_PORT = 2222  # the "private" sshd inside the bastion: reachable only from there


def known_line(name: str, key: KeyPair) -> str:
    return f"{name} {' '.join(key.public_line.split()[:2])}\n"


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(
        known_line("bastion.example.com", KeyPair.generate("b")) + known_line("[10.0.0.5]:2200", KeyPair.generate("c"))
    )
    return path


# ---------------------------------------------------------------- which address, which proxy

PUBLIC = {"InstanceId": "i-0abc", "PublicIpAddress": "203.0.113.9", "PrivateIpAddress": "10.0.1.7"}
PRIVATE_ONLY = {"InstanceId": "i-0def", "PrivateIpAddress": "10.0.1.8"}


@pytest.mark.parametrize(
    ("reach", "instance", "address"),
    [
        (Reach(), PUBLIC, "203.0.113.9"),  # auto: public when there is one
        (Reach(), PRIVATE_ONLY, "10.0.1.8"),  # auto: private otherwise
        (Reach("private"), PUBLIC, "10.0.1.7"),
        (Reach("public"), PUBLIC, "203.0.113.9"),
        (Reach(proxy_command="nc %h %p"), PUBLIC, "10.0.1.7"),  # a proxy is handed the private address
        (Reach(host="127.0.0.5"), PRIVATE_ONLY, "127.0.0.5"),  # --ssh-host wins
    ],
)
def test_the_address_follows_the_method(reach: Reach, instance: dict[str, str], address: str) -> None:
    assert reach.address(instance) == address


@pytest.mark.parametrize(
    ("reach", "instance", "words"),
    [
        (Reach("public"), PRIVATE_ONLY, ["i-0def has no public IP", "--connect private", "--bastion"]),
        (
            Reach("private"),
            {"InstanceId": "i-1", "PublicIpAddress": "203.0.113.9"},
            ["i-1 has no private IP", "--connect public"],
        ),
    ],
)
def test_a_missing_address_names_the_instance_and_the_flag(
    reach: Reach, instance: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(InvalidInput) as caught:
        reach.address(instance)
    assert all(w in str(caught.value) for w in words)


def test_private_means_from_inside_the_vpc() -> None:
    assert Reach().private(public_ip=False) and not Reach().private(public_ip=True)
    assert Reach("private").private(public_ip=True)
    assert Reach(proxy_command="nc %h %p").private(public_ip=True)
    assert not Reach("public").private(public_ip=False)


def test_proxy_tokens_are_expanded_and_quoted() -> None:
    reach = Reach(proxy_command="aws ssm start-session --target %i --parameters portNumber=%p --user %r 100%% %h")
    assert reach.proxy("10.0.1.7", 22, "admin", "i-0abc") == (
        "aws ssm start-session --target i-0abc --parameters portNumber=22 --user admin 100% 10.0.1.7"
    )
    # A value is one shell word, whatever it holds.
    assert expand("x %h", {"h": "a; rm -rf /"}) == "x 'a; rm -rf /'"
    assert Reach().proxy("10.0.1.7", 22, "admin") is None


def test_bastion_command_pins_its_host_key(known_hosts: Path) -> None:
    reach = Reach(bastion="ops@bastion.example.com", bastion_known_hosts=known_hosts)
    assert reach.proxy("10.0.1.7", 22, "admin") == (
        f"ssh -W 10.0.1.7:22 -o StrictHostKeyChecking=yes -o UserKnownHostsFile={known_hosts} "
        "-o BatchMode=yes -l ops bastion.example.com"
    )
    on_port = Reach(bastion="10.0.0.5:2200", bastion_known_hosts=known_hosts).proxy("10.0.1.7", 22, "admin")
    assert on_port is not None and on_port.endswith("-o BatchMode=yes -p 2200 10.0.0.5")


def test_a_hashed_known_hosts_entry_pins_the_bastion(tmp_path: Path) -> None:
    path = tmp_path / "hashed"
    path.write_text(known_line("bastion.example.com", KeyPair.generate("b")))
    subprocess.run(["ssh-keygen", "-H", "-f", str(path)], check=True, capture_output=True)
    assert "bastion.example.com" not in path.read_text()
    Reach(bastion="bastion.example.com", bastion_known_hosts=path)  # accepted
    with pytest.raises(InvalidInput):
        Reach(bastion="other.example.com", bastion_known_hosts=path)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"bastion": "bastion.example.com", "proxy_command": "nc %h %p"}, "--bastion and --ssh-proxy-command"),
        ({"method": "proxy"}, "--connect proxy needs"),
        ({"method": "public", "proxy_command": "nc %h %p"}, "--connect public connects directly"),
        ({"method": "sideways"}, "--connect 'sideways'"),
        ({"proxy_command": "nc %h %x"}, "unknown token '%x'"),
        ({"proxy_command": "nc %h %"}, "unknown token '%'"),
        ({"bastion": "-oProxyCommand=evil"}, "give [user@]host[:port]"),
        ({"bastion": "bastion.example.com:99999"}, "give [user@]host[:port]"),
        ({"bastion": "unknown.example.com"}, "no host key for unknown.example.com in "),
    ],
)
def test_bad_reach_options_are_refused(known_hosts: Path, kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Reach(bastion_known_hosts=known_hosts, **kwargs)
    assert words in str(caught.value)
    if "no host key" in words:
        assert str(known_hosts) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["mini", "--bastion", "b.example.com", "--ssh-proxy-command", "nc %h %p"], "not allowed with argument"),
        (["mini", "--ssh-cidr", "10.0.0.0/8", "--ssh-source-group", "sg-0123456789abcdef0"], "not allowed with"),
        (["mini", "--connect", "public", "--no-public-ip"], "--no-public-ip and --connect public"),
        (["mini", "--bastion", "b.example.com", "--bastion-known-hosts", "{kh}"], "no host key for b.example.com in"),
        (["drill", "mini", "--bastion", "b.example.com", "--ssh-proxy-command", "nc"], "not allowed with argument"),
        (["launch", "mini", "--connect", "proxy"], "--connect proxy needs"),
        (["snapshot", "--ssh-proxy-command", "nc %q"], "unknown token '%q'"),
        (["audit", "--instance", "i-0abc", "--identity", "k", "--connect", "proxy"], "--connect proxy needs"),
    ],
)
def test_flag_conflicts_exit_2_with_one_line(mini_dir: Path, known_hosts: Path, args: list[str], words: str) -> None:
    done = run_cli(*[a.replace("{kh}", str(known_hosts)) for a in args], "--roles-dir", str(mini_dir))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and words in errors[0], done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- whom the security group admits (moto)


@pytest.fixture
def ec2() -> Iterator[EC2]:
    with mock_aws():
        yield EC2.connect("eu-west-1")


def admitted(ec2: EC2, group_id: str) -> dict[str, list[str]]:
    (group,) = ec2.call("describe_security_groups", GroupIds=[group_id])["SecurityGroups"]
    rules = [p for p in group["IpPermissions"] if p.get("FromPort") == 22]
    return {
        "cidrs": [r["CidrIp"] for p in rules for r in p.get("IpRanges", [])]
        + [r["CidrIpv6"] for p in rules for r in p.get("Ipv6Ranges", [])],
        "groups": [g["GroupId"] for p in rules for g in p.get("UserIdGroupPairs", [])],
    }


def private_subnet(ec2: EC2) -> str:
    """A subnet of a VPC of its own, 10.9.0.0/16, that maps no public IPs (moto's default for a new subnet)."""
    vpc = ec2.call("create_vpc", CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    return str(ec2.call("create_subnet", VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"])


def build_group(ec2: EC2, mini_dir: Path, tmp_path: Path, **options: Any) -> dict[str, list[str]]:
    """Run the build's credentials stage with ``options``; return whom its security group admits."""
    role = load_role("mini", mini_dir)
    state = _Build(role, ec2, BuildOptions(**options), Manifest.begin(role, "eu-west-1", "b-1", tmp_path / "m.json"))
    temporary_credentials(state)
    try:
        return admitted(ec2, str(state.group_id))
    finally:
        assert not state.undo.unwind()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"connect_method": "private"}, ["172.31.0.0/16"]),  # the default VPC's CIDR
        ({"no_public_ip": True}, ["172.31.0.0/16"]),
        ({"ssh_proxy_command": "aws ssm start-session --target %i"}, ["172.31.0.0/16"]),
        ({"bastion": "bastion.example.com"}, ["172.31.0.0/16"]),
        ({"subnet_id": "PRIVATE"}, ["10.9.0.0/16"]),  # auto, and the subnet maps no public IP
        ({"subnet_id": "PRIVATE", "bastion": "bastion.example.com"}, ["10.9.0.0/16"]),
        ({"connect_method": "private", "ssh_cidr": "10.0.5.0/24"}, ["10.0.5.0/24"]),  # given wins
    ],
)
def test_private_connections_admit_the_vpc_never_the_world(
    ec2: EC2, mini_dir: Path, tmp_path: Path, known_hosts: Path, options: dict[str, Any], expected: list[str]
) -> None:
    if options.get("subnet_id") == "PRIVATE":
        options = {**options, "subnet_id": private_subnet(ec2)}
    if "bastion" in options:
        options = {**options, "bastion_known_hosts": str(known_hosts)}
    seen = build_group(ec2, mini_dir, tmp_path, **options)
    assert seen == {"cidrs": expected, "groups": []}


def test_a_source_group_is_admitted_instead_of_a_cidr(ec2: EC2, mini_dir: Path, tmp_path: Path) -> None:
    runners = ec2.call("create_security_group", GroupName="ci-runners", Description="CI")["GroupId"]
    seen = build_group(ec2, mini_dir, tmp_path, ssh_source_group=runners, connect_method="private")
    assert seen == {"cidrs": [], "groups": [runners]}
    with pytest.raises(InvalidInput, match="give a security group id"):
        build_group(ec2, mini_dir, tmp_path, ssh_source_group="ci-runners")


def test_a_drill_admits_the_vpc_when_connecting_privately(ec2: EC2) -> None:
    source = resources.ssh_source(ec2, private=Reach("private").private(public_ip=True))
    assert source.cidrs == ("172.31.0.0/16",) and "0.0.0.0/0" not in source.cidrs


# ---------------------------------------------------------------- launching without a public IP (moto)


def test_no_public_ip_launches_into_the_default_subnet_without_one(ec2: EC2) -> None:
    sent: list[dict[str, Any]] = []
    ec2.client.meta.events.register("provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(params))
    image = ec2.call("describe_images")["Images"][0]["ImageId"]
    group = ec2.call("create_security_group", GroupName="g", Description="g")["GroupId"]
    profile = boto3.client("iam", region_name="eu-west-1").create_instance_profile(InstanceProfileName="builder")
    arn = profile["InstanceProfile"]["Arn"]
    spec = resources.LaunchSpec(
        image_id=image,
        instance_type="t3.micro",
        disks=(),
        instance_tags={"Name": "x"},
        volume_tags={"Name": "x"},
        security_group_ids=(group,),
        az="eu-west-1b",
        public_ip=False,
        instance_profile=arn,
    )
    (instance_id,) = resources.launch(ec2, spec)
    described = ec2.instance(instance_id)
    assert "PublicIpAddress" not in described and described["PrivateIpAddress"].startswith("172.31.")
    (params,) = sent
    (interface,) = params["NetworkInterfaces"]
    assert interface["AssociatePublicIpAddress"] is False and interface["Groups"] == [group]
    default_b = ec2.call("describe_subnets", Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    assert interface["SubnetId"] == next(s["SubnetId"] for s in default_b if s["AvailabilityZone"] == "eu-west-1b")
    assert "SubnetId" not in params and "SecurityGroupIds" not in params  # EC2 refuses them next to an interface
    assert params["IamInstanceProfile"] == {"Arn": arn}
    assert described["IamInstanceProfile"]["Arn"] == arn
    assert Reach().address(described) == described["PrivateIpAddress"]  # auto goes private


def test_instance_profile_by_name() -> None:
    spec = resources.LaunchSpec("ami-1", "t3.micro", (), {}, {}, instance_profile="builder")
    assert resources.run_params(spec)["IamInstanceProfile"] == {"Name": "builder"}
    assert "NetworkInterfaces" not in resources.run_params(spec)  # public addressing as the subnet says


# ---------------------------------------------------------------- real OpenSSH proxies


def ssh_processes(marker: str) -> list[str]:
    """Return the live processes whose command line holds ``marker`` (zombies have none)."""
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True, check=False).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_a_proxy_command_that_exits_fails_with_its_words_and_leaves_nothing(tmp_path: Path) -> None:
    marker = f"proxy-exits-{tmp_path.name}"
    reach = Reach(proxy_command=f"sh -c 'echo no route to $0 >&2; exit 3' %h {marker}")
    login, pinned = KeyPair.generate("l"), KeyPair.generate("h")
    started = time.monotonic()
    with pytest.raises(SSHConnectFailed) as caught:
        Remote.connect("10.0.0.9", 22, "admin", login, pinned, deadline=2, proxy=reach.proxy("10.0.0.9", 22, "admin"))
    assert time.monotonic() - started < 10  # not a hang until banner time-outs
    assert "the proxy command exited 3: no route to 10.0.0.9" in str(caught.value)
    assert "hint: the proxy command was: sh -c" in caught.value.render()
    assert not ssh_processes(marker)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory: pytest.TempPathFactory, rootfs: Path) -> Iterator[tuple[Booted, KeyPair, KeyPair]]:
    """A machine as the bastion, running a second sshd (its own host key and login) on its loopback only.

    That sshd is the private instance: the host cannot reach 127.0.0.1:2222, the bastion can.
    """
    state = tmp_path_factory.mktemp("bastion")
    booted = boot("bastion", rootfs, state / "machines", size_gib=0.1)
    target_host, target_login = KeyPair.generate("target-host"), KeyPair.generate("target-login")
    try:
        booted.remote.put(target_host.private_openssh, "/tmp/target_host_key", 0o600)
        booted.remote.put(target_login.public_line + "\n", "/tmp/target_keys", 0o644)
        booted.sh(
            "install -m 600 /tmp/target_host_key /etc/ssh/target_host_key && "
            "install -m 644 /tmp/target_keys /etc/ssh/target_keys && "
            f"/usr/sbin/sshd -p {TARGET_PORT} -o ListenAddress=127.0.0.1 -o HostKey=/etc/ssh/target_host_key "
            "-o AuthorizedKeysFile=/etc/ssh/target_keys -o PidFile=/run/sshd-target.pid"
        )
        yield booted, target_host, target_login
    finally:
        booted.remote.close()
        booted.machine.stop()


def bastion_files(tmp_path: Path, booted: Booted, host_key: KeyPair | None = None) -> tuple[str, Path, Path]:
    """Return the bastion's [user@]host:port and the known_hosts and key files that reach it."""
    address, port = booted.machine.ssh_endpoint
    known = tmp_path / "bastion_known_hosts"
    known.write_text(known_line(f"[{address}]:{port}", host_key or booted.host_key))
    key = tmp_path / "bastion_key"
    key.write_text(booted.login.private_openssh)
    key.chmod(0o600)
    return f"admin@{address}:{port}", known, key


@needs_root
def test_bastion_reaches_a_private_sshd_with_both_host_keys_pinned(
    bastion: tuple[Booted, KeyPair, KeyPair], tmp_path: Path
) -> None:
    booted, target_host, target_login = bastion
    spec, known, key = bastion_files(tmp_path, booted)
    with pytest.raises(OSError):  # not reachable directly: only through the bastion
        socket.create_connection(("127.0.0.1", TARGET_PORT), timeout=2).close()
    reach = Reach(bastion=spec, bastion_known_hosts=known, bastion_identity=key)
    address = reach.address({"InstanceId": "i-0private", "PrivateIpAddress": "127.0.0.1"})
    proxy = reach.proxy(address, TARGET_PORT, "admin", "i-0private")
    assert proxy is not None and "StrictHostKeyChecking=yes" in proxy
    with Remote.connect(address, TARGET_PORT, "admin", target_login, target_host, deadline=60, proxy=proxy) as remote:
        seen = remote.check("echo $SSH_CONNECTION; whoami").stdout.split()
        assert seen[2:] == ["127.0.0.1", str(TARGET_PORT), "admin"]  # the private sshd, as its user
        assert ssh_processes(str(key))  # the proxy runs while the session is open
    assert not ssh_processes(str(key))  # and is gone once it is closed


@needs_root
def test_a_wrong_bastion_key_fails_at_once_with_a_clear_error(
    bastion: tuple[Booted, KeyPair, KeyPair], tmp_path: Path
) -> None:
    booted, target_host, target_login = bastion
    spec, known, key = bastion_files(tmp_path, booted, host_key=KeyPair.generate("impostor"))
    reach = Reach(bastion=spec, bastion_known_hosts=known, bastion_identity=key)
    started = time.monotonic()
    with pytest.raises(SSHConnectFailed) as caught:
        Remote.connect(
            "127.0.0.1",
            TARGET_PORT,
            "admin",
            target_login,
            target_host,
            deadline=120,
            proxy=reach.proxy("127.0.0.1", TARGET_PORT, "admin"),
        )
    assert time.monotonic() - started < 20  # refused, not retried until the deadline
    assert "Host key verification failed" in str(caught.value)
    assert not ssh_processes(str(key))


@needs_root
def test_a_proxy_command_with_tokens_reaches_the_private_sshd(
    bastion: tuple[Booted, KeyPair, KeyPair], tmp_path: Path
) -> None:
    booted, target_host, target_login = bastion
    _, known, key = bastion_files(tmp_path, booted)
    address, port = booted.machine.ssh_endpoint
    command = (
        f"ssh -W %h:%p -l %r -p {port} -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={known} {address}"
    )
    proxy = Reach(proxy_command=command).proxy("127.0.0.1", TARGET_PORT, "admin", "i-0private")
    with Remote.connect(
        "127.0.0.1", TARGET_PORT, "admin", target_login, target_host, deadline=60, proxy=proxy
    ) as remote:
        assert remote.check("echo $SSH_CONNECTION").stdout.split()[2:] == ["127.0.0.1", str(TARGET_PORT)]
    assert not ssh_processes(str(key))


def _greeter(greeting: bytes) -> tuple[socket.socket, int]:
    """A loopback listener that greets each connection with ``greeting``, then closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_only_an_ssh_greeting_counts_as_sshd_answering() -> None:
    """A port that refuses, one that accepts and closes (a forwarder with nothing behind it) and
    one that greets otherwise are no answer; "SSH-2.0-..." is."""
    sshd, sshd_port = _greeter(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n")
    closer, closer_port = _greeter(b"")
    other, other_port = _greeter(b"HTTP/1.1 400 Bad Request\r\n")
    refused = socket.create_server(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    try:
        assert ssh_answers("127.0.0.1", sshd_port)
        assert not ssh_answers("127.0.0.1", closer_port)
        assert not ssh_answers("127.0.0.1", other_port)
        assert not ssh_answers("127.0.0.1", refused_port)
    finally:
        for server in (sshd, closer, other):
            server.close()


def test_the_sshd_check_waits_for_the_address_ssh_will_use_and_is_none_through_a_proxy() -> None:
    """Before the public IP shows the check cannot tell (None), even with a private one there;
    with it, it tries that address. Through a proxy there is no check at all."""
    sshd, port = _greeter(b"SSH-2.0-test\r\n")
    described: dict[str, Any] = {}
    try:
        check = Reach().answering(port, lambda: described, public=True)
        assert check is not None and check() is None
        described.update(InstanceId="i-1", PrivateIpAddress="127.0.0.2")
        assert check() is None  # SSH goes to the public IP: the private one is never tried
        described["PublicIpAddress"] = "127.0.0.1"
        assert check() is True
        private = Reach(method="private").answering(port, lambda: {"PrivateIpAddress": "127.0.0.1"})
        assert private is not None and private() is True
        assert Reach(proxy_command="ssh -W %h:%p jump").answering(port, lambda: described) is None
    finally:
        sshd.close()
