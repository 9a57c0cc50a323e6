"""The sbatch scripts in slurm/, submitted to a real Slurm (tests/helpers/slurm_cluster.py) as a user would.

The cluster has two nodes, each a host of its own (tests/helpers/netns_hosts.py: a network namespace with its own
address, hostname and /etc/hosts, joined to the other by a bridge): slurmctld and the login node on node1, a slurmd on
each. Their /etc/hosts map a host's own name to 127.0.1.1, as Debian's do, so a rank that advertised the address its
hostname resolves to could not be reached from the other node: the jobs get GLOO_SOCKET_IFNAME (and
NCCL_SOCKET_IFNAME) naming the hosts' interface, as slurm/site.sh would set them.

Each job runs the real script with CPU overrides (gloo, the digits shards, a tiny ResNet, a handful of steps) and a
time limit so nothing can hang the suite; the jobs are polled with scontrol (sbatch --wait's own polling interval
grows to 32 s, which would double the suite's time). Every test checks what the job left behind (job state, run
directory, checkpoints, metrics, logs), not only exit codes. The single-host 2-rank run of cifar10_aag (the time-limit
test) is the reference whose losses the 2-host runs must reproduce step for step.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`bash scripts/install_slurm.sh`) and root (slurmd launches
the jobs; the hosts are network namespaces). Without them the tests skip, except under CI=... where they fail
instead. Where network namespaces cannot be made outside CI, the cluster is one node on localhost and the 2-host
tests skip.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.netns_hosts import IFNAME, HostsUnavailable, NetnsHosts, environ, tcp_peers
from tests.helpers.slurm_cluster import SlurmCluster, missing_binaries

SLURM = REPO / "slurm"
TRAIN_SCRIPTS = ["imagenet_aasae", "imagenet_aag", "stl10_aasae", "stl10_aag", "cifar10_aag"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}

# what turns any of the GPU presets into a seconds-long CPU run on the digits shards
CPU_OVERRIDES = ["data=digits", "backbone=resnet_small", "deepspeed=zero0", "data.loader.device=cpu",
                 "data.batch_size=16", "data.loader.num_threads=1", "data.loader.read_workers=1", "logger=none",
                 "logger.progress_bar=false", "logger.log_every_steps=1", "monitor.knn_every_epochs=0"]
# the sbatch flags that fit the job on this node; --time bounds every job, --signal must fit inside it
CPU_TORCHRUN = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=1G", "--time=5",
                "--signal=B:USR1@10"]
CPU_SRUN = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--time=5",
            "--signal=B:USR1@10"]
# the same on two hosts: one process per node
TWO_NODES_TORCHRUN = ["--nodes=2", *CPU_TORCHRUN[1:]]
TWO_NODES_SRUN = ["--nodes=2", "--ntasks-per-node=1", *CPU_SRUN[2:]]
# the run every multi-process cifar10_aag job here trains: the reference's losses hold for all of them
REFERENCE_RUN = [*CPU_OVERRIDES, "max_steps=20", "checkpoint.every_steps=4"]
SBATCH_TIMEOUT = 420  # seconds; above the jobs' 5-minute limit, so sbatch --wait always returns

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    why = None
    if missing:
        why = f"Slurm/munge binaries not installed ({', '.join(missing)}): run `bash scripts/install_slurm.sh`"
    elif os.geteuid() != 0:
        why = "the Slurm end-to-end tests start slurmd and network namespaces, which must run as root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set: these tests must run)")
        pytest.skip(why)
    hosts, no_hosts = None, ""
    try:
        hosts = NetnsHosts(tmp_path_factory.mktemp("hosts"), ["node1", "node2"], own_name_on_loopback=True).start()
    except HostsUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"cannot make the test hosts (network namespaces): {e} (CI is set: these tests must run)")
        no_hosts = f"network namespaces cannot be made here ({e}): the 2-host tests need them"
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"), hosts=hosts)
    cluster.no_hosts = no_hosts
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if hosts is not None:
            hosts.close()


@pytest.fixture
def hosts(slurm) -> NetnsHosts:
    """The cluster's two hosts (node1, node2)."""
    if slurm.hosts is None:
        pytest.skip(slurm.no_hosts)
    return slurm.hosts


