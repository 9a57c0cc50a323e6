#!/bin/bash
# AAG on STL-10 (configs/experiment/stl10_aag.yaml): ResNet-18, batch 64, 1 node x 4 GPUs.
#   sbatch slurm/stl10_aag.sh [Hydra overrides, e.g. epochs=200 data.batch_size=1024]
# Every #SBATCH default below yields to an sbatch flag (sbatch --nodes=4 --time=24:00:00 slurm/stl10_aag.sh) and most
# to an SBATCH_* variable (SBATCH_GPUS_PER_NODE, SBATCH_TIMELIMIT, SBATCH_MEM_PER_NODE, SBATCH_PARTITION, ...).
# Runtime knobs (launcher, processes per node, run and data folders): slurm/common.sh; cluster settings: slurm/site.sh.
#SBATCH --job-name=stl10_aag
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=1-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# sbatch runs a spooled copy of this file: find the checkout it was submitted from, then the shared code
: "${AUGSSL_HOME:=$(scontrol show job "$SLURM_JOB_ID" | awk '/^ *Command=/ { sub(/^ *Command=/, ""); sub(/\/slurm\/[^\/ ]+( .*)?$/, ""); print; exit }')}"
source "${AUGSSL_HOME:?cannot find the checkout: export AUGSSL_HOME}/slurm/common.sh"

augssl_train stl10_aag "$@"
