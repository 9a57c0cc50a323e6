"""Frozen-encoder evaluation: features of a split (features.py), weighted kNN (knn.py, also the training-time
monitor) and linear probes (linear.py, also the online probe that methods train alongside)."""