def submit_env(slurm: SlurmCluster, digits: Path, run_root: Path) -> dict:
    """The submitting shell's environment: the cluster, the digits shards, a run root; the socket interface settings
    of slurm/site.sh pointed at the hosts' interface (on localhost: the loopback)."""
    ifname = IFNAME if slurm.hosts is not None else "lo"
    return slurm.env(AUGSSL_RUN_ROOT=run_root, AUGSSL_DATA_ROOT=digits, OMP_NUM_THREADS=1,
                     GLOO_SOCKET_IFNAME=ifname, NCCL_SOCKET_IFNAME=ifname)


@pytest.fixture
def job_env(slurm, digits, tmp_path):
    return submit_env(slurm, digits, tmp_path / "runs")


def run_dir_of(env: dict, experiment: str, job_id: int) -> Path:
    return Path(env["AUGSSL_RUN_ROOT"]) / f"{experiment}-{job_id}"


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def job_log(run_dir: Path, job_id: int) -> str:
    return (run_dir / "logs" / f"slurm-{job_id}.out").read_text(errors="replace")


def complete_checkpoints(run_dir: Path) -> dict[int, dict]:
    found = {}
    for marker in sorted((run_dir / "checkpoints").glob("step*/COMPLETE.json")):
        found[int(marker.parent.name[4:])] = json.loads(marker.read_text())
    return found


def wait_for(predicate, timeout: float, what: str, slurm: SlurmCluster, job_id: int, run_dir: Path | None = None):
    deadline = time.monotonic() + timeout
    details = lambda: describe(slurm, job_id, run_dir) if run_dir else f"job: {slurm.job(job_id)}"  # noqa: E731
    while time.monotonic() < deadline:
        if predicate():
            return
        state = slurm.job(job_id).get("JobState")
        if state in FINISHED:
            pytest.fail(f"job {job_id} ended ({state}) before {what}\n{details()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{details()}")


def describe(slurm: SlurmCluster, job_id: int, run_dir: Path) -> str:
    log = run_dir / "logs" / f"slurm-{job_id}.out"
    text = log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"
    return f"job: {slurm.job(job_id)}\n--- job log (tail)\n{text}\n{slurm.logs()}"


