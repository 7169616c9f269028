"""The page's HTTP side (aiohttp): static HTML/JS/CSS, a JSON API over
`MeshReader`, server-sent events of a plate's progress and well states, and
uploads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import grpc
from aiohttp import BodyPartReader, web
from cellmesh.client import CellmeshError

from services.web.mesh import MeshReader, progress_dict

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
READER: web.AppKey[MeshReader] = web.AppKey("reader", MeshReader)
#: The open event streams (each one's wake-up event) and whether the service stops.
STREAMS: web.AppKey[set[asyncio.Event]] = web.AppKey("streams", set)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)
_PLATE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_WELL = re.compile(r"^[A-Z]{1,2}\d{2,3}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: gRPC status -> HTTP status of the page's API.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.DATA_LOSS: 502,
}
#: A stream that ends with these is opened again by the browser (EventSource).
RECONNECT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
#: Server-sent events: a comment this often keeps proxies from closing the stream.
KEEPALIVE_S = 15.0
#: Well states are listed at most this often while sites change.
WELLS_EVERY_S = 0.5


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as JSON with a status and a message saying what to fix."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except CellmeshError as exc:
        return error(HTTP_STATUS.get(exc.code, 500), exc.code.name, exc.message)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/"):
            return error(exc.status, exc.reason, exc.text or exc.reason)
        raise


def _plate(request: web.Request) -> str:
    name = request.match_info["plate"]
    if not _PLATE.match(name):
        raise CellmeshError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"plate name {name!r} is not 1 to 64 letters, digits, '_', '-' or '.'",
        )
    return name


def _well(request: web.Request) -> str:
    well = request.match_info["well"].upper()
    if not _WELL.match(well):
        raise CellmeshError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"well {well!r} is not a row letter and a two-digit column (A01)",
        )
    return well


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def plates(request: web.Request) -> web.Response:
    return web.json_response({"plates": await request.app[READER].plates()})


async def plate(request: web.Request) -> web.Response:
    return web.json_response(await request.app[READER].plate(_plate(request)))


async def wells(request: web.Request) -> web.Response:
    return web.json_response(await request.app[READER].wells(_plate(request)))


async def well(request: web.Request) -> web.Response:
    return web.json_response(await request.app[READER].well(_plate(request), _well(request)))


async def report(request: web.Request) -> web.Response:
    return web.json_response(await request.app[READER].report(_plate(request)))


async def features(request: web.Request) -> web.Response:
    return web.json_response(await request.app[READER].features(_plate(request)))


async def thumbnail(request: web.Request) -> web.Response:
    plate_name, well_name = _plate(request), _well(request)
    site_text, channel = request.match_info["site"], request.match_info["channel"]
    if not site_text.isdigit() or not _CHANNEL.match(channel):
        raise CellmeshError(
            grpc.StatusCode.INVALID_ARGUMENT, "a thumbnail is /thumbnails/PLATE/WELL/SITE/CHANNEL.png"
        )
    png = await request.app[READER].thumbnail(plate_name, well_name, int(site_text), channel)
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "max-age=3600"})


async def upload(request: web.Request) -> web.Response:
    """A multipart form: `pattern`, `channel_map`, `site`, `token` (or an
    `Authorization: Bearer` header; needed with AUTH=on) and the files."""
    plate_name = _plate(request)
    if not request.content_type.startswith("multipart/"):
        raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, "send the files as multipart/form-data")
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, "nested multipart bodies are not taken")
        data = await part.read()
        if part.filename:
            files.append((part.filename, bytes(data)))
        else:
            fields[part.name or ""] = bytes(data).decode(errors="replace")
    site_text = fields.get("site", "0").strip() or "0"
    if not site_text.isdigit():
        raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, f"site {site_text!r} is not a number 0 or more")
    if not fields.get("pattern"):
        raise CellmeshError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "give the file name pattern, e.g. _(?P<Well>[A-P]\\d{2})f(?P<Site>\\d{2})d(?P<Channel>\\d)",
        )
    token = fields.get("token", "").strip()
    header = request.headers.get("Authorization", "")
    if not token and header.lower().startswith("bearer "):
        token = header[7:].strip()
    result = await request.app[READER].upload(
        plate_name, files, fields["pattern"], fields.get("channel_map", ""), int(site_text), token
    )
    return web.json_response(dataclasses.asdict(result))


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `progress` (counts) and `wells` (every well's
    state) now and at each change the catalog's WatchPlateProgress reports;
    `complete` once the report of the latest results is registered, then
    the stream ends."""
    reader = request.app[READER]
    plate_name = _plate(request)
    await reader.client.get_plate(plate_name)  # 404 before the stream starts
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    changed = asyncio.Event()
    streams = request.app[STREAMS]
    streams.add(changed)
    latest: dict[str, Any] = {}
    done = asyncio.Event()

    async def watch() -> None:
        try:
            async for p in reader.client.watch(plate_name):
                latest["progress"] = progress_dict(p)
                changed.set()
                if p.complete:
                    break
        except CellmeshError as exc:
            latest["error"] = exc
            changed.set()
        done.set()
        changed.set()

    watcher = asyncio.create_task(watch())
    try:
        last_wells: Any = None
        last_sent = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            if not changed.is_set():
                await response.write(b": keepalive\n\n")
                continue
            changed.clear()
            if request.app[CLOSING].is_set():
                break  # the service stops: the browser reconnects to another one
            if "error" in latest:
                exc = latest.pop("error")
                if exc.code not in RECONNECT:
                    await response.write(_event("failure", {"code": exc.code.name, "error": exc.message}))
                break  # after a passing fault the browser's EventSource connects again
            if "progress" in latest:
                await response.write(_event("progress", latest["progress"]))
                try:
                    wells_now = await reader.wells(plate_name)
                except CellmeshError as exc:
                    log.warning("listing the wells of %s: %s", plate_name, exc)
                    break
                if wells_now != last_wells:
                    await response.write(_event("wells", wells_now))
                    last_wells = wells_now
            if done.is_set():
                if latest.get("progress", {}).get("complete"):
                    await response.write(_event("complete", latest["progress"]))
                break
            # Coalesce bursts of changes into one listing of the wells.
            wait = WELLS_EVERY_S - (time.monotonic() - last_sent)
            if wait > 0:
                await asyncio.sleep(wait)
            last_sent = time.monotonic()
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        streams.discard(changed)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return response


async def _close_streams(app: web.Application) -> None:
    app[CLOSING].set()
    open_streams: set[asyncio.Event] = app[STREAMS]
    for changed in tuple(open_streams):
        changed.set()


def make_app(reader: MeshReader, max_upload_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=max_upload_bytes)
    app[READER] = reader
    streams: set[asyncio.Event] = set()
    app[STREAMS] = streams
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/", page)
    app.router.add_get("/plates/{plate}", page)
    app.router.add_get("/plates/{plate}/wells/{well}", page)
    app.router.add_get("/api/plates", plates)
    app.router.add_get("/api/plates/{plate}", plate)
    app.router.add_get("/api/plates/{plate}/wells", wells)
    app.router.add_get("/api/plates/{plate}/wells/{well}", well)
    app.router.add_get("/api/plates/{plate}/report", report)
    app.router.add_get("/api/plates/{plate}/features", features)
    app.router.add_get("/api/plates/{plate}/events", events)
    app.router.add_post("/api/plates/{plate}/upload", upload)
    app.router.add_get("/thumbnails/{plate}/{well}/{site}/{channel}.png", thumbnail)
    app.router.add_static("/static/", STATIC, append_version=True)
    return app
