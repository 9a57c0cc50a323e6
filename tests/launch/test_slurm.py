"""The sbatch scripts in slurm/, submitted to a real single-node Slurm (tests/helpers/slurm_cluster.py) as a user would.

The headline job is submitted with `sbatch --wait`, as a user would; the others are polled with scontrol (sbatch
--wait's own polling interval grows to 32 s, which would double the suite's time). Each job runs the real script with
CPU overrides (2 processes, gloo, the digits shards, a tiny ResNet, a handful of steps) and a time limit so nothing can
hang the suite. `sbatch --wait` also returns 0 for a cancelled job, so every
test checks what the job left behind (job state, run directory, checkpoints, metrics, logs), not only exit codes.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`bash scripts/install_slurm.sh`) and root (slurmd launches
the jobs). Without them the tests skip, except under CI=... where they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
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
SBATCH_TIMEOUT = 420  # seconds; above the jobs' 5-minute limit, so sbatch --wait always returns

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    why = None
    if missing:
        why = f"Slurm/munge binaries not installed ({', '.join(missing)}): run `bash scripts/install_slurm.sh`"
    elif os.geteuid() != 0:
        why = "the Slurm end-to-end tests start slurmd, which must run as root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set: these tests must run)")
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def job_env(slurm, digits, tmp_path):
    """The submitting shell's environment: the cluster, the digits shards, a run root in tmp_path."""
    return slurm.env(AUGSSL_RUN_ROOT=tmp_path / "runs", AUGSSL_DATA_ROOT=digits, OMP_NUM_THREADS=1,
                     GLOO_SOCKET_IFNAME="lo")


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


def wait_for(predicate, timeout: float, what: str, slurm: SlurmCluster, job_id: int):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        state = slurm.job(job_id).get("JobState")
        if state in FINISHED:
            pytest.fail(f"job {job_id} ended ({state}) before {what}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; job: {slurm.job(job_id)}")


def describe(slurm: SlurmCluster, job_id: int, run_dir: Path) -> str:
    log = run_dir / "logs" / f"slurm-{job_id}.out"
    text = log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"
    return f"job: {slurm.job(job_id)}\n--- job log (tail)\n{text}\n{slurm.logs()}"


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


def test_imagenet_aasae_trains_and_checkpoints(slurm, job_env, tmp_path):
    """`sbatch --wait slurm/imagenet_aasae.sh <overrides>`: torchrun on the node, 2 processes over gloo, the Hydra
    overrides passed through, the run directory per job with checkpoints, metrics and the log."""
    env = dict(job_env, AUGSSL_NPROC_PER_NODE="2")
    job_id, out = slurm.sbatch(SLURM / "imagenet_aasae.sh", *CPU_OVERRIDES, "max_steps=6", "checkpoint.every_steps=3",
                               sbatch_args=CPU_TORCHRUN, wait=True, env=env, timeout=SBATCH_TIMEOUT, cwd=tmp_path)
    run_dir = run_dir_of(env, "imagenet_aasae", job_id)
    info = slurm.job(job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", describe(slurm, job_id, run_dir)

    log = job_log(run_dir, job_id)
    assert f"rendezvous {slurm.node}:" in log  # the first host of `scontrol show hostnames`
    assert "1 node(s) x 2 process(es) via torchrun" in log
    # both ranks log "training done"; rank 0 also sums up ("training done at step ..."); their lines may interleave
    assert log.count("training done") - log.count("training done at step") == 2, log
    # Slurm's own output file (in the submit directory) points at the run directory's log
    slurm_out = (tmp_path / f"slurm-imagenet_aasae-{job_id}.out").read_text()
    assert str(run_dir) in slurm_out

    cfg = (run_dir / "config.yaml").read_text()
    assert "experiment_name: imagenet_aasae" in cfg and "max_steps: 6" in cfg and "dataset: digits" in cfg
    assert f"run_dir: {run_dir}" in cfg
    checkpoints = complete_checkpoints(run_dir)
    assert sorted(checkpoints) == [3, 6]
    assert all(c["world_size"] == 2 for c in checkpoints.values())
    assert logged_steps(run_dir) == list(range(1, 7))
    assert (run_dir / "encoder.safetensors").stat().st_size > 0


def test_scontrol_requeue_resumes_from_the_checkpoint(slurm, job_env, tmp_path):
    """A running job is requeued (as preemption or an admin would): the trainer checkpoints on SIGTERM, Slurm starts
    the job again with the same id, and the second attempt resumes in the same run directory instead of
    restarting."""
    env = dict(job_env, AUGSSL_NPROC_PER_NODE="2")
    job_id, _ = slurm.sbatch(SLURM / "stl10_aasae.sh", *CPU_OVERRIDES, "max_steps=20", "checkpoint.every_steps=4",
                             sbatch_args=CPU_TORCHRUN, env=env, cwd=tmp_path)
    run_dir = run_dir_of(env, "stl10_aasae", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id)
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


def test_time_limit_signal_checkpoints_and_requeues(slurm, job_env, tmp_path):
    """The time-limit path with one Slurm task per process (AUGSSL_LAUNCHER=srun): USR1 to the batch shell (what
    `--signal=B:USR1@N` delivers N seconds before the limit) reaches the trainers, they checkpoint and exit, and the
    job requeues itself; the next attempt resumes and finishes."""
    env = dict(job_env, AUGSSL_LAUNCHER="srun")
    job_id, _ = slurm.sbatch(SLURM / "cifar10_aag.sh", *CPU_OVERRIDES, "max_steps=20", "checkpoint.every_steps=4",
                             sbatch_args=CPU_SRUN, env=env, cwd=tmp_path)
    run_dir = run_dir_of(env, "cifar10_aag", job_id)
    wait_for(lambda: 4 in complete_checkpoints(run_dir), 180, "the first checkpoint", slurm, job_id)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    info = slurm.wait_state(job_id, FINISHED, timeout=SBATCH_TIMEOUT)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", describe(slurm, job_id, run_dir)

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
