"""Each Kubernetes job of k8s/, run locally the way the cluster would run it: the manifests are rendered by kustomize
(with a small CPU overlay on top, as a user's overlay would be: 1 process per pod, the digits shards, a tiny ResNet,
a few steps), and for each replica the container's command is started with exactly the environment its pod gets:
the ConfigMap (envFrom), the env list with Kubernetes' $(VAR) expansion and downward-API values, plus what the
controller injects (the training-operator's MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/PET_* for PyTorchJob replicas, the
completion index for Indexed Job pods). Two replicas on the CPU must train together.

Each pod runs on a host of its own (tests/helpers/netns_hosts.py, as root): a network namespace with its own address
on a private subnet, the pod's name as its hostname, and an /etc/hosts where the names the cluster's DNS would serve
(<job>-master-0, the operator's Service of the Master; <job>-0.<service>, pod 0 behind the headless Service) resolve
to the address of the host of the pod they name, and the pod's own hostname to its own address, as the kubelet
writes it. The pods' GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME come from the ConfigMap (k8s/base/params.env), which
the CPU overlay points at the hosts' interface, so a wrong value there fails the run. The PyTorchJob and the
Indexed Job need the hosts (they fail under CI without them, and skip elsewhere); the other cases run without them
too, in one private network namespace with only a loopback interface (or none) and the DNS names on 127.0.0.1.

The container paths /opt/augssl (the image's checkout) and the entrypoint map to this checkout; /tmp is the local
/tmp. Test-harness additions: PATH (this venv), OMP_NUM_THREADS=1, TMPDIR (a folder of each pod's own, as a container's
/tmp is, for the temporary files its programs make) and, without the hosts, GLOO_SOCKET_IFNAME=lo.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.k8s_tools import (
    K8S,
    K8S_VERSIONS,
    REPO,
    by_kind,
    config_maps,
    container_argv,
    container_env,
    dump,
    kustomize,
    relative,
    require_k8s_tools,
    validation_errors,
)
from tests.helpers.netns_hosts import IFNAME, HostsUnavailable, NetnsHosts, environ, tcp_peers
from tests.helpers.processes import descendants

pytestmark = pytest.mark.slow


require_k8s_tools()

CPU_ARGS = ["data=digits", "backbone=resnet_small", "deepspeed=zero0", "data.loader.device=cpu", "data.batch_size=16",
            "data.loader.num_threads=1", "data.loader.read_workers=1", "logger.progress_bar=false",
            "logger.log_every_steps=1", "monitor.knn_every_epochs=0"]
RUN_TIMEOUT = 300


def jit_cache() -> str:
    """Where this test run's processes keep DeepSpeed's JIT-built ops (torch's default when TORCH_EXTENSIONS_DIR is
    unset). On the CPU, DeepSpeed's init_distributed builds a C++ op; a pod builds it into its own empty /tmp (and on
    GPUs never builds it). The CPU overlay below points the pods at this cache so the suite compiles it once."""
    import torch
    import torch.utils.cpp_extension as cpp

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    flavour = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    return os.path.join(cpp.get_default_build_root(),
                        f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{flavour}")


def env_patch(resources_base: Path, container_path: str, name: str, value: str) -> dict:
    """A JSON patch op replacing the value of env var `name` in the container at `container_path` of `base`."""
    container = kustomize(resources_base)
    doc = next(r for r in container if r["kind"] in ("PyTorchJob", "Job"))
    node = doc
    for part in container_path.strip("/").split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    index = next(i for i, e in enumerate(node["env"]) if e["name"] == name)
    return {"op": "replace", "path": f"{container_path}/env/{index}", "value": {"name": name, "value": value}}


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    """What the image puts on PATH: augssl-entrypoint (docker/entrypoint.sh) and the venv's python and torchrun."""
    d = tmp_path_factory.mktemp("bin")
    (d / "augssl-entrypoint").symlink_to(REPO / "docker" / "entrypoint.sh")
    return d


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


CAN_UNSHARE = _can_unshare()


# ------------------------------------------------------------------------------------------------ the "cluster"


