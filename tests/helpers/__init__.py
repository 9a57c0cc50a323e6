"""What the tests share: dataset fixtures in each source's true format, shards built for the loader tests, readers
of written shards, the distributed worker, a local Slurm cluster and the Kubernetes tools."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
