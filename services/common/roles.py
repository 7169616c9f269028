"""Who may call what: the one table of every RPC of every service and the
roles allowed to call it.

Roles come from the caller's credentials (services/common/auth.py): a
service's certificate names its role (`OU=scheduler`), a user's token or
certificate one of the user roles:

- *viewer* reads (plates, pipelines, images, sites, progress, reports, status);
- *scientist* also registers pipelines, plates and images, finishes
  acquisitions and asks for a reduce, and requeues the plates they created
  (the catalog checks the plate's creator: `OWN_PLATES_ONLY`);
- *operator* may call everything.

An RPC missing from `RPC_ROLES` is refused to everyone
(`tests/security/test_role_table.py` fails when a service has one). To add
an RPC or a service, add its full name here with the roles that may call it.
gRPC health is open to every caller that passes TLS (a certificate of the
mesh's CA); reflection to every such caller whose token, if it sends one, is
known.
"""

from __future__ import annotations

#: The mesh's services; each holds a certificate with its role.
SERVICE_ROLES = ("catalog", "scheduler", "cpworker", "reducer", "autoscaler", "web")
#: The roles a user's token or certificate gives.
USER_ROLES = ("viewer", "scientist", "operator")
#: A certificate of this role proves only that its holder may connect; the
#: caller's role then comes from its token (a lab machine's shared
#: certificate, a web front end passing its user's token on).
CLIENT_ROLE = "client"
ALL_ROLES = (*SERVICE_ROLES, *USER_ROLES)

OPERATOR = "operator"

#: Read-only calls: every user role and every service.
READ = frozenset({"viewer", "scientist", "operator", *SERVICE_ROLES})
#: What a scientist does with their plates.
WRITE = frozenset({"scientist", "operator"})
#: Roles that may requeue only the plates they created (the catalog checks it).
OWN_PLATES_ONLY = frozenset({"scientist"})


def _only(*roles: str) -> frozenset[str]:
    return frozenset({OPERATOR, *roles})


CATALOG = "/cellmesh.catalog.v1.CatalogService/"
SCHEDULER = "/cellmesh.scheduler.v1.SchedulerService/"
WORKER = "/cellmesh.worker.v1.WorkerService/"
REDUCER = "/cellmesh.reducer.v1.ReducerService/"

#: Full method name (as gRPC gives it: /package.Service/Method) -> roles allowed.
RPC_ROLES: dict[str, frozenset[str]] = {
    # Catalog: what users read.
    CATALOG + "GetPipeline": READ,
    CATALOG + "ListPipelines": READ,
    CATALOG + "GetPlate": READ,
    CATALOG + "ListPlates": READ,
    CATALOG + "ListImages": READ,
    CATALOG + "ListSites": READ,
    CATALOG + "GetPlateProgress": READ,
    CATALOG + "WatchPlateProgress": READ,
    CATALOG + "GetPlateReport": READ,
    # Catalog: what scientists do.
    CATALOG + "RegisterPipeline": WRITE,
    CATALOG + "CreatePlate": WRITE,
    CATALOG + "SetPlateMap": WRITE,
    CATALOG + "FinishAcquisition": WRITE,
    CATALOG + "AddPlatePipeline": WRITE,
    CATALOG + "RegisterImages": WRITE,
    CATALOG + "RequeueSites": WRITE,
    # Catalog: the mesh's own work.
    CATALOG + "ClaimReadySites": _only("scheduler"),
    CATALOG + "MarkSitesQueued": _only("scheduler"),
    CATALOG + "ClaimReducibleRuns": _only("scheduler"),
    CATALOG + "MarkRunsQueued": _only("scheduler"),
    CATALOG + "StartSiteJob": _only("cpworker"),
    CATALOG + "RenewSiteLease": _only("cpworker"),
    CATALOG + "CompleteSiteJob": _only("cpworker"),
    # The scheduler records dead-lettered tasks as failed.
    CATALOG + "FailSiteJob": _only("cpworker", "scheduler"),
    CATALOG + "RegisterPlateReport": _only("reducer"),
    # Status of the other services.
    SCHEDULER + "GetSchedulerStatus": READ,
    WORKER + "GetWorkerStatus": READ,
    # A report of what is done so far, now (`cellmesh reduce`).
    REDUCER + "ReducePlate": WRITE,
}

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def allowed(method: str) -> frozenset[str] | None:
    """The roles that may call `method`, None when the table does not know it."""
    return RPC_ROLES.get(method)
