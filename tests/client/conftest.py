"""Fixtures for the client's tests: the fake catalog on a real gRPC server,
and a fresh bucket on the project's S3 server for the client to use."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from cellmesh.client import ObjectStore, ObjectStoreConfig

from services.common.settings import S3Settings
from tests.client.fake_catalog import ServerThread, serve


@pytest.fixture
def mesh() -> Iterator[ServerThread]:
    """The fake catalog and reducer, serving on loopback."""
    yield from serve()


@pytest.fixture
def store_config(s3_settings: S3Settings) -> ObjectStoreConfig:
    """The client's view of a fresh bucket on the test S3 server (created)."""
    config = ObjectStoreConfig(
        bucket=s3_settings.bucket,
        endpoint_url=s3_settings.endpoint_url,
        region=s3_settings.region,
        access_key=s3_settings.access_key,
        secret_key=s3_settings.secret_key,
    )

    async def create() -> None:
        async with ObjectStore(config) as store:
            await store.ensure_bucket()

    asyncio.run(create())
    return config


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, store_config: ObjectStoreConfig) -> ObjectStoreConfig:
    """The same bucket, given to the command line through its environment."""
    monkeypatch.setenv("S3_ENDPOINT_URL", store_config.endpoint_url or "")
    monkeypatch.setenv("S3_BUCKET", store_config.bucket)
    monkeypatch.setenv("S3_REGION", store_config.region)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store_config.access_key or "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store_config.secret_key or "")
    return store_config
