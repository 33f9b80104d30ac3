"""Tiny real models built from configs for the tests and the benchmarks (as diffusers keeps its
testing utilities in the library): written with ``save_pretrained`` to a folder, then read back
through the same ``from_pretrained`` path a user's weights take. Nothing here is downloaded."""
