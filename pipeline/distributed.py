"""Everything distributed in one place: who this process is (the launcher's environment) and the collectives the
methods, monitors and checkpoints use, written so that one process (no process group) is the trivial case.

## The launcher's environment

One resolver from the launcher's environment to (rank, world size, local rank, master address and port).

Every launcher describes the same four facts in its own variables; reading them in one place means the trainer,
the loader and DeepSpeed never disagree about who is who. Precedence, most specific first:

1. torchrun (and anything torchrun-like, e.g. the `deepspeed` launcher): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*.
   A Kubeflow PyTorchJob without nprocPerNode sets the same variables per pod, without LOCAL_RANK (one process).
2. Kubeflow's torchrun variables (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT) when the pod started
   this process directly instead of through torchrun: allowed only with one process per pod.
3. A Kubernetes Indexed Job: JOB_COMPLETION_INDEX is the rank; the manifest must set WORLD_SIZE and MASTER_ADDR
   (the index-0 pod's name behind the headless Service).
4. Slurm (srun): SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS inside a step), SLURM_LOCALID; the master is the
   first host of the step's node list, expanded by `scontrol show hostnames` (or, where Slurm's client is not
   installed, by the same hostlist grammar here); the port is MASTER_PORT or derived from the job id, so two jobs
   sharing a node do not collide.
5. Otherwise a single process on 127.0.0.1.

`resolve(environ)` is a pure function of the mapping it gets (tests pass dicts); `export(env)` writes the result back
as the env:// variables that torch.distributed and deepspeed.init_distributed read.

## Collectives

Gradient scaling, precisely. `gather_with_grad` returns the global batch on every rank, and the contrastive losses
are computed on that global batch on every rank, so each rank's loss VALUE equals the single-process loss on the
concatenated batch. In backward every rank holds the same dL/d(global batch); the all-reduce (sum) hands rank r the
sum over ranks of the gradient for its own slice, i.e. world_size * dL/d(x_r). DDP / DeepSpeed then average
parameter gradients over ranks, which divides that factor away: the averaged parameter gradients equal the
single-process gradients on the concatenated batch. (Per-sample terms that are not gathered, such as the
reconstruction error, are local batch means: there the mean of the per-rank losses is the global loss, and DDP's
averaging again yields the single-process gradients.) tests/test_distributed_losses.py checks both at world size 2.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


class DistEnvError(ValueError):
    """The environment describes an impossible or incomplete distributed launch."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | kubeflow | indexed-job | slurm | single


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise DistEnvError(f"environment variable {name} is required here but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _check(env: DistEnv) -> DistEnv:
    if env.world_size < 1:
        raise DistEnvError(f"{env.source}: world size {env.world_size} < 1")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"{env.source}: rank {env.rank} outside a world of {env.world_size}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(f"{env.source}: local rank {env.local_rank} outside {env.local_world_size} local processes")
    if not 0 < env.master_port < 65536:
        raise DistEnvError(f"{env.source}: master port {env.master_port} is not a TCP port")
    if not env.master_addr:
        raise DistEnvError(f"{env.source}: no master address")
    return env


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,07],cpu-a[1-2]x') expanded in order, as `scontrol show hostnames`."""
    hosts = []
    # split at commas that are outside brackets
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        ranges = re.findall(r"\[([^\]]*)\]", part)
        pieces = re.split(r"\[[^\]]*\]", part)
        names = [pieces[0]]
        for spec, suffix in zip(ranges, pieces[1:]):
            values = []
            for item in spec.split(","):
                lo, _, hi = item.partition("-")
                if hi:
                    width = len(lo)
                    values += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
                else:
                    values.append(lo)
            names = [n + v + suffix for n in names for v in values]
        hosts += names
    return hosts


def scontrol_hostnames(hostlist: str) -> list[str]:
    """`scontrol show hostnames HOSTLIST`, falling back to expand_hostlist where Slurm's client is not installed."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    except FileNotFoundError:
        return expand_hostlist(hostlist)
    return out.split()


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Slurm's SLURM_TASKS_PER_NODE ('4(x2),3') -> the number of tasks on node `node_id`."""
    counts = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise DistEnvError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise DistEnvError(f"SLURM_NODEID={node_id} outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    has_local = "LOCAL_RANK" in environ
    world = _int(environ, "WORLD_SIZE")
    return _check(DistEnv(
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", world if has_local else 1),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1" if world == 1 else ""),
        master_port=_int(environ, "MASTER_PORT", DEFAULT_PORT),
        source="torchrun" if has_local else "kubeflow",
    ))


