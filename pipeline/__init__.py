"""augssl: a distributed pipeline for augmentation-based self-supervised learning (AASAE, AAG)."""

__version__ = "0.1.0"
