"""Cleaning: experts that vote on which images of an identity to keep, and the top-up augmentation.

- ``cluster``: per-identity adaptive DBSCAN consistency expert (ALGORITHMS.md 1.2).
- ``augment``: numpy/OpenCV top-up augmentation list (ALGORITHMS.md 1.4).
- ``block``: cleaning v1 of one block of identities (cluster, drop, top up, difficulty).
"""
