"""Pytest fixtures for a real S3-compatible store (SeaweedFS via ``storage.s3server``).

Import them into a conftest (``from tests.s3 import s3_server, s3_store_url``) or a test module.

* ``s3_server`` (session): one ``weed server`` (S3, filer, master, volume) on free loopback ports in a
  temporary folder, with random credentials and one bucket; stopped at the end of the session. Tests
  that need it are skipped, with the reason, when the ``weed`` binary is not installed.
* ``s3_env`` (function): the server's ``AWS_*`` variables set in ``os.environ`` through monkeypatch
  (other AWS settings that could redirect the client are removed for the test).
* ``s3_store_url`` (function): ``s3://<bucket>/<unique prefix>``, with ``s3_env`` in force.
"""

from __future__ import annotations

import uuid

import pytest

from storage.s3server import S3ServerError, SeaweedS3, find_weed

# Variables that would change which endpoint, account or credentials a client uses.
_AWS_OVERRIDES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


_RUNNING: list[SeaweedS3] = []  # one server per session even if two modules import the fixture


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    if _RUNNING and _RUNNING[0].running:
        yield _RUNNING[0]
        return
    try:
        find_weed()
    except S3ServerError as e:
        pytest.skip(str(e))
    server = SeaweedS3(tmp_path_factory.mktemp("s3data"), bucket="gptpipe-test")
    server.start()
    _RUNNING[:] = [server]
    try:
        yield server
    finally:
        _RUNNING.clear()
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    for name in _AWS_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    # no ~/.aws files of the developer's may leak into a test
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_store_url(s3_server, s3_env) -> str:
    return s3_server.url(f"t-{uuid.uuid4().hex[:12]}")
