"""The launcher-environment resolver on the variables each launcher really sets."""

import pytest

from pipeline.distributed import DistEnv, DistEnvError, expand_hostlist, export, resolve


def no_scontrol(hostlist):
    return expand_hostlist(hostlist)


def test_torchrun():
    env = resolve({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"})
    assert env == DistEnv(5, 8, 1, 4, "node0", 29400, "torchrun")


def test_kubeflow_pytorchjob_one_process_per_pod():
    env = resolve({"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"})
    assert env == DistEnv(2, 3, 0, 1, "job-master-0", 23456, "kubeflow")


def test_kubeflow_pet_variables_without_torchrun():
    env = resolve({"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-master-0",
                   "PET_MASTER_PORT": "23456", "PET_NPROC_PER_NODE": "1"})
    assert env == DistEnv(3, 4, 0, 1, "job-master-0", 23456, "kubeflow")
    with pytest.raises(DistEnvError, match="torchrun"):
        resolve({"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "8"})


def test_indexed_job():
    env = resolve({"JOB_COMPLETION_INDEX": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "train-0.train-svc"})
    assert env == DistEnv(1, 2, 0, 1, "train-0.train-svc", 29500, "indexed-job")
    with pytest.raises(DistEnvError, match="WORLD_SIZE"):
        resolve({"JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "train-0.train-svc"})


def test_slurm_srun_step():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "1",
               "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4,2", "SLURM_JOB_ID": "123456",
               "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_JOB_NAME": "aasae"}
    env = resolve(environ, hostnames=no_scontrol)
    assert env == DistEnv(5, 6, 1, 2, "gpu07", 15000 + 123456 % 20000, "slurm")
    assert resolve({**environ, "MASTER_PORT": "1234"}, hostnames=no_scontrol).master_port == 1234


def test_slurm_uses_scontrol_expansion_of_the_node_list():
    seen = []
    env = resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]"},
                  hostnames=lambda hl: seen.append(hl) or ["first-host", "second-host"])
    assert seen == ["a[1-2]"] and env.master_addr == "first-host"


def test_salloc_shell_is_a_single_process():
    env = resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "interactive"})
    assert env.source == "single" and env.world_size == 1


def test_torchrun_inside_slurm_wins():
    env = resolve({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "n0", "SLURM_PROCID": "0",
                   "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.source) == (3, 4, "torchrun")


def test_single_process_and_export():
    env = resolve({})
    assert env == DistEnv(0, 1, 0, 1, "127.0.0.1", 0, "single")
    out = {}
    exported = export(env, out)
    assert 0 < exported.master_port < 65536
    assert out == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(exported.master_port)}


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "m"}, "rank 4 outside"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "no master address"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "m", "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2(x"}, "parse"),
])
def test_bad_environments_name_the_problem(environ, message):
    with pytest.raises(DistEnvError, match=message):
        resolve(environ, hostnames=no_scontrol)


def test_hostlist_expansion():
    assert expand_hostlist("gpu[01-03,07],cpu-a[1-2]x,login") == [
        "gpu01", "gpu02", "gpu03", "gpu07", "cpu-a1x", "cpu-a2x", "login"]
    assert expand_hostlist("r[1-2]n[0-1]") == ["r1n0", "r1n1", "r2n0", "r2n1"]
