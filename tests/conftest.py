import os
import sys

# One thread per process: the suite runs on 2 cores, often beside torchrun workers, and oversubscribed torch
# threads make it several times slower. Set before any test imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# tests import their helpers (fixtures.py, shard_reading.py, dist_worker.py) by module name
sys.path.insert(0, os.path.dirname(__file__))
