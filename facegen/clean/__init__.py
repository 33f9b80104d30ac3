"""Cleaning: experts vote per sample, fusion decides, global dedup and leakage, selection and top-up.

- ``view``: one block of SAMPLE rows grouped by identity (what every expert reads).
- ``votes``: per-sample votes (keep / drop / abstain, confidence, reason) of one expert.
- ``cluster``: adaptive DBSCAN consistency expert, fast path (ALGORITHMS.md 1.2);
  ``cluster_reference``: the same loop on scikit-learn's DBSCAN, for tests and benchmarks.
- ``independent``: a second FR model against a trimmed identity centre.
- ``vlm``: numbered grid per identity to a chat-completions endpoint (ALGORITHMS.md 1.3).
- ``fusion``: the votes-to-decision rules from the config.
- ``block``: the per-block expert pass; ``finish``: the per-block final pass (minimum size,
  ``selection`` of semi-hard samples, top-up with ``augment``); ``merge``: rows of merged duplicates.
- ``search``: faiss pair search in bounded memory (on CPU its IVF lists scanned as matrix products,
  ``list_join``); ``dedup``, ``leakage`` (+ ``leakage_report``):
  the global steps, orchestrated by ``global_steps``; ``summary``: run-level figures.
"""
