"""Where everything lives in the object store: the one home of the key layout.

Every service and the client build keys here, and the catalog refuses a key
that lies outside the scope it belongs to (an image outside its plate, a
result outside its site, a report outside its run):

    images/<plate>/<well>/s<site>/<channel>/<file name>      an image (ingest)
    pipelines/<sha256>.cppipe                                a pipeline
    attachments/<sha256>                                     a pipeline's file
    results/<plate>/<pipeline[:12]>/<well>/s<site>/a<attempt>-<execution>/<file>
    results/<plate>/<pipeline[:12]>/plate/a<attempt>-<execution>/<file>   a plate stage
    reports/<plate>/<pipeline[:12]>/g<generation>/…          a report
    reports/<plate>/<pipeline[:12]>/ondemand-<UTC time>/…    a report asked for

A result key carries its execution, so two executions of one site never
write the same object, and a registered object never changes.
"""

from __future__ import annotations

IMAGES = "images/"
RESULTS = "results/"
REPORTS = "reports/"
ATTACHMENTS = "attachments/"
PIPELINES = "pipelines/"
STAGE = "plate"  # the "well" part of a plate stage's result keys


def image_key(plate: str, well: str, site: int, channel: str, file_name: str) -> str:
    return f"{plate_images(plate)}{well}/s{site}/{channel}/{file_name}"


def plate_images(plate: str) -> str:
    """The prefix every image of a plate lies under."""
    return f"{IMAGES}{plate}/"


def pipeline_key(sha256: str) -> str:
    return f"{PIPELINES}{sha256}.cppipe"


def attachment_key(sha256: str) -> str:
    return f"{ATTACHMENTS}{sha256}"


def site_results(plate: str, pipeline_sha256: str, well: str, site: int) -> str:
    """The prefix every result of one site's runs with one pipeline lies under."""
    return f"{RESULTS}{plate}/{pipeline_sha256[:12]}/{well}/s{site}/"


def stage_results(plate: str, pipeline_sha256: str) -> str:
    """The prefix every result of a plate stage's runs lies under."""
    return f"{RESULTS}{plate}/{pipeline_sha256[:12]}/{STAGE}/"


def execution_results(prefix: str, attempt: int, execution: str) -> str:
    """One execution's own folder under a site's (or a stage's) prefix."""
    return f"{prefix}a{attempt}-{execution}"


def run_reports(plate: str, pipeline_sha256: str) -> str:
    """The prefix every report of one plate run lies under."""
    return f"{REPORTS}{plate}/{pipeline_sha256[:12]}/"


def outside(key: str, prefix: str) -> bool:
    """True if `key` does not lie under `prefix` (no `..` tricks: keys with
    `.`/`..` segments are refused by validation before this)."""
    return not key.startswith(prefix) or len(key) == len(prefix)
