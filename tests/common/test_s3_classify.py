"""The one classification of object-store errors: the mapping table, and what
the project's real S3 server (moto, on loopback) answers to a missing bucket,
a missing key, unknown credentials and a closed port."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from botocore import exceptions as bex
from botocore.exceptions import ClientError

from services.common.s3 import (
    ErrorClass,
    ObjectMissing,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreMisconfigured,
    classify,
)
from services.common.settings import S3Settings
from tests.conftest import free_port, wait_port


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} message"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


@pytest.mark.parametrize(
    ("code", "status", "expected", "setting"),
    [
        ("SlowDown", 503, ErrorClass.TRANSIENT, ""),
        ("Throttling", 400, ErrorClass.TRANSIENT, ""),
        ("RequestTimeout", 400, ErrorClass.TRANSIENT, ""),
        ("InternalError", 500, ErrorClass.TRANSIENT, ""),
        ("502", 502, ErrorClass.TRANSIENT, ""),
        ("TooManyRequests", 429, ErrorClass.TRANSIENT, ""),
        ("AccessDenied", 403, ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        ("InvalidAccessKeyId", 403, ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        ("SignatureDoesNotMatch", 403, ErrorClass.MISCONFIGURED, "AWS_SECRET_ACCESS_KEY"),
        ("AllAccessDisabled", 403, ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        ("403", 403, ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        ("SomethingNew", 403, ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        ("NoSuchBucket", 404, ErrorClass.MISCONFIGURED, "S3_BUCKET"),
        ("InvalidBucketName", 400, ErrorClass.MISCONFIGURED, "S3_BUCKET"),
        ("AuthorizationHeaderMalformed", 400, ErrorClass.MISCONFIGURED, "S3_REGION"),
        ("PermanentRedirect", 301, ErrorClass.MISCONFIGURED, "S3_REGION"),
        ("NoSuchKey", 404, ErrorClass.MISSING, ""),
        ("404", 404, ErrorClass.MISSING, ""),
        ("PreconditionFailed", 412, ErrorClass.PRECONDITION, ""),
        ("EntityTooLarge", 400, ErrorClass.REFUSED, ""),
    ],
)
def test_mapping_of_store_error_codes(code: str, status: int, expected: ErrorClass, setting: str) -> None:
    found = classify(client_error(code, status))
    assert found.error_class is expected
    assert found.setting == setting
    assert found.code == code


def test_a_bare_404_of_a_bucket_call_is_a_missing_bucket() -> None:
    found = classify(client_error("404", 404, "HeadBucket"), bucket_call=True)
    assert (found.error_class, found.setting) == (ErrorClass.MISCONFIGURED, "S3_BUCKET")


@pytest.mark.parametrize(
    ("exc", "expected", "setting"),
    [
        (bex.EndpointConnectionError(endpoint_url="http://x"), ErrorClass.TRANSIENT, ""),
        (bex.ConnectTimeoutError(endpoint_url="http://x"), ErrorClass.TRANSIENT, ""),
        (bex.ReadTimeoutError(endpoint_url="http://x"), ErrorClass.TRANSIENT, ""),
        (bex.ConnectionClosedError(endpoint_url="http://x"), ErrorClass.TRANSIENT, ""),
        (ConnectionResetError(104, "reset"), ErrorClass.TRANSIENT, ""),
        (TimeoutError(), ErrorClass.TRANSIENT, ""),
        (bex.NoCredentialsError(), ErrorClass.MISCONFIGURED, "AWS_ACCESS_KEY_ID"),
        (
            bex.PartialCredentialsError(provider="env", cred_var="x"),
            ErrorClass.MISCONFIGURED,
            "AWS_SECRET_ACCESS_KEY",
        ),
        (bex.NoRegionError(), ErrorClass.MISCONFIGURED, "S3_REGION"),
        (ValueError("Invalid endpoint: not a url"), ErrorClass.MISCONFIGURED, "S3_ENDPOINT_URL"),
    ],
)
def test_mapping_of_other_errors(exc: BaseException, expected: ErrorClass, setting: str) -> None:
    found = classify(exc)
    assert (found.error_class, found.setting) == (expected, setting)


async def test_missing_bucket_names_the_bucket_setting(s3_settings: S3Settings) -> None:
    async with ObjectStore(s3_settings) as store:
        for call in (store.ping(), store.get_bytes("images/a.tif"), store.put_bytes("x/y", b"1")):
            with pytest.raises(ObjectStoreMisconfigured) as info:
                await call
            assert info.value.setting == "S3_BUCKET"
            assert "S3_BUCKET" in str(info.value) and s3_settings.bucket in str(info.value)


async def test_missing_key_is_missing_and_names_the_key(s3_settings: S3Settings) -> None:
    async with ObjectStore(s3_settings) as store:
        await store.ensure_bucket()
        await store.ping()
        with pytest.raises(ObjectMissing, match="images/P1/A01/s0/DNA/a.tif"):
            await store.get_bytes("images/P1/A01/s0/DNA/a.tif")
        with pytest.raises(ObjectMissing, match="images/none"):
            await store.head("images/none")
        await store.probe("images/none")  # a missing object is an answer


async def test_closed_port_is_transient(s3_settings: S3Settings) -> None:
    closed = replace(s3_settings, endpoint_url=f"http://127.0.0.1:{free_port()}")
    async with ObjectStore(closed, connect_timeout=1.0) as store:
        with pytest.raises(ObjectStoreError, match="unreachable"):
            await store.get_bytes("images/a.tif")
        with pytest.raises(ObjectStoreError):
            await store.ping()


async def test_malformed_endpoint_is_misconfigured_on_every_call(s3_settings: S3Settings) -> None:
    bad = replace(s3_settings, endpoint_url="not a url")
    async with ObjectStore(bad) as store:  # no crash: the service stays up and says why
        with pytest.raises(ObjectStoreMisconfigured, match="S3_ENDPOINT_URL") as info:
            await store.ping()
        assert info.value.setting == "S3_ENDPOINT_URL"


@pytest.fixture(scope="module")
def s3_with_auth() -> Iterator[str]:
    """A private S3 server that checks credentials (moto's IAM auth on)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.common.s3server", "--port", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_unknown_credentials_name_the_access_key_setting(s3_with_auth: str) -> None:
    settings = S3Settings(s3_with_auth, f"t-{uuid.uuid4().hex[:12]}", "us-east-1", "AKIAUNKNOWN0000", "nope")
    async with ObjectStore(settings) as store:
        # moto answers InvalidAccessKeyId (403) to a GET, a bare 403 to HeadBucket
        with pytest.raises(ObjectStoreMisconfigured) as info:
            await store.get_bytes("images/a.tif")
        assert info.value.setting == "AWS_ACCESS_KEY_ID"
        assert "InvalidAccessKeyId" in str(info.value) and "AKIAUNKNOWN0000" in str(info.value)
        assert "nope" not in str(info.value)  # never the secret
        with pytest.raises(ObjectStoreMisconfigured, match="AWS_ACCESS_KEY_ID"):
            await store.ping()
