"""Several network hosts on this one machine, for the multi-node launch tests: each host is a network namespace with
its own loopback, one interface on a private test subnet, its own hostname (UTS namespace) and its own /etc/hosts (a
private mount namespace with the harness's file bound over it), so that the hosts resolve each other by name. The
hosts are wired to a bridge that lives in a namespace of its own (the "switch"): nothing is added to the machine's
own network namespace, there is no route or NAT to anything outside, and the hosts' traffic stays between them.

    hosts = NetnsHosts(tmp, ["node1", "node2"]).start()
    hosts.popen(hosts[1], ["python", "-c", "..."])      # runs on node2: its network, hostname and /etc/hosts
    hosts.close()

A host is anchored by a holder process (`sleep`) that owns its UTS and mount namespaces; commands enter all three
namespaces with nsenter (`command()`), so anything started there (a daemon, a job, its children) is on that host.
The interface has the same name on every host (IFNAME), as a cluster's nodes usually share theirs, and a name no
host outside these namespaces has: a process that escaped to the machine's namespace and was told to use it fails.

Names and cleanup. Every namespace is a named one (`ip netns`, /run/netns/augssl-<pid>-<n>-<role>), named after the
test process that made it. `close()` kills the processes inside this harness's namespaces and deletes the
namespaces, which takes their interfaces and the bridge with them; `start()` first does the same for namespaces whose
test process is gone (a run killed before its teardown), never for those of a live process.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2/util-linux: `start()` raises HostsUnavailable otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.processes import running

PREFIX = "augssl"
IFNAME = "lan0"  # the hosts' interface, on every host
_counter = 0


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no CAP_SYS_ADMIN, no iproute2)."""


@dataclass
class Host:
    name: str
    addr: str
    netns: str
    port: str  # the bridge port (the veth end in the switch namespace)
    hosts_file: Path
    holder: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.holder is not None, f"host {self.name} is not started"
        return self.holder.pid


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except OSError as e:  # no iproute2
        raise HostsUnavailable(f"cannot run `ip`: {e}") from e
    if check and out.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


def netns_pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def _kill(pids: list[int], timeout: float = 10) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.05)


def remove_netns(netns: str) -> None:
    """Kill every process in `netns` and delete it (its interfaces go with it)."""
    for _ in range(3):  # a process may fork while the first ones are killed
        pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            break
        _kill(pids)
    _ip("netns", "del", netns, check=False)


