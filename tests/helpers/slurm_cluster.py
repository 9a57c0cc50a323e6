"""A real Slurm cluster for the tests: Debian's munged, slurmctld and slurmd (22.05), started directly (no systemd)
with a private munge key and socket, private ports and a config in a temporary folder. Either one node on localhost,
or one node per host of a NetnsHosts (tests/helpers/netns_hosts.py): slurmctld on the first host, one slurmd on each
(NodeAddr = its address, its hostname the node's name), munged on the machine (its socket is a path, which every
host's processes reach), and the clients (sbatch, scontrol, ...) run on the first host, the login node.

`SlurmCluster(root[, hosts]).start()` brings it up and waits until its nodes are idle; `stop()` cancels what is still
queued, ends every process the cluster started (the daemons by the PIDs they were started with, leftover job
processes by the PID of each process whose environment names this cluster's slurm.conf) and never touches any other
Slurm or munge on the machine. The daemons' binaries come from `scripts/install_slurm.sh`.

The config is the minimum that works on 22.05 without cgroups or accounting: proctrack/linuxproc, task/none,
select/cons_tres over cores (memory is not a consumable resource here), no cgroup.conf, no accounting storage, and
EnforcePartLimits=ALL so a job that asks for more than the node has (GPUs, cores) is rejected at submission instead
of pending forever. cred_expire is short and the scheduler runs every 2 s, so a requeued job runs again after seconds,
not Slurm's default two minutes. With hosts, a node that stops answering is DOWN after SlurmdTimeout=10 s (Slurm's
default is 300 s), so a lost node is noticed, and its jobs requeued, within seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.netns_hosts import NetnsHosts

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolves_to_loopback(name: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") for info in socket.getaddrinfo(name, None, socket.AF_INET))
    except OSError:
        return False


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return int(total_kb / 1024 * 0.9)


@dataclass
class SlurmCluster:
    root: Path
    hosts: NetnsHosts | None = None
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    slurmd_timeout: int = 10  # seconds without an answer before the controller calls a host's node DOWN
    pids: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        if self.hosts is not None:
            self.controller = self.hosts[0].name
            self.nodes = [h.name for h in self.hosts]
        else:
            self.controller = socket.gethostname().split(".")[0]
            # the node's name is what `scontrol show hostnames` prints and so the rendezvous host of a job: keep it
            # on the loopback interface
            self.nodes = [self.controller if _resolves_to_loopback(self.controller) else "localhost"]
        self.node = self.nodes[0]

    def _on(self, argv: list[str], node: str | None = None, cwd=None) -> list[str]:
        """`argv` on `node` (default: the first, where the controller and the clients run)."""
        if self.hosts is None:
            return list(argv)
        return self.hosts.command(self.hosts.by_name(node or self.nodes[0]), list(argv), cwd)

    # ----------------------------------------------------------------------------------------------- environment
    def env(self, base: dict | None = None, **extra) -> dict:
        """An environment for Slurm's clients (and so for the jobs, which inherit it) that talks to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for var in [k for k in env if k.startswith(("SBATCH_", "SRUN_", "SALLOC_"))
                    or (k.startswith("SLURM_") and k != "SLURM_CONF")]:
            del env[var]  # a test run inside someone's Slurm job must not leak that job's settings
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *args, check=True, timeout=60, node=None, **kw) -> subprocess.CompletedProcess:
        """A command on `node` (default the first one; on localhost, here), with this cluster's environment."""
        return subprocess.run(self._on(list(args), node, kw.get("cwd")), env=kw.pop("env", None) or self.env(),
                              capture_output=True, text=True, check=check, timeout=timeout, **kw)

    # ------------------------------------------------------------------------------------------------ life cycle
    def _write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants its socket's folder traversable
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.socket"
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        r = self.root
        if self.hosts is None:
            ctld_addr, addrs = "127.0.0.1", {self.node: "127.0.0.1"}
            per_node, timeouts = "", "SlurmdTimeout=30\nMessageTimeout=30"
        else:
            ctld_addr, addrs = self.hosts[0].addr, {h.name: h.addr for h in self.hosts}
            per_node = "-%n"  # one slurmd per host on one file system: each its own spool, pid file and log
            # a node that stops answering is DOWN after SlurmdTimeout (its jobs requeued); a message to it gives up
            # after MessageTimeout
            timeouts = f"SlurmdTimeout={self.slurmd_timeout}\nMessageTimeout=10"
        nodes = "".join(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory={_mem_mb()} State=UNKNOWN\n"
                        for name, addr in addrs.items())
        self.conf.write_text(f"""\
ClusterName=augssltest
SlurmctldHost={self.controller}({ctld_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool{per_node}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd{per_node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
{timeouts}
InactiveLimit=0
KillWait=30
MinJobAge=600
{nodes}PartitionName=debug Nodes={",".join(addrs)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, argv: list[str], pid_file: Path, node: str | None = None,
                machine: bool = False) -> None:
        """Start a self-daemonizing daemon on `node` (on the machine itself with `machine`) and record its PID from
        its pid file."""
        if pid_file.exists():
            pid_file.unlink()
        cmd = list(argv) if machine else self._on(argv, node)
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not start (exit {out.returncode}): {out.stdout}{out.stderr}\n"
                           f"{self.logs()}")

    def start_slurmd(self, node: str) -> None:
        """Start `node`'s slurmd (again, after the node was lost: ReturnToService=2 brings it back)."""
        if self.hosts is None:
            self._daemon("slurmd", ["slurmd", "-f", str(self.conf), "-N", node], self.root / "slurmd.pid")
        else:  # the node's name is its host's hostname, as on a real cluster
            self._daemon(f"slurmd@{node}", ["slurmd", "-f", str(self.conf)], self.root / f"slurmd-{node}.pid", node)

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return dict(line.split(None, 1) for line in out.stdout.strip().splitlines() if " " in line)

    def wait_nodes(self, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Until every node is in one of `states` (e.g. {"idle"})."""
        deadline = time.monotonic() + timeout
        found = {}
        while time.monotonic() < deadline:
            found = self.node_states()
            if sorted(found) == sorted(self.nodes) and all(v in states for v in found.values()):
                return found
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes are not {states} after {timeout}s ({found})\n{self.logs()}")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        r = self.root
        self._daemon("munged", ["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={r}/munge.key",
                                f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log",
                                f"--seed-file={r}/munged.seed"], r / "munged.pid", machine=True)
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf)], r / "slurmctld.pid")
        for node in self.nodes:
            self.start_slurmd(node)
        self.wait_nodes({"idle"}, timeout)
        return self

    def _own_processes(self) -> list[int]:
        """PIDs of processes started by this cluster's jobs: their environment names this cluster's slurm.conf."""
        needle = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read() + b"\0":
                        found.append(int(entry))
            except OSError:
                continue
        daemons = set(self.pids.values())
        return [p for p in found if p not in daemons and self._ppid(p) not in daemons]  # not slurmscriptd

    @staticmethod
    def _ppid(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie is dead for our purposes
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def _kill(self, pids: list[int], timeout: float = 15) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(self._alive(p) for p in pids):
                time.sleep(0.2)
            if not any(self._alive(p) for p in pids):
                return

    def stop(self) -> None:
        if "slurmctld" in self.pids and self._alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--user=root", check=False, timeout=30)  # every job of this cluster
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if not self.run("squeue", "-h", "-t", "PD,R,CG,RQ,S,RS", check=False).stdout.strip():
                    break
                time.sleep(0.5)
        leftovers = self._own_processes()
        if leftovers:
            self._kill(leftovers, timeout=10)
        for name in [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            pid = self.pids.pop(name, None)
            if pid is not None:
                self._kill([pid])
        leftovers = self._own_processes()  # slurmstepd and anything a job forked after the first sweep
        if leftovers:
            self._kill(leftovers, timeout=5)

    def logs(self) -> str:
        parts = []
        slurmd = ["slurmd.log"] if self.hosts is None else [f"slurmd-{n}.log" for n in self.nodes]
        for name in ["slurmctld.log", *slurmd, "munged.log"]:
            path = self.log_dir / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------------------------- jobs
    def sbatch(self, script, *args, sbatch_args=(), wait=False, env=None, timeout=600, cwd=None) -> tuple[int, str]:
        """Submit `script` with `args` for it; returns (job id, sbatch's output). With wait, sbatch --wait."""
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *sbatch_args, str(script), *args]
        out = subprocess.run(self._on(cmd, cwd=cwd), env=env or self.env(), capture_output=True, text=True,
                             timeout=timeout, cwd=cwd)
        m = re.match(r"(\d+)", out.stdout.strip())
        if not m:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stdout}{out.stderr}")
        return int(m.group(1)), out.stdout + out.stderr

    def job(self, job_id) -> dict:
        """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten.
        An array job gives its first task's record."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
        return dict(re.findall(r"(\S+?)=(\S*)", line))

    def jobs(self, job_id) -> list[dict]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.stdout.strip().splitlines() if line]

    def wait_state(self, job_id, states, timeout=300) -> dict:
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")
