"""Identities: the deterministic seed stream and the attributes that describe each identity."""
