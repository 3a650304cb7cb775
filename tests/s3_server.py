"""A real S3-compatible server on this machine for the tests and benchmarks: moto in server mode over HTTP.

S3Server(bucket).start() listens on a free loopback port and creates the bucket. `env` is what a worker process
needs to use it (COMPRESSOR_STORAGE=s3 and the rest), `django_settings(scratch)` the same for the test process
(override_settings), `client()` a boto3 client for looking at the bucket directly.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

REGION = "us-east-1"
# moto accepts any keys; these go into the environment of the processes the tests start, never into settings.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.create_bucket()
        return self

    def command(self, python: str) -> list[str]:
        """The same server as a process of its own (the bench: it then has a core to itself, not a thread)."""
        return [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def create_bucket(self) -> None:
        self.client().create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def env(self, scratch: Path) -> dict[str, str]:
        """A worker's environment for this server (with worker_env's **extra)."""
        return {
            "COMPRESSOR_STORAGE": "s3",
            "COMPRESSOR_S3_BUCKET": self.bucket,
            "COMPRESSOR_S3_ENDPOINT_URL": self.endpoint,
            "COMPRESSOR_S3_REGION": REGION,
            "COMPRESSOR_SCRATCH_DIR": str(scratch),
            **CREDENTIALS,
        }

    def django_settings(self, scratch: Path) -> dict[str, Any]:
        """override_settings(**these): the test process's storage is this bucket (as settings.py builds it)."""
        from django.conf import settings

        options = {"bucket_name": self.bucket, "endpoint_url": self.endpoint, "region_name": REGION}
        return {
            "COMPRESSOR_STORAGE": "s3",
            "COMPRESSOR_SCRATCH_DIR": scratch,
            "STORAGES": {
                **settings.STORAGES,
                "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options},
            },
        }

    def empty(self) -> None:
        """Remove every object and open upload (between tests: rows are gone, their objects must be too)."""
        client = self.client()
        for upload in self.open_uploads():
            client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for key in self.keys():
            client.delete_object(Bucket=self.bucket, Key=key)

    def keys(self, prefix: str = "") -> list[str]:
        listing = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in listing for obj in page.get("Contents", []))

    def open_uploads(self, prefix: str = "") -> list[dict]:
        """Multipart uploads begun and neither completed nor aborted."""
        return self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", [])
