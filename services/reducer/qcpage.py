"""The report's QC page: dose-response and position-effect plots, a heatmap
per plotted feature (wells labelled from the plate map) and ``qc.html``, one
page with the QC summary, the gate's verdict, the failed and missing sites
and every QC plot (plain HTML, images by relative name, so it opens from a
report folder or through presigned URLs alike)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cellmesh.platemap import PlateMap

from services.reducer import plots
from services.reducer.qcreport import PlateQc

if TYPE_CHECKING:
    from services.reducer.reduce import OutputFile, ReduceOutputs


def _class(code: float, negative: float, positive: float) -> str:
    if code != code:
        return ""
    if code == negative:
        return "negative"
    if code == positive:
        return "positive"
    return "sample"


def well_labels(platemap: PlateMap | None, result: PlateQc | None) -> dict[str, str]:
    """A short tag per well for the heatmaps: "neg"/"pos" for controls, else
    "d<dose>" when the map gives doses."""
    if platemap is None or result is None or not result.summary.get("computed"):
        return {}
    control, dose = result.summary.get("control_column"), result.summary.get("dose_column")
    neg, pos = result.summary["negative_control"], result.summary["positive_control"]
    out: dict[str, str] = {}
    from services.reducer import qc

    for well, values in platemap.wells.items():
        code = qc.control_codes([values.get(control, "")])[0] if control else math.nan
        kind = _class(code, neg, pos)
        if kind in ("negative", "positive"):
            out[well] = kind[:3]
        elif dose and values.get(dose, ""):
            out[well] = f"d{values[dose]}"
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:120]


def draw(
    outputs: ReduceOutputs,
    result: PlateQc,
    shape: tuple[int, int] | None,
    subtitle: str,
    labels: Mapping[str, str],
) -> list[OutputFile]:
    from services.reducer.reduce import FileKind, OutputFile

    files: list[OutputFile] = []
    images: list[tuple[str, str]] = []

    def save(name: str, fig: Any, caption: str) -> None:
        path = outputs.out_dir / name
        path.write_bytes(plots.png_bytes(fig))
        files.append(OutputFile(name, FileKind.QC_PLOT_PNG, path))
        images.append((name, caption))

    s = result.summary
    grid = shape or plots.infer_shape(result.wells or outputs.wells)
    if s.get("computed"):
        index = {f: i for i, f in enumerate(result.features)}
        classes = [_class(c, s["negative_control"], s["positive_control"]) for c in result.controls]
        for feature in result.plot_features:
            column = result.values[:, index[feature]]
            z = next((r["z_prime"] for r in result.rows if r["feature"] == feature), math.nan)
            if result.doses is not None:
                fig = plots.dose_response(
                    result.doses,
                    column,
                    classes,
                    result.fits.get(feature),
                    title=f"{outputs.plate} — dose-response of {feature} (Z' {z:.3g})\n{subtitle}",
                    feature=feature,
                    dose_label=str(s["dose_column"]),
                )
                save(f"qc_dose_response_{_safe(feature)}.png", fig, f"Dose-response of {feature}")
            values = {w: float(v) for w, v in zip(result.wells, column, strict=True)}
            fig = plots.position_effects(
                values,
                title=f"{outputs.plate} — position effects of {feature}\n{subtitle}",
                feature=feature,
                shape=grid,
            )
            save(f"qc_positions_{_safe(feature)}.png", fig, f"Per-row and per-column trends of {feature}")
            fig = plots.plate_heatmap(
                values,
                title=f"{outputs.plate} — {feature} per well\n{subtitle}",
                label=f"{feature} (mean over the well's sites)",
                wells_with_missing=list(outputs.missing_per_well),
                shape=shape,
                value_format="{:.3g}",
                robust=True,
                well_labels=labels,
            )
            save(f"qc_heatmap_{_safe(feature)}.png", fig, f"{feature} across the plate")
    page = outputs.out_dir / "qc.html"
    page.write_text(_page(outputs, result, images), encoding="utf-8")
    files.append(OutputFile(page.name, FileKind.QC_PAGE, page))
    return files


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _page(outputs: ReduceOutputs, result: PlateQc, images: list[tuple[str, str]]) -> str:
    s = result.summary
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>QC — {e(outputs.plate)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "th{background:#eee}.fail{color:#b00;font-weight:bold}.pass{color:#070;font-weight:bold}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}</style></head><body>",
        f"<h1>Plate QC — {e(outputs.plate)}</h1>",
    ]
    gate = s.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        parts.append(f"<p>QC gate: <span class='{'pass' if gate['passed'] else 'fail'}'>{verdict}</span></p>")
        if gate["failures"]:
            parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in gate["failures"]) + "</ul>")
    else:
        parts.append("<p>No QC gate is set for this plate.</p>")
    parts.append(
        f"<p>Sites: {s['sites_total']} in all, {s['sites_failed_or_missing']} failed or missing "
        f"({s['failed_share']:.1%})"
        + (
            ": " + ", ".join(f"{e(k.lower())} {v}" for k, v in s["sites_failed_or_missing_by_state"].items())
            if s["sites_failed_or_missing_by_state"]
            else ""
        )
        + ".</p>"
    )
    missing = outputs.summary.get("missing_sites") or []
    if missing:
        parts.append(
            "<details><summary>Failed and missing sites</summary><table><tr><th>well</th><th>site</th>"
            "<th>state</th><th>reason</th></tr>"
        )
        parts += [
            f"<tr><td>{e(m['well'])}</td><td>{m['site']}</td><td>{e(m['state'])}</td>"
            f"<td style='text-align:left'>{e(m['reason'])}</td></tr>"
            for m in missing[:500]
        ]
        parts.append("</table></details>")
    if s.get("computed"):
        parts.append(
            f"<p>Controls from <code>{e(s['control_column'])}</code>: negative = {_fmt(s['negative_control'])} "
            f"({s['wells_negative']} wells), positive = {_fmt(s['positive_control'])} ({s['wells_positive']} wells)"
            + (
                f"; doses from <code>{e(s['dose_column'])}</code> ({s['wells_dosed']} wells)"
                if s["dose_column"]
                else ""
            )
            + f". {e(s['statistics'])}. Every feature is in <a href='qc.csv'>qc.csv</a>.</p>"
        )
        parts.append(
            "<h2>Best Z'-factors</h2><table><tr><th>feature</th><th>Z'</th><th>V</th><th>EC50</th></tr>"
        )
        for r in result.rows[:10]:
            parts.append(
                f"<tr><td style='text-align:left'>{e(r['feature'])}</td><td>{_fmt(r['z_prime'])}</td>"
                f"<td>{_fmt(r['v_factor'])}</td><td>{_fmt(r.get('ec50', math.nan))}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append(f"<p>Z' and V-factors were not computed: {e(s.get('reason', ''))}</p>")
    for name, caption in images:
        parts.append(f"<h3>{e(caption)}</h3><img src='{e(name)}' alt='{e(caption)}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


__all__ = ["draw", "well_labels"]