class Cluster:
    """The pods of one job on this machine. With `hosts`, each pod runs on its own host (its replica's rank: the
    Master or pod 0 on the first). Otherwise, where possible (root), they share a private network namespace with
    only a loopback interface. Either way the fixed ports of the manifests (23456, 29500) cannot collide with anything
    else on the machine, and nothing leaves it. Every process started for it carries a marker in its environment, so
    `close()` ends exactly those (by PID), orphans included."""

    def __init__(self, root: Path, hosts: NetnsHosts | None = None):
        self.root, self.replicas, self.hosts = root, [], hosts
        self.ifname = IFNAME if hosts is not None else "lo"  # what the CPU overlay puts into the ConfigMap
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        self.holder = None
        if CAN_UNSHARE and hosts is None:
            holder = subprocess.Popen(["unshare", "--net", "sleep", "3600"], stdin=subprocess.DEVNULL)
            netns = f"/proc/{holder.pid}/ns/net"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until unshare has exec'd sleep inside the new namespace
                if os.path.exists(netns) and os.readlink(netns) != os.readlink("/proc/self/ns/net"):
                    break
                time.sleep(0.05)
            up = subprocess.run(["nsenter", f"--net={netns}", "ip", "link", "set", "lo", "up"], capture_output=True)
            if up.returncode == 0:
                self.holder = holder
            else:
                holder.kill()
                holder.wait()

    def start(self, name: str, argv: list[str], env: dict[str, str], workdir: Path, hosts: list[str],
              bin_dir: Path, host: int = 0) -> "Replica":
        """Start pod `name`; the DNS names `hosts` resolve to the first pod's address (the rendezvous pod's); with
        hosts, the pod runs on host number `host`."""
        replica = Replica(self, name, argv, env, workdir, hosts, bin_dir, host)
        self.replicas.append(replica)
        return replica

    def require_hosts(self) -> NetnsHosts:
        if self.hosts is None:
            why = f"a pod per host needs network namespaces ({self.no_hosts})"
            if os.environ.get("CI"):
                pytest.fail(f"{why} (CI is set: this test must run)")
            pytest.skip(why)
        return self.hosts

    def _own_processes(self) -> list[int]:
        needle = f"AUGSSL_TEST_CLUSTER={self.marker}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if needle in f.read().split(b"\0"):
                            found.append(int(entry))
                except OSError:
                    pass
        return found

    def close(self) -> None:
        for r in self.replicas:
            r.log.close()
        for pid in self._own_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.kill()
            r.proc.wait()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


class Replica:
    """One pod's container, started as a local process."""

    def __init__(self, cluster: Cluster, name: str, argv: list[str], env: dict[str, str], workdir: Path,
                 hosts: list[str], bin_dir: Path, host: int = 0):
        self.name, self.argv, self.env = name, argv, env
        self.log_path = cluster.root / f"{name}.log"
        while self.log_path.exists():  # a second attempt of the same pod
            self.log_path = self.log_path.with_name(self.log_path.stem + "+.log")
        tmp = self.log_path.with_suffix(".tmp")  # the container's own /tmp
        tmp.mkdir()
        full_env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
                    "OMP_NUM_THREADS": "1", "AUGSSL_TEST_CLUSTER": cluster.marker, "TMPDIR": str(tmp),
                    **({"GLOO_SOCKET_IFNAME": "lo"} if cluster.hosts is None else {}), **env}
        cmd = list(argv)
        self.host = None
        if cluster.hosts is not None:  # the pod's own host: its name as hostname, the job's names on pod 0's host
            self.host = cluster.hosts[host]
            cluster.hosts.rename(self.host, name)
            cluster.hosts.add_names({h: cluster.hosts[0] for h in hosts})
            cmd = cluster.hosts.command(self.host, cmd, workdir)
        elif hosts and CAN_UNSHARE:
            hosts_file = self.log_path.with_suffix(".hosts")
            # as in a pod: localhost, the pod's own hostname (here the machine's), and the names of the job's pods
            hosts_file.write_text(f"127.0.0.1 localhost\n127.0.0.1 {socket.gethostname()}\n"
                                  + "".join(f"127.0.0.1 {h}\n" for h in hosts))
            cmd = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                   str(hosts_file), *argv]
        elif hosts:  # no private /etc/hosts: the names become the address they would resolve to
            full_env = {k: _replace_hosts(v, hosts) for k, v in full_env.items()}
            cmd = [_replace_hosts(a, hosts) for a in argv]
        if cluster.holder is not None:
            cmd = ["nsenter", f"--net=/proc/{cluster.holder.pid}/ns/net", *cmd]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def entrypoint_pid(self) -> int:
        """The PID of the container's PID 1 (augssl-entrypoint), which Kubernetes signals on pod deletion: nsenter,
        unshare and sh exec it, so it is the process started here."""
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def _replace_hosts(value: str, hosts: list[str]) -> str:
    for h in sorted(hosts, key=len, reverse=True):
        value = value.replace(h, "127.0.0.1")
    return value


def _cluster(tmp_path: Path, host_names: list[str]):
    logs = tmp_path / "logs"
    logs.mkdir()
    hosts, why = None, "no hosts asked for"
    if host_names:
        try:
            hosts = NetnsHosts(tmp_path / "hosts", host_names).start()
        except HostsUnavailable as e:
            why = str(e)
    c = Cluster(logs, hosts)
    c.no_hosts = why
    try:
        yield c
    finally:
        c.close()
        if hosts is not None:
            hosts.close()


