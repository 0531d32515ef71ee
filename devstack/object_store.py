"""Start a local S3-protocol server, for the tests of the object-store blob backend (mesh/blobs.py).

No S3 server binary installs on this machine, so this runs moto's server mode (`moto_server`, a real HTTP
server speaking the S3 REST protocol, in-memory) as a separate process. Production points posemesh at AWS
S3, MinIO, Ceph RGW or GCS's XML API instead; the client side (boto3) is the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from posemesh.devstack.processes import free_port, stop_process, wait_for_port

# moto accepts any credentials; boto3 must find some, and a region.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "posemesh-test", "AWS_SECRET_ACCESS_KEY": "posemesh-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


class LocalS3:
    """An S3-protocol server on a port of this machine, with one bucket."""

    def __init__(self, bucket: str = "posemesh", port: int | None = None, log_path: Path | None = None,
                 host: str = "127.0.0.1"):
        self.bucket, self.host = bucket, host
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def blob_url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def start(self, timeout: float = 30.0) -> LocalS3:
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([server, "-H", self.host, "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.host, self.port, timeout)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    @staticmethod
    def environ() -> dict:
        """The variables a process needs to reach this server with boto3's own credential lookup."""
        return {**os.environ, **CREDENTIALS}

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