def clean_leftovers() -> list[str]:
    """Delete the namespaces of earlier test runs whose process is gone (killed before its teardown)."""
    out = _ip("netns", "list", check=False)
    removed = []
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-\d+-\w+", name)
        if m and not running(int(m.group(1))):
            remove_netns(name)
            removed.append(name)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.254.255.0 that no route of this machine's namespace overlaps (the hosts have no route
    out, but a name in their /etc/hosts must never mean a machine on a real network)."""
    out = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=30)
    used = []
    for line in out.stdout.splitlines():
        words = line.split()
        if not words or words[0] == "default":
            continue
        if words[0] in ("unicast", "local", "broadcast", "multicast", "anycast", "unreachable", "blackhole",
                        "prohibit", "throw", "nat") and len(words) > 1:
            words = words[1:]
        try:
            used.append(ipaddress.ip_network(words[0], strict=False))
        except ValueError:
            continue
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise HostsUnavailable("no free 10.x /24 for the test hosts")


@dataclass
class NetnsHosts:
    """`names` hosts on one private /24; `own_name_on_loopback` writes each host's own name as 127.0.1.1 into its
    /etc/hosts, as Debian and Ubuntu do (the classic reason a rank advertises an address no other node can reach);
    otherwise a host's name is its address, as in a Kubernetes pod."""

    root: Path
    names: list[str]
    own_name_on_loopback: bool = False
    hosts: list[Host] = field(default_factory=list)
    extra_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        global _counter
        _counter += 1
        self.root = Path(self.root)
        self.tag = f"{PREFIX}-{os.getpid()}-{_counter}"
        self.switch = f"{self.tag}-sw"
        self.subnet: ipaddress.IPv4Network | None = None
        self._made: list[str] = []

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def by_name(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # ---------------------------------------------------------------------------------------------- life cycle
    def start(self) -> "NetnsHosts":
        if os.geteuid() != 0:
            raise HostsUnavailable("network namespaces need root")
        try:
            clean_leftovers()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self._netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            netns = f"{self.tag}-h{i + 1}"
            self._netns(netns)
            host = Host(name, str(addrs[i]), netns, f"p{i + 1}", self.root / f"{name}.hosts")
            self.hosts.append(host)
            # the pair is made in the switch; one end moves to the host and takes the hosts' common name there
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", f"h{i + 1}")
            _ip("-n", self.switch, "link", "set", f"h{i + 1}", "netns", netns)
            _ip("-n", netns, "link", "set", f"h{i + 1}", "name", IFNAME)
            _ip("-n", netns, "addr", "add", f"{host.addr}/{self.subnet.prefixlen}", "dev", IFNAME)
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", IFNAME, "up")
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
            _ip("-n", self.switch, "link", "set", host.port, "up")
        self.write_hosts_files()
        for host in self.hosts:
            self._hold(host)

    def _hold(self, host: Host) -> None:
        """The process that keeps the host's UTS and mount namespaces (its hostname and /etc/hosts)."""
        host.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--uts", "--mount", "--propagation", "private",
             "sh", "-c", 'hostname "$0" && mount --bind "$1" /etc/hosts && exec sleep 2147483647',
             host.name, str(host.hosts_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if host.holder.poll() is not None:
                raise HostsUnavailable(f"cannot make host {host.name}'s namespaces: "
                                       f"{host.holder.stderr.read().decode(errors='replace').strip()}")
            try:
                if Path(f"/proc/{host.pid}/comm").read_text().strip() == "sleep":
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise HostsUnavailable(f"host {host.name}'s holder did not start")

    def close(self) -> None:
        for host in self.hosts:
            if host.holder is not None and host.holder.poll() is None:
                host.holder.kill()
            if host.holder is not None:
                host.holder.wait()
        for netns in reversed(self._made):
            remove_netns(netns)
        self._made.clear()

    # ------------------------------------------------------------------------------------------------- names
    def write_hosts_files(self) -> None:
        """(Re)write every host's /etc/hosts: localhost, its own name, every other host and the extra names. The file
        is rewritten in place, so a running host sees the change through its bind mount."""
        for host in self.hosts:
            lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
            for other in self.hosts:
                if other is host and self.own_name_on_loopback:
                    lines.append(f"127.0.1.1 {other.name}")
                else:
                    lines.append(f"{other.addr} {other.name}")
            lines += [f"{addr} {name}" for name, addr in self.extra_names.items()]
            with open(host.hosts_file, "w") as f:  # same inode: the bind mount keeps pointing at it
                f.write("\n".join(lines) + "\n")

    def rename(self, host: Host, name: str) -> None:
        """Give `host` another hostname (a pod's hostname is its pod's name), in its UTS namespace and every
        /etc/hosts."""
        if host.name != name:
            out = subprocess.run(self.command(host, ["hostname", name], "/"), capture_output=True, text=True,
                                 timeout=30)
            if out.returncode != 0:
                raise RuntimeError(f"hostname {name} on {host.name}: {out.stderr.strip()}")
            host.name = name
            self.write_hosts_files()

    def add_names(self, names: dict[str, Host]) -> None:
        """Make each name resolve to its host's address on every host (what DNS or a Service would do)."""
        self.extra_names.update({name: host.addr for name, host in names.items()})
        self.write_hosts_files()

    # ------------------------------------------------------------------------------------------------ running
    def command(self, host: Host, argv: list[str], cwd: str | Path | None = None) -> list[str]:
        """`argv` as a command that runs on `host` (in `cwd`, default the caller's working directory)."""
        return ["nsenter", f"--target={host.pid}", "--net", "--uts", "--mount",
                f"--wd={Path(cwd or os.getcwd()).resolve()}", "--", *argv]

    def popen(self, host: Host, argv: list[str], cwd=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv, cwd), cwd=cwd, **kw)

    def run(self, host: Host, argv: list[str], cwd=None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv, cwd), cwd=cwd, **kw)

    def pids(self, host: Host) -> list[int]:
        """The processes running on `host` (its holder excluded)."""
        return [p for p in netns_pids(host.netns) if p != host.pid]

    def trainers(self, host: Host) -> list[int]:
        """The trainer processes (pipeline.train) running on `host`; torchrun, whose command line names
        pipeline.train too, is not one."""
        found = []
        for pid in self.pids(host):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pipeline.train" in argv and b"torch.distributed.run" not in argv:
                found.append(pid)
        return found

    # -------------------------------------------------------------------------------------------------- faults
    def unplug(self, host: Host) -> None:
        """Pull the host's cable: its bridge port goes down, so nothing it sends (not even a reset) reaches the others
        and nothing reaches it, as when a node loses power or its network."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def plug(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def kill_processes(self, host: Host) -> list[int]:
        """SIGKILL everything running on `host` (its holder stays, so the host can be used again)."""
        killed = []
        for _ in range(3):
            pids = self.pids(host)
            if not pids:
                break
            _kill(pids)
            killed += pids
        return killed


# ------------------------------------------------------------------------------------------ what processes see


def environ(pid: int) -> dict[str, str]:
    """The environment `pid` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def tcp_peers(pids: list[int]) -> set[tuple[str, str]]:
    """(local address, remote address) of the established IPv4 TCP connections these processes hold (IPv4-mapped
    IPv6 sockets included)."""
    inodes, table = set(), {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for name in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if f[3] != "01":  # ESTABLISHED
                    continue
                addrs = []
                for a in f[1:3]:
                    raw = bytes.fromhex(a.split(":")[0])
                    if len(raw) == 16:  # ::ffff:a.b.c.d, stored as four little-endian words
                        if raw[:12] != bytes(8) + b"\xff\xff\0\0":
                            break
                        raw = raw[12:]
                    addrs.append(socket.inet_ntoa(raw[::-1]))
                if len(addrs) == 2:
                    table[f[9]] = tuple(addrs)
    return {table[i] for i in inodes if i in table}
