"""Validation: insightface .bin verification sets, K-fold accuracy."""