def losses(run_dir: Path) -> dict[int, dict]:
    """What rank 0 logged per step, timings and memory left out: the loss and its terms, the online probe's loss and
    accuracy, lr, epoch, samples (metrics.jsonl holds each step once, a resumed attempt's included)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = {r["step"]: {k: v for k, v in r.items() if not k.startswith(("perf/", "memory/", "resumed_from"))}
             for r in rows}
    assert sorted(found) == list(range(1, 21)) and all("loss" in v and "ssl_loss" in v for v in found.values()), found
    return found


def assert_trains_across_hosts(slurm: SlurmCluster, job_id: int, run_dir: Path) -> None:
    """Rank 1 runs on node2, was told the rendezvous host by name and the hosts' interface, and talks to node1's
    address (the name resolves to it there; on node1 itself it is 127.0.1.1)."""
    hosts = slurm.hosts
    node1, node2 = hosts
    trainers = hosts.trainers(node2)
    assert trainers, f"no trainer on {node2.name}: {describe(slurm, job_id, run_dir)}"
    env = environ(trainers[0])
    # torchrun gives its workers RANK; a Slurm task has SLURM_PROCID (the trainer derives RANK from it)
    assert env["MASTER_ADDR"] == node1.name and env.get("RANK", env.get("SLURM_PROCID")) == "1", env
    assert env["GLOO_SOCKET_IFNAME"] == IFNAME and env["NCCL_SOCKET_IFNAME"] == IFNAME
    peers = tcp_peers(trainers)
    assert (node2.addr, node1.addr) in peers, peers  # gloo and the store, from node2's address to node1's
    assert all(remote in (node1.addr, "127.0.0.1") for _, remote in peers), peers
    resolve = hosts.run(node2, ["getent", "hosts", node1.name], capture_output=True, text=True, timeout=30)
    assert resolve.stdout.split()[0] == node1.addr


# ------------------------------------------------------------------------------------------------------- sbatch


@pytest.mark.parametrize("script", TRAIN_SCRIPTS + ["make_shards"])
def test_scripts_are_accepted_by_sbatch(slurm, script):
    """Every script's #SBATCH lines parse, and with the CPU overrides fit this node (sbatch --test-only asks the real
    controller); left at their GPU defaults they are rejected at once, not left pending (EnforcePartLimits)."""
    path = SLURM / f"{script}.sh"
    flags = ["--cpus-per-task=1", "--mem=1G", "--time=5"] if script == "make_shards" else CPU_TORCHRUN
    ok = slurm.run("sbatch", "--test-only", *flags, str(path), check=False)
    assert ok.returncode == 0, ok.stderr
    assert "to start at" in ok.stderr
    if script != "make_shards":
        gpus = slurm.run("sbatch", "--test-only", str(path), check=False)
        assert gpus.returncode != 0, "a GPU job was accepted on a node without GPUs"


def test_scontrol_requeue_resumes_from_the_checkpoint(slurm, job_env, tmp_path):
    """A running job is requeued (as preemption or an admin would): the trainer checkpoints on SIGTERM, Slurm starts
    the job again with the same id, and the second attempt resumes in the same run directory instead of
    restarting."""
    env = dict(job_env, AUGSSL_NPROC_PER_NODE="2")
    job_id, _ = slurm.sbatch(SLURM / "stl10_aasae.sh", *CPU_OVERRIDES, "max_steps=20", "checkpoint.every_steps=4",
                             sbatch_args=CPU_TORCHRUN, env=env, cwd=tmp_path)
    run_dir = run_dir_of(env, "stl10_aasae", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id, run_dir)
    assert slurm.job(job_id).get("JobState") == "RUNNING"
    slurm.run("scontrol", "requeue", str(job_id))
    # polled rather than sbatch --wait, whose polling interval grows to 32 s
    slurm.wait_state(job_id, FINISHED, timeout=SBATCH_TIMEOUT)
    info = slurm.job(job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", describe(slurm, job_id, run_dir)

    log = job_log(run_dir, job_id)
    assert f"job {job_id} (stl10_aasae) attempt 0" in log and f"job {job_id} (stl10_aasae) attempt 1" in log
    assert "DUE TO JOB REQUEUE" in log
    resumed = [int(step) for step in re.findall(r"^resumed from \S+/step(\d{9}) ", log, re.M)]
    assert len(resumed) == 2 and resumed[0] == resumed[1] >= 4, log  # both ranks, the same checkpoint
    steps = logged_steps(run_dir)
    # attempt 0 logged 1..k; attempt 1 continued after the checkpoint it resumed from: never back at step 1
    assert steps.count(1) == 1 and steps[-1] == 20 and set(steps) == set(range(1, 21)), steps
    repeats = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(repeats) <= 1 and all(steps[i] == resumed[0] + 1 for i in repeats), (steps, resumed)
    assert max(complete_checkpoints(run_dir)) == 20


@pytest.fixture(scope="module")
def reference(slurm, digits, tmp_path_factory):
    """The time-limit path with one Slurm task per process (AUGSSL_LAUNCHER=srun) on one host, 2 ranks: USR1 to the
    batch shell (what `--signal=B:USR1@N` delivers N seconds before the limit) reaches the trainers, they checkpoint
    and exit, and the job requeues itself; the next attempt resumes and finishes. Its resume is exact, so its losses
    are those of an uninterrupted single-host 2-rank run: the reference of the 2-host runs."""
    tmp = tmp_path_factory.mktemp("reference")
    env = dict(submit_env(slurm, digits, tmp / "runs"), AUGSSL_LAUNCHER="srun")
    job_id, _ = slurm.sbatch(SLURM / "cifar10_aag.sh", *REFERENCE_RUN, sbatch_args=CPU_SRUN, env=env, cwd=tmp)
    run_dir = run_dir_of(env, "cifar10_aag", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id, run_dir)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    info = slurm.wait_state(job_id, FINISHED, timeout=SBATCH_TIMEOUT)
    return {"job_id": job_id, "run_dir": run_dir, "info": info, "describe": describe(slurm, job_id, run_dir)}


def test_time_limit_signal_checkpoints_and_requeues(reference):
    job_id, run_dir, info = reference["job_id"], reference["run_dir"], reference["info"]
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", reference["describe"]
    assert "," not in info.get("NodeList", ",") and "[" not in info["NodeList"]  # one host

    log = job_log(run_dir, job_id)
    assert "2 Slurm task(s), one process each" in log
    assert "USR1: the time limit is near" in log
    assert "stop signal: checkpointing at step" in log
    stopped_at = int(log.split("stop signal: checkpointing at step ", 1)[1].split()[0])
    assert f"requeueing job {job_id}: the next attempt resumes from" in log
    assert f"resumed from {run_dir}/checkpoints/step{stopped_at:09d}" in log, log
    steps = logged_steps(run_dir)
    assert steps == list(range(1, 21)), steps  # stopped right after a step it had checkpointed: nothing repeated
    assert max(complete_checkpoints(run_dir)) == 20
    assert "the run finished (status.json: done)" in log  # the second attempt: exit 0, no further requeue


def test_two_hosts_srun_train_together_as_on_one_host(slurm, hosts, job_env, tmp_path, reference):
    """`sbatch -N 2 --ntasks-per-node=1` with AUGSSL_LAUNCHER=srun: one trainer on each host, rank 0 hosting the
    rendezvous on node1 (the first host of the allocation), gloo between the hosts' addresses over the interface
    the environment names; the losses equal the single-host run's step for step, and the run ends done."""
    env = dict(job_env, AUGSSL_LAUNCHER="srun")
    job_id, _ = slurm.sbatch(SLURM / "cifar10_aag.sh", *REFERENCE_RUN, sbatch_args=TWO_NODES_SRUN, env=env,
                             cwd=tmp_path)
    run_dir = run_dir_of(env, "cifar10_aag", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id, run_dir)
    assert_trains_across_hosts(slurm, job_id, run_dir)
    info = slurm.wait_state(job_id, FINISHED, timeout=SBATCH_TIMEOUT)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", describe(slurm, job_id, run_dir)
    assert info.get("NodeList") == "node[1-2]"

    log = job_log(run_dir, job_id)
    assert "2 Slurm task(s), one process each, rendezvous node1:" in log
    assert f"GLOO_SOCKET_IFNAME={IFNAME}" in log and f"NCCL_SOCKET_IFNAME={IFNAME}" in log
    assert log.count("training done") - log.count("training done at step") == 2, log  # both ranks
    assert "the run finished (status.json: done)" in log
    # Slurm's own output file (in the submit directory) points at the run directory's log
    assert str(run_dir) in (tmp_path / f"slurm-cifar10_aag-{job_id}.out").read_text()
    cfg = (run_dir / "config.yaml").read_text()
    assert "experiment_name: cifar10_aag" in cfg and "max_steps: 20" in cfg and "dataset: digits" in cfg
    assert f"run_dir: {run_dir}" in cfg
    checkpoints = complete_checkpoints(run_dir)
    assert sorted(checkpoints) == [12, 16, 20] and all(c["world_size"] == 2 for c in checkpoints.values())
    assert (run_dir / "encoder.safetensors").stat().st_size > 0
    assert losses(run_dir) == losses(reference["run_dir"])


