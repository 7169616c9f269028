"""A report's plate QC: which map columns are controls and doses, the
statistics of every feature (services.reducer.qc), the gate's verdict and
the QC summary that goes into summary.json and qc.csv."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cellmesh.platemap import PlateMap

from services.reducer import qc

#: Features CalculateStatistics leaves out (by name, anywhere in it).
EXCLUDED = ("Location", "ModuleError", "ExecutionTime")
#: Features whose dose-response the QC page shows first when the report has
#: them: the nuclear/cytoplasmic GFP ratio of CellProfiler's translocation
#: example (BBBC013), then cell counts.
PREFERRED = ("Nuclei_Math_Ratio1", "Image_Mean_Nuclei_Math_Ratio1", "DistCytoplasm_Math_Ratio2")
TOP = 10
#: EC50 is fitted for this many features, the best by Z' (Nelder-Mead takes
#: about 20 ms a feature), plus the plotted ones.
EC50_FEATURES = 100


@dataclass(frozen=True)
class Gate:
    """A plate's QC gate (catalog QcGate)."""

    feature: str = ""
    min_z_prime: float | None = None
    max_failed_share: float | None = None
    control_column: str = ""
    dose_column: str = ""

    @classmethod
    def of(cls, value: Mapping[str, Any] | None) -> Gate:
        value = value or {}
        return cls(
            str(value.get("feature") or ""),
            None if value.get("min_z_prime") is None else float(value["min_z_prime"]),
            None if value.get("max_failed_share") is None else float(value["max_failed_share"]),
            str(value.get("control_column") or ""),
            str(value.get("dose_column") or ""),
        )


@dataclass
class PlateQc:
    """What the report says about the plate's quality."""

    summary: dict[str, Any]
    #: The per-feature table (qc.csv rows), best Z' first.
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: For the plots: the wells, values and the control and dose of each well.
    wells: list[str] = field(default_factory=list)
    values: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty((0, 0)))
    features: list[str] = field(default_factory=list)
    controls: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    doses: npt.NDArray[np.float64] | None = None
    fits: dict[str, list[float]] = field(default_factory=dict)
    #: The gate's verdict (catalog PlateQc), None when the plate has no gate.
    verdict: dict[str, Any] | None = None
    #: Features the QC page plots.
    plot_features: list[str] = field(default_factory=list)