@pytest.fixture
def cluster(tmp_path):
    """The pods' "cluster": two hosts where network namespaces can be made (as root), one namespace otherwise."""
    yield from _cluster(tmp_path, ["pod-0", "pod-1"])


@pytest.fixture
def one_namespace(tmp_path):
    """The pods' "cluster" as one private network namespace, no hosts: for the elastic job, whose pods (up to 3) come
    and go, and whose rendezvous store is served by whichever agent binds its port first."""
    yield from _cluster(tmp_path, [])


def run_all(replicas: list[Replica], timeout: float = RUN_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for r in replicas:
            codes.append(r.wait(max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail("replicas did not finish in time:\n" + "\n".join(f"--- {r.name}\n{r.output()[-3000:]}"
                                                                     for r in replicas))
    return codes


def _workdir(container: dict) -> Path:
    assert container["workingDir"] == "/opt/augssl"  # the image's checkout: this one
    return REPO


def pytorchjob_replicas(cluster: Cluster, resources: list[dict], bin_dir: Path, secrets=None,
                        workers: range | None = None) -> list[Replica]:
    """Start every replica of the PyTorchJob in `resources` as the training-operator (v1.8) would configure it (of
    the Workers only those in `workers`, if given: the pods it creates when a job grows)."""
    job = by_kind(resources, "PyTorchJob")[0]
    name, spec = job["metadata"]["name"], job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in specs.values())
    nproc = spec.get("nprocPerNode", "1")
    elastic = spec.get("elasticPolicy")
    maps = config_maps(resources)
    replicas, hosts = [], []
    if "Master" in specs:
        hosts.append(f"{name}-master-0")
    if elastic:
        hosts.append(f"{name}-worker-0")
    for rtype in ("Master", "Worker"):
        if rtype not in specs:
            continue
        for index in range(specs[rtype]["replicas"]):
            if rtype == "Worker" and workers is not None and index not in workers:
                continue
            pod = specs[rtype]["template"]
            c = next(c for c in pod["spec"]["containers"] if c["name"] == "pytorch")
            rank = index + (1 if rtype == "Worker" else 0)
            injected = [("PYTHONUNBUFFERED", "0")]
            if "Master" in specs:
                master_c = next(c for c in specs["Master"]["template"]["spec"]["containers"] if c["name"] == "pytorch")
                port = str(next(p["containerPort"] for p in master_c["ports"] if p["name"] == "pytorchjob-port"))
                injected += [("MASTER_PORT", port), ("MASTER_ADDR", f"{name}-master-0"),
                             ("PET_MASTER_PORT", port), ("PET_MASTER_ADDR", f"{name}-master-0"),
                             ("WORLD_SIZE", str(total * int(nproc) if nproc.isdigit() else total)),
                             ("RANK", str(rank)), ("PET_NPROC_PER_NODE", nproc), ("PET_NODE_RANK", str(rank))]
            if elastic:
                worker_c = next(c for c in specs["Worker"]["template"]["spec"]["containers"] if c["name"] == "pytorch")
                port = elastic.get("rdzvPort") or next(p["containerPort"] for p in worker_c["ports"]
                                                       if p["name"] == "pytorchjob-port")
                injected += [("PET_RDZV_ENDPOINT", f"{elastic.get('rdzvHost', name + '-worker-0')}:{port}"),
                             ("PET_RDZV_BACKEND", elastic.get("rdzvBackend", "c10d")),
                             ("PET_NNODES", f"{elastic['minReplicas']}:{elastic['maxReplicas']}")]
                if "maxRestarts" in elastic:
                    injected.append(("PET_MAX_RESTARTS", str(elastic["maxRestarts"])))
                if "nProcPerNode" in elastic:
                    injected.append(("PET_NPROC_PER_NODE", str(elastic["nProcPerNode"])))
                if "rdzvConf" in elastic:
                    injected.append(("PET_RDZV_CONF", ",".join(f"{c['key']}={c['value']}"
                                                               for c in elastic["rdzvConf"])))
            else:
                injected.append(("PET_NNODES", str(total)))
            labels = {**pod["metadata"].get("labels", {}), "training.kubeflow.org/job-name": name,
                      "training.kubeflow.org/replica-type": rtype.lower(),
                      "training.kubeflow.org/replica-index": str(index),
                      "training.kubeflow.org/operator-name": "pytorchjob-controller"}
            env = container_env(c, config_maps=maps, secrets=secrets or {}, labels=labels,
                                annotations=pod["metadata"].get("annotations", {}), injected=injected)
            replicas.append(cluster.start(f"{name}-{rtype.lower()}-{index}", container_argv(c, env), env,
                                          _workdir(c), hosts, bin_dir, host=len(replicas)))
    return replicas


def indexed_job_pods(cluster: Cluster, resources: list[dict], job_kind_component: str,
                     bin_dir: Path) -> list[Replica]:
    """Start every pod of the Indexed Job (label component=`job_kind_component`) as the Job controller would."""
    job = next(j for j in by_kind(resources, "Job")
               if j["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == job_kind_component)
    name, spec = job["metadata"]["name"], job["spec"]
    pod = spec["template"]
    subdomain = pod["spec"].get("subdomain")
    hosts = [f"{name}-0.{subdomain}", f"{name}-0.{subdomain}.default.svc.cluster.local"] if subdomain else []
    maps = config_maps(resources)
    pods = []
    for index in range(spec["completions"]):
        c = pod["spec"]["containers"][0]
        labels = {**pod["metadata"].get("labels", {}), "batch.kubernetes.io/job-name": name, "job-name": name,
                  "batch.kubernetes.io/job-completion-index": str(index)}
        annotations = {**pod["metadata"].get("annotations", {}), "batch.kubernetes.io/job-completion-index": str(index)}
        env = container_env(c, config_maps=maps, secrets={}, labels=labels, annotations=annotations,
                            injected=[("JOB_COMPLETION_INDEX", str(index))])
        pods.append(cluster.start(f"{name}-{index}", container_argv(c, env), env, _workdir(c), hosts, bin_dir,
                                  host=index))
    return pods


def cpu_overlay(tmp_path: Path, base: Path, literals: list[str], patches: list[dict]) -> list[dict]:
    """A user's overlay on `base` for this CPU: the ConfigMap merged with `literals`, JSON patches; rendered and
    validated like every manifest."""
    folder = tmp_path / "overlay"
    folder.mkdir()
    dump(folder / "kustomization.yaml", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [relative(base, folder)],
        "configMapGenerator": [{"name": "augssl-train", "behavior": "merge", "literals": literals}] if literals else [],
        "patches": patches})
    resources = kustomize(folder)
    for r in resources:
        assert validation_errors(r, K8S_VERSIONS[-1]) == [], r["kind"]
    return resources


def append_args(prefix: str, args: list[str]) -> list[dict]:
    return [{"op": "add", "path": f"{prefix}/args/-", "value": a} for a in args]


def training_literals(data_root: Path, run_root: Path, cluster: Cluster) -> list[str]:
    """The params.env values a training pod here runs with: these shards and runs, no W&B, a one-minute grace, the
    socket interface settings on the hosts' interface (without hosts: the loopback)."""
    return [f"AUGSSL_DATA_ROOT={data_root}", f"AUGSSL_RUN_ROOT={run_root}", "AUGSSL_LOGGER=none",
            "AUGSSL_SHUTDOWN_TIMEOUT=60", f"GLOO_SOCKET_IFNAME={cluster.ifname}",
            f"NCCL_SOCKET_IFNAME={cluster.ifname}"]


def assert_pods_talk_across_hosts(cluster: Cluster, replicas: list[Replica], rendezvous: str) -> None:
    """The second pod runs on its own host under its pod name, the rendezvous name resolves there to the first pod's
    address, its trainer has the ConfigMap's interface settings, and talks to the first pod's address."""
    hosts = cluster.require_hosts()
    first, second = replicas[0].host, replicas[1].host
    trainers = hosts.trainers(second)
    assert trainers, report(replicas)
    peers = tcp_peers(trainers)
    env = environ(trainers[0])
    assert env["GLOO_SOCKET_IFNAME"] == IFNAME and env["NCCL_SOCKET_IFNAME"] == IFNAME
    assert (second.addr, first.addr) in peers, peers
    names = hosts.run(second, ["sh", "-c", f"hostname; getent hosts {rendezvous}"], capture_output=True, text=True,
                      timeout=30).stdout.split()
    assert names[0] == replicas[1].name and names[1] == first.addr, names
    assert all(remote in (first.addr, "127.0.0.1") for _, remote in peers), peers


def one_cpu_trainer(overlay: Path, container: str, args: list[str]) -> list[dict]:
    """Patches that make the container at `container` one CPU trainer: one "GPU" per pod (one process), the shared
    DeepSpeed op cache, and the CPU training arguments plus `args`."""
    return [env_patch(overlay, container, "TORCH_EXTENSIONS_DIR", jit_cache()),
            {"op": "replace", "path": f"{container}/resources/limits/nvidia.com~1gpu", "value": "1"},
            {"op": "replace", "path": f"{container}/resources/requests/nvidia.com~1gpu", "value": "1"},
            *append_args(container, CPU_ARGS + args)]


def checkpoints(run_dir: Path) -> dict[int, dict]:
    return {int(m.parent.name[4:]): json.loads(m.read_text())
            for m in (run_dir / "checkpoints").glob("step*/COMPLETE.json")}


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def report(replicas: list[Replica]) -> str:
    return "\n".join(f"--- {r.name}: {' '.join(r.argv)[:400]}\n{r.output()[-4000:]}" for r in replicas)


# ------------------------------------------------------------------------------------------------------- tests


def test_pytorchjob_replicas_train_together_and_resume_after_pod_deletion(tmp_path, digits, bin_dir, cluster):
    """overlays/imagenet-aasae with 1 process per pod, Master and Worker each on a host of its own: they train over
    torchrun's PET_* rendezvous on <job>-master-0 (the Master's address), gloo between the hosts' addresses.
    Deleting the Worker pod (SIGTERM to its PID 1) checkpoints and stops both replicas with 143, never "succeeded";
    the recreated replicas resume from that checkpoint and finish with 0."""
    cluster.require_hosts()
    runs = tmp_path / "runs"
    prefix = "/spec/pytorchReplicaSpecs/{}/template/spec/containers/0"
    resources = cpu_overlay(
        tmp_path, K8S / "overlays" / "imagenet-aasae",
        training_literals(digits, runs, cluster),
        [{"target": {"kind": "PyTorchJob"}, "patch": dump(tmp_path / "p.yaml", [
            {"op": "replace", "path": "/spec/nprocPerNode", "value": "1"},
            env_patch(K8S / "overlays" / "imagenet-aasae", prefix.format("Master"), "TORCH_EXTENSIONS_DIR",
                      jit_cache()),
            env_patch(K8S / "overlays" / "imagenet-aasae", prefix.format("Worker"), "TORCH_EXTENSIONS_DIR",
                      jit_cache()),
            *append_args(prefix.format("Master"), CPU_ARGS + ["max_steps=40", "checkpoint.every_steps=4"]),
            *append_args(prefix.format("Worker"), CPU_ARGS + ["max_steps=40", "checkpoint.every_steps=4"])])
            .read_text()}])
    job = by_kind(resources, "PyTorchJob")[0]["metadata"]["name"]
    run_dir = runs / job

    first = pytorchjob_replicas(cluster, resources, bin_dir)
    deadline = time.monotonic() + 240
    while not checkpoints(run_dir) and time.monotonic() < deadline:
        assert all(r.proc.poll() is None for r in first), report(first)
        time.sleep(0.2)
    assert checkpoints(run_dir), report(first)
    assert first[1].env["PET_MASTER_ADDR"] == f"{job}-master-0"
    assert_pods_talk_across_hosts(cluster, first, f"{job}-master-0")
    os.kill(first[1].entrypoint_pid(), signal.SIGTERM)  # kubectl delete pod <job>-worker-0
    codes = run_all(first)
    assert codes == [143, 143], report(first)
    assert "stop signal: checkpointing at step" in first[0].output() + first[1].output()
    assert "augssl-entrypoint: stopped (TERM;" in first[1].output()  # the deleted pod
    # the master: its trainer agreed to stop, and its entrypoint saw the deleted pod's stop file at once (instead of
    # torchrun waiting 5 minutes in its exit barrier for the deleted pod's agent)
    assert "another pod of this run was stopped" in first[0].output()
    stopped_at = max(checkpoints(run_dir))
    assert 4 <= stopped_at < 40

    second = pytorchjob_replicas(cluster, resources, bin_dir)
    codes = run_all(second)
    assert codes == [0, 0], report(second)
    out = second[0].output()
    assert f"resumed from {run_dir}/checkpoints/step{stopped_at:09d}" in out, report(second)
    assert max(checkpoints(run_dir)) == 40 and checkpoints(run_dir)[40]["world_size"] == 2
    steps = steps_logged(run_dir)
    assert steps.count(1) == 1 and set(steps) == set(range(1, 41)), steps
    assert (run_dir / "encoder.safetensors").exists()


def test_indexed_job_pods_train_together(tmp_path, digits, bin_dir, cluster):
    """overlays/indexed-imagenet-aasae with 1 process per pod, each pod on a host of its own: pod i runs torchrun as
    node i (its completion index), the rendezvous on <job>-0.<service>, which resolves to pod 0's address; both pods
    finish with 0 and one run directory holds the checkpoints."""
    cluster.require_hosts()
    runs = tmp_path / "runs"
    c0 = "/spec/template/spec/containers/0"
    resources = cpu_overlay(
        tmp_path, K8S / "overlays" / "indexed-imagenet-aasae",
        training_literals(digits, runs, cluster),
        [{"target": {"kind": "Job"}, "patch": dump(tmp_path / "p.yaml", [
            {"op": "replace", "path": f"{c0}/env/1", "value": {"name": "NPROC_PER_NODE", "value": "1"}},
            *one_cpu_trainer(K8S / "overlays" / "indexed-imagenet-aasae", c0,
                            ["max_steps=10", "checkpoint.every_steps=5"])]).read_text()}])
    job = by_kind(resources, "Job")[0]["metadata"]["name"]
    pods = indexed_job_pods(cluster, resources, "train", bin_dir)
    assert pods[0].env["MASTER_ADDR"] == f"{job}-0.{job}"  # what the pod's DNS must resolve
    assert [p.env["JOB_COMPLETION_INDEX"] for p in pods] == ["0", "1"]
    assert "--node-rank=1" in pods[1].argv and "--nnodes=2" in pods[1].argv
    run_dir = runs / job
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text()) and \
            time.monotonic() < deadline and all(p.proc.poll() is None for p in pods):
        time.sleep(0.1)  # until both ranks have taken a step together
    assert_pods_talk_across_hosts(cluster, pods, f"{job}-0.{job}")
    codes = run_all(pods)
    assert codes == [0, 0], report(pods)
    assert sorted(checkpoints(run_dir)) == [5, 10] and checkpoints(run_dir)[10]["world_size"] == 2, report(pods)
    assert steps_logged(run_dir) == list(range(1, 11))
    assert (run_dir / "encoder.safetensors").exists()


def test_a_finished_run_without_export_exits_0_also_when_its_pod_is_restarted(tmp_path, digits, bin_dir, cluster):
    """overlays/indexed-imagenet-aasae as one pod with export_encoder=false: the run's end is read from
    status.json, not from a new encoder.safetensors, so the pod succeeds, and so does a replacement pod started
    after the run has finished (it resumes at the last step and has nothing left to do)."""
    runs = tmp_path / "runs"
    c0 = "/spec/template/spec/containers/0"
    resources = cpu_overlay(
        tmp_path, K8S / "overlays" / "indexed-imagenet-aasae",
        training_literals(digits, runs, cluster),
        [{"target": {"kind": "Job"}, "patch": dump(tmp_path / "p.yaml", [
            {"op": "replace", "path": "/spec/completions", "value": 1},
            {"op": "replace", "path": "/spec/parallelism", "value": 1},
            {"op": "replace", "path": f"{c0}/env/0", "value": {"name": "NNODES", "value": "1"}},
            {"op": "replace", "path": f"{c0}/env/1", "value": {"name": "NPROC_PER_NODE", "value": "1"}},
            *one_cpu_trainer(K8S / "overlays" / "indexed-imagenet-aasae", c0,
                            ["max_steps=3", "checkpoint.every_steps=3", "export_encoder=false"])])
            .read_text()}])
    run_dir = runs / by_kind(resources, "Job")[0]["metadata"]["name"]
    for attempt in range(2):
        pod = indexed_job_pods(cluster, resources, "train", bin_dir)
        assert run_all(pod) == [0], report(pod)
        status = json.loads((run_dir / "status.json").read_text())
        assert (status["status"], status["step"], status["total_steps"]) == ("done", 3, 3), status
    assert "resumed from" in pod[0].output()  # the replacement pod
    assert not (run_dir / "encoder.safetensors").exists()


def rendezvous_host(replicas: list[Replica], port: int) -> Replica:
    """The replica whose torchrun serves the c10d rendezvous store on `port`. In a cluster it is <job>-worker-0's; here
    every pod's name resolves to this machine, so it is whichever agent bound the port first."""
    netns = ["nsenter", f"--net=/proc/{replicas[0].proc.pid}/ns/net"] if CAN_UNSHARE else []
    listing = subprocess.run([*netns, "ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                             timeout=30).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", listing)}
    return next(r for r in replicas if pids & {r.proc.pid, *descendants(r.proc.pid)})


def test_elastic_pytorchjob_resumes_after_a_scale_down_and_a_scale_up(tmp_path, digits, bin_dir, one_namespace):
    """overlays/imagenet-aasae-elastic as it ships (ZeRO 2, bf16, BatchNorm per rank), 1 process per pod, up
    to 3 pods. Two Workers train; one pod is lost (SIGKILL to its processes) and the other's torchrun restarts its
    trainer alone, which resumes from the checkpoint at world size 1; two pods are added, the running trainer
    checkpoints when torchrun restarts it for them, and the three resume at world size 3. Each resume converts the
    ZeRO 2 checkpoint: no "cannot re-partition", and every step is trained."""
    cluster = one_namespace
    runs = tmp_path / "runs"
    overlay = K8S / "overlays" / "imagenet-aasae-elastic"
    prefix = "/spec/pytorchReplicaSpecs/Worker/template/spec/containers/0"
    trainer = [op for op in one_cpu_trainer(overlay, prefix, ["max_steps=100000", "checkpoint.every_steps=2",
                                                              "data.batch_size=12", "dist.timeout_s=60"])
               if op.get("value") != "deepspeed=zero0"]  # the overlay's own DeepSpeed setting
    resources = cpu_overlay(tmp_path, overlay, training_literals(digits, runs, cluster), [
        {"target": {"kind": "PyTorchJob"}, "patch": dump(tmp_path / "p.yaml", [
            {"op": "replace", "path": "/spec/elasticPolicy/nProcPerNode", "value": 1},
            {"op": "replace", "path": "/spec/elasticPolicy/maxReplicas", "value": 3},
            # a lone pod waits this long for others before it trains alone (torchrun's default: 30 s)
            {"op": "add", "path": "/spec/elasticPolicy/rdzvConf", "value": [{"key": "last_call_timeout",
                                                                               "value": "1"}]},
            *trainer]).read_text()}])
    job = by_kind(resources, "PyTorchJob")[0]
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    run_dir = runs / job["metadata"]["name"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
    pods = pytorchjob_replicas(cluster, resources, bin_dir)
    assert [p.env["PET_NNODES"] for p in pods] == ["1:3", "1:3"] and pods[0].env["PET_RDZV_CONF"] == \
        "last_call_timeout=1"
    assert "RANK" not in pods[0].env and "MASTER_ADDR" not in pods[0].env  # torchrun's c10d rendezvous assigns them

    def wait_for(what, condition, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"no {what}:\n{report(cluster.replicas)}"
            assert all(p.proc.poll() is None for p in pods), report(cluster.replicas)
            time.sleep(0.2)

    def saved_at(world: int) -> list[int]:
        return sorted(step for step, m in checkpoints(run_dir).items() if m["world_size"] == world)

    wait_for("checkpoint at world size 2", lambda: saved_at(2))
    survivor = rendezvous_host(pods, port)
    lost = next(p for p in pods if p is not survivor)
    for pid in [lost.proc.pid, *descendants(lost.proc.pid)]:  # the node is gone
        os.kill(pid, signal.SIGKILL)
    lost.wait(30)
    pods = [survivor]
    wait_for("checkpoint at world size 1", lambda: saved_at(1))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 3  # kubectl patch: the operator adds two pods
    pods += pytorchjob_replicas(cluster, resources, bin_dir, workers=range(1, 3))
    wait_for("checkpoint at world size 3", lambda: saved_at(3))  # the cluster fixture ends the pods

    out = "".join(r.output() for r in cluster.replicas)
    assert "cannot re-partition" not in out
    assert all(m["zero_stage"] == 2 for m in checkpoints(run_dir).values())
    assert "world size 2 -> 1" in survivor.output() and "world size 1 -> 3" in out, report(cluster.replicas)
    steps = steps_logged(run_dir)
    assert sorted(set(steps)) == list(range(1, max(steps) + 1)) and max(checkpoints(run_dir)) >= saved_at(3)[0]


def test_make_shards_job_converts_one_split_per_pod(tmp_path, bin_dir, cluster):
    """k8s/make-shards on the digits set: pod i converts the i-th split of SHARDS_SPLITS with as many writers as its
    CPU limit (downward API)."""
    out = tmp_path / "shards"
    c0 = "/spec/template/spec/containers/0"
    folder = tmp_path / "overlay"
    folder.mkdir()
    dump(folder / "kustomization.yaml", {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [relative(K8S / "make-shards", folder)],
        "configMapGenerator": [{"name": "augssl-make-shards", "behavior": "merge", "literals": [
            "SHARDS_DATASET=digits", "SHARDS_SRC=", f"SHARDS_OUT={out}", "SHARDS_SPLITS=train test",
            "SHARDS_OPTIONS=--samples-per-shard 500 --verify"]}],
        "patches": [{"target": {"kind": "Job"}, "patch": dump(tmp_path / "p.yaml", [
            {"op": "replace", "path": f"{c0}/resources/limits/cpu", "value": "1"},
            {"op": "replace", "path": f"{c0}/resources/requests/cpu", "value": "1"}]).read_text()}]})
    resources = kustomize(folder)
    for r in resources:
        assert validation_errors(r, K8S_VERSIONS[-1]) == []
    pods = indexed_job_pods(cluster, resources, "make-shards", bin_dir)
    assert [p.env["WORKERS"] for p in pods] == ["1", "1"]
    codes = run_all(pods, timeout=240)
    assert codes == [0, 0], report(pods)
    for pod, split, shards in zip(pods, ("train", "test"), (3, 1)):
        assert f"converts digits/{split} with 1 workers" in pod.output() and \
            f"verify digits/{split}: OK" in pod.output()
        manifest = json.loads((out / f"digits-{split}.manifest.json").read_text())
        assert len(manifest["shards"]) == shards


def test_bad_config_under_torchrun_exits_2_through_the_entrypoint(tmp_path):
    """torchrun turns a worker's exit 2 into 1; the entrypoint restores it, so the Indexed Job's podFailurePolicy
    (FailJob on 2 and 3) fails the job instead of retrying a command that cannot work."""
    entry = str(REPO / "docker" / "entrypoint.sh")
    env = {"PATH": os.environ["PATH"], "RUN_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([entry, sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                           "-m", "pipeline.train", "data.no_such_key=1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no_such_key" in proc.stderr


def test_entrypoint_never_reports_an_interrupted_run_as_finished(tmp_path):
    """docker/entrypoint.sh on its own: exit codes pass through; how the run ended is read from the status.json
    written during this container's life ("done" 0, "stopped" 143, "failed" its code); a 0 without one (a rank that
    stopped because another was signalled) is 143; SIGTERM is forwarded and turns into 143; a stop file touched by
    another pod stops this one."""
    entry = str(REPO / "docker" / "entrypoint.sh")
    env = {"PATH": os.environ["PATH"], "RUN_DIR": str(tmp_path)}

    def code(*argv: str, **env_changes: str) -> int:  # from the image's working directory, like the pods
        return subprocess.run([entry, *argv], env={**env, **env_changes}, cwd=REPO, timeout=60).returncode

    def ends(status: str, exit_code: int, rc: int) -> int:
        record = json.dumps({"status": status, "exit_code": exit_code})
        return code("sh", "-c", f"sleep 0.1; echo '{record}' > {tmp_path}/status.json; exit {rc}")

    assert code("sh", "-c", "exit 3") == 3
    assert code("sh", "-c", 'echo 3 > "$AUGSSL_EXIT_FILE"; exit 1') == 3
    assert code("true") == 143  # no status.json
    assert code("sh", "-c", f"sleep 0.1; touch {tmp_path}/encoder.safetensors") == 143  # an export is no end
    assert ends("done", 0, 0) == 0
    assert code("true") == 143  # that "done" is an earlier container's
    assert ends("stopped", 0, 0) == 143
    assert ends("failed", 4, 1) == 4
    assert ends("running", 0, 0) == 143 and ends("running", 0, 1) == 1
    (tmp_path / "status.json").write_text("{")
    assert code("sh", "-c", f"sleep 0.1; touch {tmp_path}/status.json") == 143  # unreadable: not finished
    assert code("true", RUN_DIR="") == 0  # not a training run
    # SIGTERM reaches the child, which exits 0 after "checkpointing": still 143
    marker = tmp_path / "got-term"
    child = (f"trap 'touch {marker}; exit 0' TERM; touch {tmp_path}/started; "
             "while :; do sleep 0.1; done")
    proc = subprocess.Popen([entry, "sh", "-c", child], env=env)
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert marker.exists()
    stop_file = tmp_path / ".augssl-stop"
    assert stop_file.exists()  # for the other pods
    # another pod's stop file, touched after this one started, stops this one (SIGTERM to its command)
    (tmp_path / "started").unlink()
    marker.unlink()
    proc = subprocess.Popen([entry, "sh", "-c", child], env={**env, "AUGSSL_STOP_POLL_SECONDS": "0.2"},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    stop_file.touch()
    assert proc.wait(timeout=20) == 143
    assert marker.exists() and "another pod of this run was stopped" in proc.stderr.read()
    assert not list(tmp_path.glob(".augssl-start-*"))  # cleaned up


def test_entrypoint_ends_a_torchrun_left_waiting_for_a_deleted_pod(tmp_path):
    """A torchrun whose workers finished waits in its exit barrier, deaf to SIGTERM, for the agent of a deleted pod.
    A stand-in named torchrun: its worker exits at once and it then ignores TERM (as the barrier's C++ wait does).
    After another pod's stop file, the entrypoint ends it within a few polls and exits 143, instead of waiting out the
    barrier; a command that is not torchrun is never killed this way."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\nimport signal, subprocess, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"subprocess.run(['true'])\nopen({str(tmp_path / 'started')!r}, 'w').close()\ntime.sleep(120)\n")
    (bin_dir / "torchrun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path), "AUGSSL_STOP_POLL_SECONDS": "0.2"}
    proc = subprocess.Popen([str(REPO / "docker" / "entrypoint.sh"), "torchrun"], env=env, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    started = time.monotonic()
    (tmp_path / ".augssl-stop").touch()
    assert proc.wait(timeout=30) == 143
    assert time.monotonic() - started < 10
    assert "torchrun's workers have exited; ending it" in proc.stderr.read()
