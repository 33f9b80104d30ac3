"""Hostile file contents for the tests of facegen's loaders of untrusted files."""

import os


class RunsShell:
    """Unpickled by a loader that trusts its file, this runs ``touch marker``: the marker proves it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
