# The augssl training image used by every manifest in k8s/ (image name "augssl"; set your registry in
# k8s/components/image/kustomization.yaml). Build from the repository root:
#   docker build -t registry.example.com/augssl:0.1.0 . && docker push registry.example.com/augssl:0.1.0
#
# CUDA devel base: DeepSpeed JIT-compiles its ops with nvcc/g++ at run time, and init_distributed builds a small C++
# op. torch (pinned in pyproject.toml, its CUDA build from PyPI) brings its own CUDA runtime libraries; DALI is
# nvidia-dali-cuda120. The host needs an NVIDIA driver for CUDA 12 and the NVIDIA device plugin.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ make libaio-dev \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root: the manifests run as uid/gid 1000 with a read-only root filesystem (caches go to the /tmp volume).
RUN groupadd --gid 1000 augssl 2>/dev/null || groupmod --new-name augssl "$(getent group 1000 | cut -d: -f1)"; \
    if getent passwd 1000 >/dev/null; then usermod --login augssl --home /home/augssl --move-home \
        "$(getent passwd 1000 | cut -d: -f1)"; else useradd --uid 1000 --gid 1000 --create-home augssl; fi

WORKDIR /opt/augssl
# Dependencies first (cached while only the code changes): scripts/setup.sh is the project's one install path
# (torch pinned first, then the project with its extras; s3 and gcs for shards in object stores).
COPY pyproject.toml README.md LICENSE ./
COPY scripts/setup.sh scripts/setup.sh
RUN mkdir -p pipeline && touch pipeline/__init__.py \
    && PYTHON=python3 bash scripts/setup.sh s3,gcs \
    && rm -rf /root/.cache/pip
COPY pipeline pipeline
COPY configs configs
COPY tools tools
COPY slurm slurm
COPY docs docs
RUN .venv/bin/pip install --no-deps --no-build-isolation -e . && rm -rf /root/.cache/pip \
    && python3 -m compileall -q pipeline tools
COPY docker/entrypoint.sh /usr/local/bin/augssl-entrypoint

ENV PATH=/opt/augssl/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
USER 1000:1000
# augssl-entrypoint (docker/entrypoint.sh) forwards SIGTERM to the trainers and never reports an interrupted run as
# finished; the manifests name it as their command too
ENTRYPOINT ["augssl-entrypoint"]
CMD ["python", "-m", "pipeline.train", "--help"]
