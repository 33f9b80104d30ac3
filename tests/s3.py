"""A real S3-compatible server on loopback (moto's) for the tests that write to ``s3://``.

The stages reach it through the same pyarrow code path as a user's ``s3://bucket/...``: the
endpoint comes from the run's ``storage.s3_endpoint`` (or ``AWS_ENDPOINT_URL``) and the credentials
from the usual AWS variables, which a cluster's nodes get from their instance role.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BUCKET = "facegen-test"
#: what the nodes of a real cluster get from their instance role; moto accepts any
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with :data:`BUCKET` created; yields its endpoint URL."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                               region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def s3_env(endpoint: str) -> Iterator[None]:
    """This process reads and writes ``s3://`` through ``endpoint`` with the test credentials."""
    from facegen.ray_utils import environment

    with environment({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}):
        yield


def upload(local: str, uri: str) -> None:
    """Copy a local file or folder tree to ``uri`` (within :func:`s3_env`)."""
    from facegen.storage import write_bytes_atomic

    if os.path.isfile(local):
        with open(local, "rb") as f:
            write_bytes_atomic(f.read(), uri)
        return
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                write_bytes_atomic(f.read(), f"{uri.rstrip('/')}/{os.path.relpath(path, local)}")
