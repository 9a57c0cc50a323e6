#!/bin/bash
# Converts ImageNet into WebDataset shards (tools/make_shards.py) on CPU nodes, one array task per split, each split
# with --workers = its CPUs. A re-run (or a requeued task) resumes: finished shards are checked and skipped.
#   SHARDS_SRC=/data/imagenet SHARDS_OUT=/shared/shards/imagenet \
#     sbatch slurm/make_shards.sh --devkit /data/imagenet/ILSVRC2012_devkit_t12
# SHARDS_SRC: the ImageNet root (train/<wnid>/*.JPEG or ILSVRC2012_img_train.tar, and val/); SHARDS_OUT: a folder every
# node sees, or an fsspec URL (s3://..., with the project's [s3] extra and the usual AWS_* variables).
# Other data sets, e.g. STL-10 (its presets pretrain on train+unlabeled and probe on train and test):
#   SHARDS_DATASET=stl10 SHARDS_SPLITS="train+unlabeled train test" sbatch --array=0-2 slurm/make_shards.sh
# Arguments after the script go to make_shards.py (--devkit, --val-csv, --samples-per-shard, --verify, ...).
#SBATCH --job-name=make_shards
#SBATCH --array=0-1
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

# sbatch runs a spooled copy of this file: find the checkout it was submitted from, then the shared code
: "${AUGSSL_HOME:=$(scontrol show job "$SLURM_JOB_ID" | awk '/^ *Command=/ { sub(/^ *Command=/, ""); sub(/\/slurm\/[^\/ ]+( .*)?$/, ""); print; exit }')}"
source "${AUGSSL_HOME:?cannot find the checkout: export AUGSSL_HOME}/slurm/common.sh"

# array task i converts split i of SHARDS_SPLITS (ImageNet: task 0 = train, task 1 = val)
read -r -a splits <<< "${SHARDS_SPLITS:-train val}"
augssl_make_shards "${SHARDS_DATASET:-imagenet}" "${splits[@]}" -- "$@"
