"""Logging, configured in one place for every service."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO", service: str = "cellmesh") -> None:
    """Sends log records to stderr as one line each, with the service's name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO.
    for name in ("pika", "botocore", "aiobotocore", "urllib3", "asyncio", "werkzeug"):
        logging.getLogger(name).setLevel(logging.WARNING)