def _from_kubeflow_pet(environ: Mapping[str, str]) -> DistEnv:
    per_node = environ.get("PET_NPROC_PER_NODE", "1")
    if per_node not in ("1", ""):
        raise DistEnvError(f"PET_NPROC_PER_NODE={per_node}: several processes per pod must be started by torchrun "
                           "(it reads the PET_* variables), not by running python directly")
    return _check(DistEnv(
        rank=_int(environ, "PET_NODE_RANK"),
        world_size=_int(environ, "PET_NNODES"),
        local_rank=0,
        local_world_size=1,
        master_addr=environ.get("PET_MASTER_ADDR", ""),
        master_port=_int(environ, "PET_MASTER_PORT", DEFAULT_PORT),
        source="kubeflow",
    ))


def _from_indexed_job(environ: Mapping[str, str]) -> DistEnv:
    return _check(DistEnv(
        rank=_int(environ, "JOB_COMPLETION_INDEX"),
        world_size=_int(environ, "WORLD_SIZE"),
        local_rank=0,
        local_world_size=1,
        master_addr=environ.get("MASTER_ADDR", ""),
        master_port=_int(environ, "MASTER_PORT", DEFAULT_PORT),
        source="indexed-job",
    ))


def _from_slurm(environ: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> DistEnv:
    world = _int(environ, "SLURM_STEP_NUM_TASKS", _int(environ, "SLURM_NTASKS", 1))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get(
        "SLURM_NODELIST", "")
    if world > 1 and not nodelist:
        raise DistEnvError("slurm: SLURM_JOB_NODELIST is not set, cannot find the master node")
    hosts = hostnames(nodelist) if nodelist else ["127.0.0.1"]
    if not hosts:
        raise DistEnvError(f"slurm: node list {nodelist!r} expands to no hosts")
    tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world = _tasks_on_node(tasks_per_node, _int(environ, "SLURM_NODEID", 0)) if tasks_per_node else 1
    job_id = _int(environ, "SLURM_JOB_ID", 0)
    return _check(DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR") or hosts[0],
        master_port=_int(environ, "MASTER_PORT", SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN),
        source="slurm",
    ))


def resolve(environ: Mapping[str, str] | None = None,
            hostnames: Callable[[str], list[str]] = scontrol_hostnames) -> DistEnv:
    """The distributed layout this process belongs to (see the module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if "PET_NNODES" in environ and "PET_NODE_RANK" in environ:
        return _from_kubeflow_pet(environ)
    if "JOB_COMPLETION_INDEX" in environ:
        return _from_indexed_job(environ)
    # `salloc` opens an interactive shell inside an allocation: a python started there is one process, not a task
    if "SLURM_PROCID" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return _from_slurm(environ, hostnames)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", _int(environ, "MASTER_PORT", 0), "single")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host`: the rendezvous of a single process, which nobody else has to find."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def export(env: DistEnv, environ: dict | None = None) -> DistEnv:
    """Write `env` as the env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, ..., MASTER_ADDR/PORT) that
    torch.distributed and deepspeed.init_distributed read; a single process gets a free local port."""
    environ = os.environ if environ is None else environ
    if env.master_port == 0:
        env = DistEnv(**{**env.__dict__, "master_port": free_port(env.master_addr)})
    environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                   LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                   MASTER_PORT=str(env.master_port))
    return env


# ---------------------------------------------------------------------------------------------------- collectives


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the incoming gradients and keeps this rank's slice, so every
    rank's loss reaches every rank's inputs. A plain dist.all_gather returns tensors that are cut off from autograd."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order), keeping gradients; all ranks pass the same shape."""
    if not is_distributed():
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather_variable(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0 when the first dimension differs between ranks (no gradients):
    for feature banks, whose last batch may be short on some ranks."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([t[:n] for t, n in zip(out, sizes)], dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor; `x` is left unchanged)."""
    x = x.clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
