"""Identities: the deterministic seed stream, their attributes, where their latents go (Langevin) and how one identity varies (Dispersion, DisCo)."""
