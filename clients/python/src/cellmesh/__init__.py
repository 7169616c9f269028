"""cellmesh client: the generated gRPC stubs (`cellmesh.<domain>.v1`), a typed
client (`cellmesh.client`), folder ingest (`cellmesh.ingest`) and the
`cellmesh` command-line tool (`cellmesh.cli`).

`from cellmesh import CellmeshClient, CellmeshError, ObjectStore, ObjectStoreConfig, PlateLayout`.
The names are loaded on first use, so importing only the stubs stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cellmesh.catalog.v1.catalog_pb2 import PlateLayout
    from cellmesh.client import CellmeshClient, CellmeshError, ObjectStore, ObjectStoreConfig

__all__ = ["CellmeshClient", "CellmeshError", "ObjectStore", "ObjectStoreConfig", "PlateLayout"]

_WHERE = {
    "CellmeshClient": "cellmesh.client",
    "CellmeshError": "cellmesh.client",
    "ObjectStore": "cellmesh.client",
    "ObjectStoreConfig": "cellmesh.client",
    "PlateLayout": "cellmesh.catalog.v1.catalog_pb2",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'cellmesh' has no attribute {name!r}")
