import os
import sys

# tests import their helpers (fixtures.py, shard_reading.py) by module name
sys.path.insert(0, os.path.dirname(__file__))
