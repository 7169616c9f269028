"""The project's own S3-compatible server for local runs and tests: moto's
server mode on loopback (in memory). `python -m services.common.s3server --port N`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from services.common import logs

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an S3-compatible server on loopback (moto).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    logs.configure("INFO", "s3server")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    log.info("S3-compatible server on http://%s:%d", args.host, args.port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
