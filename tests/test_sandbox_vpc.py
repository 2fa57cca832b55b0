"""Private networks in the sandbox: real VPC addresses, public ones only where EC2 gives them, a bastion.

The machines of one module are shared (a boot is a few seconds): a VPC with a private and a
public subnet, a bastion in the public one, an instance in the private one, and an instance
of a second VPC with the same CIDR. No test sends a packet beyond the host: the host's own
view of a private address is checked through its interfaces and routes (a connection attempt
would leave through its default route), and the other VPC's instance tries an address that is
on its own link, where nothing but its own bridge can answer.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.sandbox import control
from builder.sandbox.machine import Machine
from tests.sandbox import (
    BASE_AMI,
    Bastion,
    PrivateInstance,
    World,
    bastion,
    launch_private,
    private_network,
    ssh_via,
    wait_until,
)

CIDR = "10.20.0.0/16"


@dataclass(frozen=True)
class Net:
    private_subnet: str
    public_subnet: str
    bastion: Bastion
    target: PrivateInstance
    work: Path
    host_links: frozenset[str]


def _host_links() -> frozenset[str]:
    done = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    return frozenset(link["ifname"] for link in json.loads(done.stdout))


def _host_addresses() -> list[ipaddress.IPv4Interface]:
    done = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True)
    return [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for link in json.loads(done.stdout)
        for a in link.get("addr_info", [])
    ]


def _route_device(address: str) -> str | None:
    """Return the host interface the kernel would send ``address`` out of (None: no route at all)."""
    done = subprocess.run(["ip", "-j", "route", "get", address], capture_output=True, text=True, check=False)
    return str(json.loads(done.stdout)[0]["dev"]) if done.returncode == 0 else None


def _machine(world: World, instance_id: str) -> Machine:
    return Machine(instance_id, world.state / "data" / "machines" / instance_id)


def _tcp_open(world: World, instance_id: str, address: str, port: int = 22) -> bool:
    """Return whether a TCP connection from inside ``instance_id`` to ``address``:``port`` succeeds."""
    probe = f"timeout 4 bash -c 'exec 3<>/dev/tcp/{address}/{port}'"
    return _machine(world, instance_id).exec("bash", "-c", probe, check=False).returncode == 0


def _listeners(pid: int) -> list[str]:
    done = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if f"pid={pid}," in line]


@pytest.fixture(scope="module")
def net(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    links = _host_links()
    private_subnet, public_subnet = private_network(world.client(), CIDR)
    work = tmp_path_factory.mktemp("vpc")
    jump = bastion(world, public_subnet, work)
    target = launch_private(world, private_subnet)
    yield Net(private_subnet, public_subnet, jump, target, work, links)


def test_an_instance_in_a_private_subnet_has_only_its_private_address(world: World, net: Net) -> None:
    described = world.describe(net.target.id)
    assert "PublicIpAddress" not in described
    assert ipaddress.ip_address(described["PrivateIpAddress"]) in ipaddress.ip_network("10.20.1.0/24")
    # No host forward at all: its slirp4netns listens on nothing; the bastion's listens on 22.
    slirp = int((_machine(world, net.target.id).state / "slirp.pid").read_text())
    assert _listeners(slirp) == []
    bastion_slirp = int((_machine(world, net.bastion.id).state / "slirp.pid").read_text())
    assert any(f"{net.bastion.address}:22 " in line for line in _listeners(bastion_slirp))
    # Inside, the address is on its interface, as on an instance.
    inside = _machine(world, net.target.id).exec("ip", "-4", "-o", "addr", "show", "ens5").stdout
    assert f"inet {net.target.address}/24 " in inside


def test_the_public_subnets_bastion_has_both_addresses(world: World, net: Net) -> None:
    described = world.describe(net.bastion.id)
    assert described["PublicIpAddress"] == net.bastion.address
    assert ipaddress.ip_address(described["PrivateIpAddress"]) in ipaddress.ip_network("10.20.0.0/24")
    assert described["PrivateIpAddress"] != described["PublicIpAddress"]


def test_the_host_has_no_way_to_the_private_address(world: World, net: Net) -> None:
    vpc = ipaddress.ip_network(CIDR)
    assert not [a for a in _host_addresses() if a.ip in vpc or a.network.overlaps(vpc)]
    # The kernel would send the private address where it sends any address of the internet:
    # nothing of the sandbox is on the host's way there.
    assert _route_device(net.target.address) == _route_device("192.0.2.1")
    assert _host_links() == net.host_links


def test_ssh_through_the_bastion_with_pinned_host_keys(world: World, net: Net) -> None:
    done = ssh_via(net.bastion, net.target, "hostname; cat /etc/hostname; ip -4 -o addr show ens5", net.work)
    assert done.returncode == 0, done.stderr + world.explain(net.bastion.id, net.target.id)
    lines = done.stdout.splitlines()
    assert lines[:2] == [net.target.id, net.target.id]
    assert f"inet {net.target.address}/24" in lines[2]


def test_a_bastion_whose_host_key_is_not_the_pinned_one_is_refused(world: World, net: Net, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{net.bastion.address} {net.target.host_key.public_line}\n")
    impostor = Bastion(net.bastion.id, net.bastion.address, net.bastion.user, net.bastion.key_file, wrong)
    done = ssh_via(impostor, net.target, "hostname", net.work, deadline=0)
    assert done.returncode == 255 and "Host key verification failed" in done.stderr, done.stderr
    assert net.target.id not in done.stdout


def test_two_vpcs_with_the_same_cidr_are_isolated(world: World, net: Net) -> None:
    ec2 = world.client()
    other_private, _ = private_network(ec2, CIDR)
    # The same addresses exist in both VPCs; pick one that is only net.target's.
    taken = ipaddress.ip_address(net.target.address)
    other = launch_private(world, other_private, PrivateIpAddress=str(taken + 1))
    try:
        assert other.address == str(taken + 1)
        assert _tcp_open(world, net.bastion.id, net.target.address)  # same VPC: reached
        assert not _tcp_open(world, other.id, net.target.address)  # other VPC: on its link, nobody there
        assert not _tcp_open(world, net.bastion.id, other.address)
    finally:
        ec2.terminate_instances(InstanceIds=[other.id])
    assert len(world.status()["networks"]) == 1


def test_association_refused_and_default_vpc_public(world: World, net: Net) -> None:
    """AssociatePublicIpAddress decides over the subnet: false in a default subnet, true in a private one."""
    ec2 = world.client()
    default_subnet = ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"][0]
    launched: list[str] = []
    try:
        for subnet, associate in ((default_subnet["SubnetId"], False), (net.private_subnet, True)):
            reply = ec2.run_instances(
                ImageId=BASE_AMI,
                MinCount=1,
                MaxCount=1,
                InstanceType="t3.micro",
                NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": associate}],
            )
            launched.append(reply["Instances"][0]["InstanceId"])
        quiet, public = (world.describe(i) for i in launched)
        assert "PublicIpAddress" not in quiet and quiet["PrivateIpAddress"].startswith("172.31.")
        assert public["PublicIpAddress"].startswith("127.77.")
        assert ipaddress.ip_address(public["PrivateIpAddress"]) in ipaddress.ip_network("10.20.1.0/24")
    finally:
        if launched:
            ec2.terminate_instances(InstanceIds=launched)


def test_sandbox_stop_and_start_bring_the_same_addresses_back(world: World, net: Net) -> None:
    before = {i: world.describe(i) for i in (net.bastion.id, net.target.id)}
    assert control.stop(world.state)
    stopped = control.status(world.state)
    assert stopped["machines"] == [] and stopped["networks"] == []
    world.endpoint = control.start(world.state).endpoint
    for instance_id, was in before.items():
        now = world.describe(instance_id)
        assert now["State"]["Name"] == "running"
        assert now["PrivateIpAddress"] == was["PrivateIpAddress"]
        assert now.get("PublicIpAddress") == was.get("PublicIpAddress")
    done = ssh_via(net.bastion, net.target, "hostname", net.work)
    assert done.returncode == 0 and done.stdout.strip() == net.target.id, done.stderr


def test_nothing_is_left_after_terminate(world: World, net: Net) -> None:
    [netns] = world.status()["networks"]
    inode = Path(f"/run/netns/{netns}").stat().st_ino
    world.client().terminate_instances(InstanceIds=[net.bastion.id, net.target.id])
    wait_until(lambda: not world.status()["machines"], 60, "machines gone")
    status = world.status()
    assert status["networks"] == []
    assert not Path(f"/run/netns/{netns}").exists()
    assert _host_links() == net.host_links
    # Not even held open by a process or a mount of another namespace: the bridge is gone.
    wait_until(lambda: not _holders(inode), 10, f"no holder of the VPC namespace {inode}")


def _holders(inode: int) -> list[str]:
    """Return the processes whose network namespace, or one of whose mounts, is namespace ``inode``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "ns/net").stat().st_ino == inode or f"net:[{inode}]" in (proc / "mountinfo").read_text():
                found.append(proc.name)
        except OSError:
            continue
    return found
