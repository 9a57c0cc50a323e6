"""Data: the shard format, dataset sources for conversion, and the loaders that read shards."""
