"""Loading shards for training and evaluation: the sample order (sample_order.py), byte reads by index (shard_index.py,
shard_reader.py, batch_source.py), DALI decode and the augmentations that make each view (augmentations.py), and the
loader that turns them into torch batches (loader.py, configured by loader_config.py)."""