def test_two_hosts_torchrun_lose_a_node_requeue_and_resume(slurm, hosts, job_env, tmp_path, reference):
    """`sbatch -N 2` with the default launcher: torchrun on each host, one process each, static rendezvous on node1.
    Mid-run node2 is lost as a node is lost to a power cut: its cable pulled, then everything on it killed (slurmd,
    its job's processes), so node1 hears nothing, not even a reset. The controller calls node2 DOWN after
    SlurmdTimeout and requeues the job (--requeue); the rank on node1, blocked in a collective, stops on Slurm's
    SIGTERM. Once node2 is back (cable, slurmd), the job starts again on both hosts, resumes from its checkpoint and
    ends done, its losses still those of the single-host run."""
    node1, node2 = hosts
    env = dict(job_env, AUGSSL_NPROC_PER_NODE="1")
    job_id, _ = slurm.sbatch(SLURM / "cifar10_aag.sh", *REFERENCE_RUN, "dist.stop_grace_s=5",
                             sbatch_args=TWO_NODES_TORCHRUN, env=env, cwd=tmp_path)
    run_dir = run_dir_of(env, "cifar10_aag", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id, run_dir)
    assert_trains_across_hosts(slurm, job_id, run_dir)

    hosts.unplug(node2)
    assert hosts.kill_processes(node2)
    # node2 DOWN, the job requeued, and its processes on node1 ended (the rank there was blocked in a collective
    # with node2: it stops on Slurm's SIGTERM within dist.stop_grace_s); only then does node2 come back
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
            slurm.job(job_id).get("Restarts") == "1" and slurm.job(job_id).get("JobState") == "PENDING"):
        time.sleep(0.5)
    assert slurm.job(job_id).get("JobState") == "PENDING", describe(slurm, job_id, run_dir)
    assert slurm.node_states()["node2"].startswith("down"), slurm.node_states()
    hosts.plug(node2)
    slurm.start_slurmd("node2")
    info = slurm.wait_state(job_id, FINISHED, timeout=SBATCH_TIMEOUT)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", describe(slurm, job_id, run_dir)
    assert info.get("NodeList") == "node[1-2]"

    log = job_log(run_dir, job_id)
    assert f"job {job_id} (cifar10_aag) attempt 0" in log and f"job {job_id} (cifar10_aag) attempt 1" in log
    assert "2 node(s) x 1 process(es) via torchrun, rendezvous node1:" in log
    resumed = [int(step) for step in re.findall(r"^resumed from \S+/step(\d{9}) ", log, re.M)]
    assert len(resumed) == 2 and resumed[0] == resumed[1] >= 4, log  # both ranks, the same checkpoint
    assert "the run finished (status.json: done)" in log
    ctld = (slurm.log_dir / "slurmctld.log").read_text(errors="replace")
    assert f"requeue job JobId={job_id} due to failure of node node2" in ctld, ctld[-3000:]
    assert "srun: error: Node failure on node2" in log
    # the rank on node1 heard nothing from node2 (no reset): it was blocked in a collective until Slurm's SIGTERM
    assert "SIGTERM while blocked in" in log
    assert logged_steps(run_dir) == list(range(1, 21))
    assert max(complete_checkpoints(run_dir)) == 20
    assert losses(run_dir) == losses(reference["run_dir"])


