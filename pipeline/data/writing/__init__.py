"""Writing shards: dataset sources in their on-disk formats (sources/), conversion into shards with their DALI
indexes and manifests (convert.py, shard_writer.py), and verification of a written split (verify.py)."""
