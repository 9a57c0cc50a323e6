"""The test hosts of tests/helpers/netns_hosts.py, on which the multi-node launch tests run: names, isolation,
teardown, and the trap they reproduce (a hostname on 127.0.1.1 without GLOO_SOCKET_IFNAME). Needs root; fails under
CI=... when network namespaces cannot be made, skips elsewhere."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest

from tests.helpers.netns_hosts import IFNAME, PREFIX, HostsUnavailable, NetnsHosts, clean_leftovers


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.split()}


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


@pytest.fixture
def hosts(tmp_path):
    try:
        h = NetnsHosts(tmp_path, ["node1", "node2", "node3"], own_name_on_loopback=True).start()
    except HostsUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make the test hosts: {e} (CI is set: this test must run)")
        pytest.skip(f"network namespaces cannot be made here: {e}")
    try:
        yield h
    finally:
        h.close()


PROBE = """
import socket, sys
names = sys.argv[1:]
print(socket.gethostname(), *[socket.gethostbyname(n) for n in names])
s = socket.socket(); s.settimeout(2)
try:
    s.connect((sys.argv[-1], 9)); print("reached")
except OSError as e:
    print(type(e).__name__)
"""


def test_hosts_have_their_own_names_addresses_and_nothing_else(hosts):
    """Each host: its hostname, its own name on 127.0.1.1 (as on Debian), the others' names on their addresses, its
    interface up with its address, no route but its subnet (the machine's address is unreachable), and nothing added
    to the machine's own network namespace."""
    node1, node2, node3 = hosts
    before = _links()
    machine_addr = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for host in hosts:
        out = hosts.run(host, [sys.executable, "-c", PROBE, "node1", "node2", "node3", "localhost",
                               machine_addr[0] if machine_addr else "192.0.2.1"],
                        capture_output=True, text=True, timeout=30).stdout.split()
        own = {h.name: ("127.0.1.1" if h is host else h.addr) for h in hosts}
        assert out[:5] == [host.name, own["node1"], own["node2"], own["node3"], "127.0.0.1"], out
        assert out[-1] == "OSError" or out[-1] in ("ConnectionRefusedError", "TimeoutError"), out
        assert out[-1] != "reached"
        route = hosts.run(host, ["ip", "-4", "route"], capture_output=True, text=True).stdout.strip().splitlines()
        assert route == [f"{hosts.subnet} dev {IFNAME} proto kernel scope link src {host.addr}"], route
    machine_routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout.split()
    for word in machine_routes:
        try:
            net = ipaddress.ip_network(word, strict=False)
        except ValueError:
            continue
        assert net.prefixlen == 0 or not net.overlaps(hosts.subnet), (net, hosts.subnet)
    assert _links() == before


GLOO_PAIR = """
import datetime, os, sys, time, torch, torch.distributed as dist
rank, timeout, ready = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
open(f"{ready}.{rank}", "w").close()
while not all(os.path.exists(f"{ready}.{r}") for r in (0, 1)):  # both imported torch: start together
    time.sleep(0.01)
try:
    dist.init_process_group("gloo", init_method="tcp://node1:29555", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout))
    t = torch.ones(1)
    dist.all_reduce(t)
    print("ok", t.item())
except Exception as e:
    print("failed:", " ".join(str(e).split()))
sys.stdout.flush()
os._exit(0)  # skip the teardown: a gloo thread still joinable there aborts now and then ("terminate called without
#              an active exception", after "ok" was printed; one CI run of about ten), as in tests/engine/test_lars.py
"""


def test_gloo_across_hosts_needs_the_interface_named(hosts, tmp_path):
    """Two ranks, one on node1 and one on node2, rendezvous on node1 by name. With GLOO_SOCKET_IFNAME naming the
    hosts' interface they all-reduce; without it each announces the address its hostname resolves to, 127.0.1.1,
    and the rank that connects cannot reach the other's: the trap the Slurm tests' hosts set on purpose."""
    for ifname, timeout in ((IFNAME, 60), (None, 2)):
        env = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
        ready = tmp_path / f"ready-{ifname}"
        ranks = [hosts.popen(hosts[i], [sys.executable, "-c", GLOO_PAIR, str(i), str(timeout), str(ready)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
        outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in ranks]
        if ifname:
            assert outs == ["ok 2.0", "ok 2.0"], outs
        else:
            assert all(o.startswith("failed:") for o in outs), outs
            # the rank that connects (gloo picks which) tried the other host's loopback address
            assert any("remote=[127.0.1.1]" in o for o in outs), outs


def test_close_removes_what_it_made_and_start_removes_dead_runs_leftovers(tmp_path):
    try:
        hosts = NetnsHosts(tmp_path / "a", ["node1", "node2"]).start()
    except HostsUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make the test hosts: {e} (CI is set: this test must run)")
        pytest.skip(f"network namespaces cannot be made here: {e}")
    made = {h.netns for h in hosts} | {hosts.switch}
    assert made <= _netns()
    sleeper = hosts.popen(hosts[1], ["sleep", "60"])
    deadline = time.monotonic() + 10
    while not hosts.pids(hosts[1]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hosts.pids(hosts[1]) == [sleeper.pid]  # nsenter execs the command
    hosts.close()
    assert sleeper.wait(timeout=10) == -9  # processes on a host go with it
    assert not made & _netns()
    # a killed run's leftovers (its process is gone) are removed by the next start; a live run's are not
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = f"{PREFIX}-{gone.pid}-1-sw", f"{PREFIX}-{os.getpid()}-999-sw"
    for name in (dead, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert dead in clean_leftovers() or dead not in _netns()
        assert dead not in _netns() and live in _netns()
    finally:
        subprocess.run(["ip", "netns", "del", live])
        subprocess.run(["ip", "netns", "del", dead], capture_output=True)
