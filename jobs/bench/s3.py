"""A real S3-compatible server on loopback for the tests and the fault matrix: moto's standalone server
(``pip install 'moto[server]'``, in the test extras), with credentials checked.

It runs as its own process, so a test can stop it (the endpoint goes away) and start it again.
Credentials are real IAM keys of the server: a wrong secret is refused as AWS would refuse it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import boto3

BUCKET = "rayalign-test"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """``with S3Server() as s3:`` a server at ``s3.endpoint`` with bucket :data:`BUCKET` and a key that may use it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.access_key = self.secret_key = ""
        self._admin = ("", "")

    def start(self) -> S3Server:
        # The first 6 requests (an admin and the rayalign user, their policies and keys) need no
        # signature; every later one does.
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="6")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        for user, policy in (("admin", ALLOW_ALL), ("rayalign", ALLOW_S3)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="access", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            if user == "admin":
                self._admin = (key["AccessKeyId"], key["SecretAccessKey"])
            else:
                self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def _iam(self):
        return boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self._admin[0],
            aws_secret_access_key=self._admin[1],
        )

    def deny_writes(self, prefix: str) -> None:
        """From now on the rayalign key may not write under ``prefix`` (AccessDenied, as AWS answers a policy's Deny)."""
        deny = {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/{prefix}*"}
        policy = {**ALLOW_S3, "Statement": [*ALLOW_S3["Statement"], deny]}
        self._iam().put_user_policy(UserName="rayalign", PolicyName="access", PolicyDocument=json.dumps(policy))

    def allow_writes(self) -> None:
        self._iam().put_user_policy(UserName="rayalign", PolicyName="access", PolicyDocument=json.dumps(ALLOW_S3))

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    @property
    def env(self) -> dict[str, str]:
        """The usual AWS environment variables that point rayalign (and any AWS client) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