def _column(platemap: PlateMap, asked: str, candidates: Sequence[str], what: str) -> str | None:
    if asked:
        name = asked if asked.startswith("Metadata_") else f"Metadata_{asked}"
        if name not in platemap.columns:
            raise qc.QcError(
                f"the plate map has no {what} column {asked!r} (it has {', '.join(platemap.columns)})"
            )
        return name
    lowered = {c.removeprefix("Metadata_").lower(): c for c in platemap.columns}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    return None


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def evaluate(
    wells: Sequence[str],
    values: npt.NDArray[np.float64],
    features: Sequence[str],
    platemap: PlateMap | None,
    gate: Gate | None,
    *,
    sites_reduced: int,
    missing: Sequence[Mapping[str, Any]],
) -> PlateQc:
    """The plate's QC from per-well values (wells x features). Never raises for
    what the map lacks: the summary says what was not computed and why."""
    by_state: dict[str, int] = {}
    for m in missing:
        by_state[str(m["state"])] = by_state.get(str(m["state"]), 0) + 1
    total = sites_reduced + len(missing)
    failed_share = len(missing) / total if total else 0.0
    summary: dict[str, Any] = {
        "sites_total": total,
        "sites_failed_or_missing": len(missing),
        "sites_failed_or_missing_by_state": dict(sorted(by_state.items())),
        "failed_share": failed_share,
        "statistics": "Z'-factor and V-factor as CellProfiler's CalculateStatistics computes them, "
        "from per-well values (mean over the well's sites; an object feature's site value is the "
        "mean of its objects' finite values)",
    }
    result = PlateQc(summary)
    keep = [i for i, f in enumerate(features) if not any(x in f for x in EXCLUDED)]
    features = [features[i] for i in keep]
    values = values[:, keep] if values.size else np.empty((len(wells), 0))
    z_of: dict[str, float] = {}
    if platemap is None:
        summary["computed"] = False
        summary["reason"] = "the plate has no plate map: register one (cellmesh platemap register)"
    else:
        try:
            control = _column(platemap, gate.control_column if gate else "", qc.CONTROL_COLUMNS, "control")
            dose = _column(platemap, gate.dose_column if gate else "", qc.DOSE_COLUMNS, "dose")
            if control is None:
                raise qc.QcError(
                    f"the plate map has no control column (columns: {', '.join(platemap.columns)}): "
                    "add one (e.g. control_type with negcon/poscon/trt) or name it in the QC gate"
                )
            mapped = [w for w in wells if w in platemap.wells]
            index = [list(wells).index(w) for w in mapped]
            sub = values[index]
            stats = qc.plate_statistics(
                mapped,
                sub,
                features,
                {w: platemap.wells[w].get(control, "") for w in mapped},
                None if dose is None else {w: platemap.wells[w].get(dose, "") for w in mapped},
                with_ec50=False,
            )
        except qc.QcError as exc:
            summary["computed"] = False
            summary["reason"] = str(exc)
        else:
            summary.update(
                computed=True,
                control_column=control,
                dose_column=dose,
                negative_control=stats.negative,
                positive_control=stats.positive,
                wells_negative=stats.wells_negative,
                wells_positive=stats.wells_positive,
                wells_dosed=stats.wells_dosed,
                features=len(features),
            )
            for i, f in enumerate(features):
                result.rows.append({"feature": f, "z_prime": stats.z_prime[i], "v_factor": stats.v_factor[i]})
                z_of[f] = float(stats.z_prime[i])
            result.rows.sort(key=lambda r: -r["z_prime"] if math.isfinite(r["z_prime"]) else math.inf)
            fitted = [f for f in (*PREFERRED, gate.feature if gate else "") if f in z_of]
            fitted = list(dict.fromkeys(fitted + [r["feature"] for r in result.rows[:EC50_FEATURES]]))
            d = qc.doses([platemap.wells[w].get(dose, "") for w in mapped]) if dose is not None else None
            if d is not None and len(np.unique(d[~np.isnan(d)])) > 1:
                at = {f: i for i, f in enumerate(features)}
                dosed = ~np.isnan(d)
                fits = qc.ec50(d[dosed], sub[dosed][:, [at[f] for f in fitted]])
                by_feature = {r["feature"]: r for r in result.rows}
                for f, (bottom, top, ec50, hill) in zip(fitted, fits, strict=True):
                    by_feature[f].update(ec50=ec50, bottom=bottom, top=top, hill=hill)
                    result.fits[f] = [float(bottom), float(top), float(ec50), float(hill)]
                summary["ec50_fitted_for"] = (
                    f"{len(fitted)} features: the best {EC50_FEATURES} by Z' and the plotted ones"
                )
            summary["top_z_prime"] = [
                {k: _number(v) if isinstance(v, float) else v for k, v in r.items()}
                for r in result.rows[:TOP]
            ]
            codes = qc.control_codes([platemap.wells.get(w, {}).get(control, "") for w in wells])
            result.wells, result.values, result.features = list(wells), values, features
            result.controls = codes
            if dose is not None:
                result.doses = qc.doses([platemap.wells.get(w, {}).get(dose, "") for w in wells])
            chosen = [f for f in PREFERRED if f in z_of]
            if gate and gate.feature and gate.feature in z_of:
                chosen.insert(0, gate.feature)
            chosen += [r["feature"] for r in result.rows[:3]]
            result.plot_features = list(dict.fromkeys(chosen))[:4]
            summary["plotted_features"] = result.plot_features
            for f in result.plot_features:
                if f in result.fits:
                    summary.setdefault("ec50", {})[f] = _number(result.fits[f][2])
    if gate is not None and (gate.min_z_prime is not None or gate.max_failed_share is not None):
        failures: list[str] = []
        z = None
        if gate.min_z_prime is not None:
            z = z_of.get(gate.feature)
            if z is None:
                why = summary.get("reason") or f"the report has no feature {gate.feature!r}"
                failures.append(f"Z' of {gate.feature} could not be computed: {why}")
            elif not math.isfinite(z) or z < gate.min_z_prime:
                failures.append(f"Z' of {gate.feature} is {z:.3g}, below {gate.min_z_prime:g}")
        if gate.max_failed_share is not None and failed_share > gate.max_failed_share:
            failures.append(
                f"{len(missing)} of {total} sites failed or are missing ({failed_share:.1%}), "
                f"more than {gate.max_failed_share:.1%}"
            )
        result.verdict = {
            "gated": True,
            "passed": not failures,
            "failures": failures,
            "z_prime": None if z is None or not math.isfinite(z) else z,
            "failed_share": failed_share,
        }
        summary["gate"] = {
            "feature": gate.feature,
            "min_z_prime": gate.min_z_prime,
            "max_failed_share": gate.max_failed_share,
            **result.verdict,
        }
    return result


def write_table(path: Path, result: PlateQc) -> None:
    """qc.csv: one row per feature, best Z' first."""
    columns = ["feature", "z_prime", "v_factor", "ec50", "bottom", "top", "hill"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        for row in result.rows:
            writer.writerow(
                [row["feature"]]
                + [
                    "" if c not in row or not math.isfinite(row[c]) else repr(float(row[c]))
                    for c in columns[1:]
                ]
            )
