"""A real S3-compatible server on 127.0.0.1 (moto's standalone server, as s3fs's own tests use), and
the environment that points every process at it: s3fs (botocore) and pyarrow both read
``AWS_ENDPOINT_URL`` and the ``AWS_*`` credentials, in the test process, in the jobs it starts,
in their Ray workers and in the deepspeed ranks (each inherits the environment)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


def client_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the server: the endpoint and (any) credentials; never the cloud's metadata service."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups beyond this machine
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def without_credentials(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """The server's endpoint (``http://127.0.0.1:<port>``) while it runs in a thread of this process."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(name: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
