"""Shared body of the ``ray job submit`` entrypoints: parse args, connect, call the CLI command."""

from __future__ import annotations

import os
import sys


def run(command: str) -> None:
    """``python ray_jobs/<command>.py --config X [--set k=v ...]`` == ``facegen <command> ...``.

    Submitted with ``ray job submit`` the driver finds ``RAY_ADDRESS`` and joins the cluster;
    run by hand it starts a local loopback Ray (see ``facegen.ray_utils.init_ray``).
    """
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from facegen.cli import app

    app(args=[command, *sys.argv[1:]], prog_name=f"ray_jobs/{command}.py")
