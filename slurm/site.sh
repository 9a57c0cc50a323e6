# Cluster-specific settings for every script in slurm/: the one file to edit for a new cluster (sourced by
# common.sh inside the job, on the first node, before anything is launched). Every value here is a default: a
# variable already set in the environment you submit from (sbatch exports it) wins.

# --- software -------------------------------------------------------------------------------------------------
# The Python that has this project installed (scripts/setup.sh makes .venv in the checkout). On a cluster with
# environment modules or conda, load them here instead, e.g.
#   module load cuda/12.4 gcc/12
#   source /shared/conda/etc/profile.d/conda.sh && conda activate augssl
: "${AUGSSL_PYTHON:=$AUGSSL_HOME/.venv/bin/python}"

# --- storage --------------------------------------------------------------------------------------------------
# Run directories (checkpoints, logs, W&B offline files) go under $AUGSSL_RUN_ROOT/<experiment>-<job id>. Put this
# on a filesystem every node sees (a requeued job may land on other nodes and must find its checkpoints).
: "${AUGSSL_RUN_ROOT:=$AUGSSL_HOME/runs/slurm}"
# Shards (tools/make_shards.py output): a shared folder or an fsspec URL (s3://..., gs://...). Empty keeps the
# config's default data.root (data/<dataset> in the checkout).
: "${AUGSSL_DATA_ROOT:=}"

# --- the network between the nodes, for NCCL (GPUs) and gloo (CPU collectives): the one place for them ---------
# The interface the nodes reach each other on (`ip addr` on a compute node): ib0, bond0, eth0, ... Set it when the
# libraries' own choice is wrong. Unset, gloo takes the address the node's hostname resolves to, which on
# Debian/Ubuntu images is often 127.0.1.1 (/etc/hosts): the other nodes cannot reach it, and the job hangs while the
# process group connects, failing only after gloo's retries (several times dist.timeout_s). NCCL takes the first
# non-loopback interface, which can be a docker bridge or a management network. Empty: let each library choose.
: "${NCCL_SOCKET_IFNAME:=}"
: "${GLOO_SOCKET_IFNAME:=}"
# InfiniBand: the HCAs to use (e.g. mlx5), or NCCL_IB_DISABLE=1 on clusters without IB.
: "${NCCL_IB_HCA:=}"
: "${NCCL_IB_DISABLE:=}"
: "${NCCL_DEBUG:=WARN}"  # INFO prints the chosen transports: the first thing to look at when a job is slow
# a rank that hits a NCCL error or timeout takes the job down instead of hanging until the time limit
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${TORCH_NCCL_BLOCKING_WAIT:=}"
for _var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG \
            TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_BLOCKING_WAIT; do
  if [ -n "${!_var}" ]; then export "${_var?}"; else unset "$_var"; fi
done
unset _var

# --- Weights & Biases -----------------------------------------------------------------------------------------
# Runs log offline into the run directory (`wandb sync` uploads later). For online logging pass logger=wandb_online
# and export WANDB_API_KEY in the shell you submit from (or in ~/.netrc); never write the key into a script.