def test_make_shards_array_converts_splits_in_parallel(slurm, tmp_path):
    """slurm/make_shards.sh as an array job, one task per split (digits here: train and test); with --verify every
    shard is re-read; the tasks' logs go to per-task run directories."""
    env = slurm.env(SHARDS_DATASET="digits", SHARDS_SPLITS="train test", SHARDS_OUT=tmp_path / "shards",
                    AUGSSL_RUN_ROOT=tmp_path / "runs", OMP_NUM_THREADS=1)
    job_id, _ = slurm.sbatch(SLURM / "make_shards.sh", "--samples-per-shard", "500", "--verify",
                             sbatch_args=["--cpus-per-task=1", "--mem=1G", "--time=5"], env=env, cwd=tmp_path)
    deadline = time.monotonic() + SBATCH_TIMEOUT
    while not all(t.get("JobState") in FINISHED for t in slurm.jobs(job_id)) and time.monotonic() < deadline:
        time.sleep(0.25)
    tasks = slurm.jobs(job_id)
    assert sorted(t.get("ArrayTaskId") for t in tasks) == ["0", "1"]
    assert all(t.get("JobState") == "COMPLETED" and t.get("ExitCode") == "0:0" for t in tasks), tasks
    for task, split, shards in ((0, "train", 3), (1, "test", 1)):
        manifest = json.loads((tmp_path / "shards" / f"digits-{split}.manifest.json").read_text())
        assert len(manifest["shards"]) == shards
        log = (tmp_path / "runs" / f"make_shards_digits-{job_id}_{task}" / "logs" / f"slurm-{job_id}_{task}.out")
        text = log.read_text()
        assert f"array task {task} converts digits/{split}" in text and f"verify digits/{split}: OK" in text
