"""`python -m services.web`: reads settings, wires, serves until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import botocore.session
from aiohttp import web
from cellmesh.client import CellmeshClient, CellmeshError, ObjectStore, ObjectStoreConfig

from services.common import channels, logs
from services.common.backoff import Backoff
from services.common.server import GrpcServer, stop_event_on_signals
from services.web.app import make_app
from services.web.mesh import MeshReader
from services.web.settings import WebSettings

log = logging.getLogger("services.web")


def presigner(settings: WebSettings) -> Any:
    """An S3 client that only signs download links for browsers (it makes no
    calls), addressed as the browsers reach the store."""
    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=settings.s3_public_endpoint_url or None,
        region_name=settings.s3.region,
        aws_access_key_id=settings.s3.access_key,
        aws_secret_access_key=settings.s3.secret_key,
    )


def uploader(settings: WebSettings) -> Callable[[str], CellmeshClient] | None:
    """With AUTH=on, uploads register images as the user whose token came with
    them (over the web service's certificate, which may only read): a client
    per upload. None with AUTH=off: the page's own client registers them."""
    auth = settings.auth
    if auth is None:
        return None

    def client_for(token: str) -> CellmeshClient:
        return CellmeshClient(
            settings.catalog_addr,
            None,
            timeout=settings.call_timeout,
            credentials=dataclasses.replace(auth.client(), token=token),
        )

    return client_for


async def main(settings: WebSettings) -> None:
    stop = stop_event_on_signals()
    store_config = ObjectStoreConfig(
        bucket=settings.s3.bucket,
        endpoint_url=settings.s3.endpoint_url,
        region=settings.s3.region,
        access_key=settings.s3.access_key,
        secret_key=settings.s3.secret_key,
    )
    client = CellmeshClient(
        settings.catalog_addr,
        settings.reducer_addr or None,
        timeout=settings.call_timeout,
        channel=channels.channel(settings.catalog_addr, settings.auth),
        reducer_channel=channels.channel(settings.reducer_addr, settings.auth)
        if settings.reducer_addr
        else None,
    )
    health = GrpcServer(
        [], settings.grpc_host, settings.grpc_port, settings.grace_seconds, auth=settings.auth
    )
    async with client, ObjectStore(store_config) as store:
        reader = MeshReader(
            client,
            store,
            presigner(settings),
            settings.cache_dir,
            thumbnail_px=settings.thumbnail_px,
            presign_seconds=settings.presign_seconds,
            uploader=uploader(settings),
        )
        runner = web.AppRunner(
            make_app(reader, settings.max_upload_bytes),
            access_log=None,
            shutdown_timeout=settings.grace_seconds,
        )
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
        await health.start()
        log.info("web page on http://%s:%d/", settings.http_host, settings.http_port)
        try:
            # SERVING once the catalog answers.
            backoff = Backoff(first_delay=0.2, max_delay=5.0).schedule()
            while not stop.is_set():
                try:
                    await client.list_plates()
                    break
                except CellmeshError as exc:
                    log.warning("the catalog does not answer yet: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff.next())
            await health.set_serving(True)
            await stop.wait()
        finally:
            await health.stop()
            await runner.cleanup()


if __name__ == "__main__":
    values = WebSettings.from_env()
    logs.configure(values.log_level, "web")
    asyncio.run(main(values))
