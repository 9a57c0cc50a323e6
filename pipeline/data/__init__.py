"""Data: what writing and loading share (the dataset table datasets.py, the shard contract shard_format.py, image
bytes image_bytes.py), writing shards (writing/) and loading them (loading/)."""
