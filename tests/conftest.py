"""Shared fixtures: a real S3 server (moto's server mode on 127.0.0.1) and a local Ray."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, with credentials and endpoint in the environment.

    Yields the endpoint URL. Everything that talks S3 (s3fs, boto3, Ray workers started
    afterwards) finds it through ``AWS_ENDPOINT_URL``.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


def create_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a uniquely named bucket on the S3 server at ``endpoint``; return its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the local S3 server; yields its name."""
    yield create_bucket(s3_server)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """An embedded local Ray cluster (2 CPUs) that sees the S3 server's environment."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
