"""The catalog's domain: errors, states and the plain values the store takes
and returns. Nothing here knows about protobuf or SQL."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Any


class CatalogError(Exception):
    """Base of the errors a caller can act on; the message says what to fix."""


class NotFound(CatalogError):
    pass


class AlreadyExists(CatalogError):
    pass


class InvalidArgument(CatalogError):
    pass


class FailedPrecondition(CatalogError):
    pass


class PermissionDenied(CatalogError):
    """The caller's role may call the RPC, but not on this object."""


class Unavailable(CatalogError):
    """The database does not answer; the call may be retried."""


class SiteState(IntEnum):
    """The integers of `cellmesh.common.v1.SiteState`."""

    WAITING = 1
    READY = 2
    CLAIMED = 3
    QUEUED = 4
    RUNNING = 5
    DONE = 6
    FAILED = 7


SETTLED = (SiteState.DONE, SiteState.FAILED)
IN_FLIGHT = (SiteState.CLAIMED, SiteState.QUEUED, SiteState.RUNNING)


class Scope(IntEnum):
    """The integers of `cellmesh.common.v1.PipelineScope`."""

    SITE = 1
    PLATE = 2


class Gate(IntEnum):
    """Whether a run's jobs may run, given the plate-scope stages before it."""

    HELD = 0  # an earlier plate stage is not done: its artifacts do not exist yet
    OPEN = 1  # every earlier plate stage is done (or there is none)
    BROKEN = 2  # an earlier plate stage failed for good: nothing of this run can run


class FailureClass(IntEnum):
    """The integers of `cellmesh.common.v1.FailureClass`."""

    UNSPECIFIED = 0
    INPUT_PROBLEM = 1
    TRANSIENT = 2
    CP_PROBLEM = 3
    TIMEOUT = 4
    OUTPUT_PROBLEM = 5
    BAD_TASK = 6


class Outcome(IntEnum):
    """The integers of `cellmesh.catalog.v1.RegistrationOutcome`."""

    CREATED = 1
    UNCHANGED = 2
    REPLACED = 3


class Decision(IntEnum):
    """The integers of `cellmesh.catalog.v1.StartDecision`."""

    RUN = 1
    SKIP_DONE = 2
    SKIP_STALE = 3


@dataclass(frozen=True)
class InputFile:
    """A file placed in a run's Default Input Folder under `name`."""

    name: str
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PipelineInfo:
    sha256: str
    key: str
    name: str
    modules: list[str]
    image_names: list[str]
    tables: list[str]
    table_files: list[str]
    created_at: datetime
    attachments: list[InputFile] = field(default_factory=list)
    content_sha256: str = ""
    """The .cppipe's own SHA-256; empty when it is `sha256` (no attachments)."""
    stage_inputs: list[str] = field(default_factory=list)
    """Files it reads that an earlier plate stage writes (not attached)."""
    scope: Scope = Scope.SITE
    scope_reasons: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    """The metadata keys its Groups module groups image sets by."""


@dataclass(frozen=True)
class Layout:
    rows: int
    columns: int
    sites_per_well: int
    first_site: int
    wells: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlateInfo:
    name: str
    channels: list[str]
    layout: Layout | None
    sites_known: bool
    acquisition_finished: bool
    pipelines: list[str]
    reduce_with_failures: bool
    created_at: datetime
    image_count: int
    # Who created the plate ("" when not known).
    created_by: str = ""
    #: The plate map as stored (`store._platemap_json`), or None.
    plate_map: dict[str, Any] | None = None
    #: The QC gate as stored ({"feature", "min_z_prime", "max_failed_share",
    #: "control_column", "dose_column"}), or None.
    qc_gate: dict[str, Any] | None = None


@dataclass(frozen=True)
class SiteKey:
    plate: str
    well: str
    site: int


@dataclass(frozen=True)
class ImageIn:
    """One image to register."""

    plate: str
    well: str
    site: int
    channel: str
    key: str
    size: int
    sha256: str
    file_name: str
    replace: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The site's other metadata (see ImageRegistration.metadata)."""


@dataclass(frozen=True)
class ImageInfo:
    plate: str
    well: str
    site: int
    channel: str
    key: str
    size: int
    sha256: str
    file_name: str
    registered_at: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Its site's metadata."""


@dataclass(frozen=True)
class SiteClaim:
    site_job_id: int
    attempt: int
    site: SiteKey
    images: list[ImageInfo]
    pipeline_sha256: str
    pipeline_key: str
    expected_tables: list[str]
    pipeline_content_sha256: str = ""
    scope: Scope = Scope.SITE
    input_files: list[InputFile] = field(default_factory=list)
    """Files for the Default Input Folder (the pipeline's attachments, then
    the artifacts of the plate stages before it): `name` is the path there."""


@dataclass(frozen=True)
class ResultFile:
    name: str
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Provenance:
    cellprofiler_version: str = ""
    pipeline_sha256: str = ""
    input_sha256: list[str] = field(default_factory=list)
    worker_id: str = ""
    download_seconds: float = 0.0
    run_seconds: float = 0.0
    upload_seconds: float = 0.0
    object_counts: dict[str, int] = field(default_factory=dict)
    mode: str = ""


@dataclass(frozen=True)
class SiteJobInfo:
    id: int
    site: SiteKey
    pipeline_sha256: str
    state: SiteState
    attempt: int
    failure_class: FailureClass
    failure_reason: str
    worker_id: str
    ready_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    results: list[ResultFile]
    provenance: Provenance | None
    execution_id: str = ""
    scope: Scope = Scope.SITE
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FailResult:
    will_retry: bool
    next_attempt: int
    state: SiteState


@dataclass(frozen=True)
class Progress:
    plate: str
    pipeline_sha256: str
    total: int
    waiting: int
    ready: int
    queued: int
    running: int
    done: int
    failed: int
    report_version: int
    complete: bool
    reduce_failed: bool = False
    reduce_failure_reason: str = ""


@dataclass(frozen=True)
class RunClaim:
    plate: str
    pipeline_sha256: str
    pipeline_key: str
    generation: int


@dataclass(frozen=True)
class ReportFile:
    name: str
    kind: int
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class MissingSite:
    well: str
    site: int
    state: SiteState | None
    reason: str


@dataclass(frozen=True)
class Report:
    plate: str
    pipeline_sha256: str
    generation: int
    files: list[ReportFile]
    wells: int
    sites: int
    missing_sites: list[MissingSite]
    version: int = 0
    created_at: datetime | None = None
    #: The QC verdict ({"gated", "passed", "failures", "z_prime", "failed_share"}), or None.
    qc: dict[str, Any] | None = None


PIPELINE_MANIFEST_HEADER = "cellmesh pipeline v1"


def pipeline_sha256(content_sha256: str, attachments: list[InputFile]) -> str:
    """A pipeline's identity. Without attachments, the .cppipe's own SHA-256
    (so every pipeline registered before attachments keeps its SHA). With
    attachments, the SHA-256 of this UTF-8 manifest, one line each, ending in
    a newline, attachments sorted by name::

        cellmesh pipeline v1
        cppipe <the .cppipe's SHA-256>
        attachment <its SHA-256> <its name>

    The same .cppipe with other attachments, or the same files under other
    names, is another pipeline."""
    if not attachments:
        return content_sha256
    lines = [PIPELINE_MANIFEST_HEADER, f"cppipe {content_sha256}"]
    lines += [f"attachment {a.sha256} {a.name}" for a in sorted(attachments, key=lambda a: a.name)]
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode("utf-8")).hexdigest()
