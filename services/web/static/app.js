"use strict";
// cellmesh's page: plain JavaScript, no build step. Everything it shows comes
// from the web service's JSON API and its server-sent events.

const STATES = ["waiting", "ready", "queued", "running", "done", "failed"];
const main = document.getElementById("main");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

async function api(path, options) {
  const reply = await fetch(path, options);
  const body = await reply.json().catch(() => ({ error: reply.statusText }));
  if (!reply.ok) throw new Error(`${body.code || reply.status}: ${body.error || reply.statusText}`);
  return body;
}

function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.01 ? v.toExponential(3) : v.toFixed(4);
}

function bar(p) {
  const total = Math.max(p.total, 1);
  return el("span", { class: "bar", title: `${p.done} done, ${p.failed} failed of ${p.total}` },
    el("span", { style: `width:${(100 * p.done) / total}%;background:var(--done)` }),
    el("span", { style: `width:${(100 * p.failed) / total}%;background:var(--failed)` }),
    el("span", { style: `width:${(100 * p.running) / total}%;background:var(--running)` }));
}

function counts(p) {
  return el("div", { class: "counts", id: "counts" },
    ...STATES.map((s) => el("span", { class: `count-${s}` }, `${s} ${p[s]}`)),
    el("span", {}, `of ${p.total}`),
    p.report_version ? el("span", { id: "report-version" }, `report v${p.report_version}`) : null,
    p.reduce_failed ? el("span", { class: "error" }, `reduce failed: ${p.reduce_failure_reason}`) : null);
}

// The plates.

let platesTimer = null;
async function showPlates() {
  document.getElementById("crumbs").textContent = "";
  const render = async () => {
    let data;
    try { data = await api("/api/plates"); } catch (e) { fill(main, el("p", { class: "error" }, e.message)); return; }
    const rows = data.plates.map((p) => el("tr", { dataset: { plate: p.name } },
      el("td", {}, el("a", { href: `/plates/${encodeURIComponent(p.name)}` }, p.name)),
      el("td", {}, p.channels.join(", ")),
      el("td", {}, p.progress ? bar(p.progress) : ""),
      el("td", { class: "num" }, p.progress ? `${p.progress.done + p.progress.failed}/${p.progress.total}` : ""),
      el("td", {}, p.progress && p.progress.report_version ? `v${p.progress.report_version}` : ""),
      el("td", { class: "num" }, p.image_count)));
    fill(main, el("h1", {}, "Plates"),
      rows.length ? el("table", { id: "plates" },
        el("tr", {}, ...["plate", "channels", "progress", "settled", "report", "images"].map((h) => el("th", {}, h))), rows)
        : el("p", { class: "muted" }, "No plates yet: `cellmesh plate create` makes one."));
  };
  await render();
  platesTimer = setInterval(render, 2000);
}

// One plate.

const view = { plate: null, wells: null, colour: "state", features: null, source: null, selected: null };

async function showPlate(name, well) {
  view.plate = name;
  document.getElementById("crumbs").textContent = ` / ${name}`;
  let plate;
  try { plate = await api(`/api/plates/${encodeURIComponent(name)}`); }
  catch (e) { fill(main, el("p", { class: "error" }, e.message)); return; }
  const select = el("select", { id: "colour-by", onchange: () => { view.colour = select.value; drawMap(); } },
    el("option", { value: "state" }, "state"));
  fill(main, 
    el("h1", {}, `Plate ${plate.name}`),
    el("p", { class: "muted" }, `channels ${plate.channels.join(", ")}`,
      plate.sites_per_well ? ` · ${plate.sites_per_well} site(s) per well` : "",
      ` · pipeline ${plate.pipelines.map((p) => p.slice(0, 12)).join(" → ")}`),
    plate.progress ? counts(plate.progress) : el("div", { id: "counts" }),
    el("div", { class: "layout" },
      el("div", {},
        el("label", {}, "colour wells by ", select),
        el("div", { id: "plate-map" }),
        el("div", { id: "legend", class: "legend" })),
      el("div", { id: "well-panel" }, el("p", { class: "muted" }, "Click a well to see its sites."))),
    el("section", { id: "report" }, el("h2", {}, "Report"), el("p", { class: "muted" }, "No report yet.")),
    uploadSection(plate));
  view.wells = await api(`/api/plates/${encodeURIComponent(name)}/wells`);
  drawMap();
  if (plate.progress && plate.progress.report_version) await loadReport();
  listen(name);
  if (well) showWell(well);
}

function listen(name) {
  if (view.source) view.source.close();
  const source = new EventSource(`/api/plates/${encodeURIComponent(name)}/events`);
  view.source = source;
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    document.getElementById("counts").replaceWith(counts(p));
  });
  source.addEventListener("wells", (e) => {
    view.wells = JSON.parse(e.data);
    drawMap();
    if (view.selected) refreshWell();
  });
  source.addEventListener("complete", () => { source.close(); loadReport(); });
  source.addEventListener("failure", (e) => { source.close(); const d = JSON.parse(e.data); showError(`${d.code}: ${d.error}`); });
}

function showError(message) {
  document.getElementById("counts").after(el("p", { class: "error" }, message));
}

let refreshing = null;
function refreshWell() {
  clearTimeout(refreshing);
  refreshing = setTimeout(() => showWell(view.selected, true), 300);
}

function viridis(t) {
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  const c = stops[i].map((a, k) => Math.round(a + f * (stops[i + 1][k] - a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawMap() {
  const map = document.getElementById("plate-map");
  if (!map || !view.wells) return;
  const { rows, columns, row_names, wells } = view.wells;
  map.style.gridTemplateColumns = `20px repeat(${columns}, 28px)`;
  const cells = [el("span", { class: "label" })];
  for (let c = 1; c <= columns; c++) cells.push(el("span", { class: "label" }, String(c)));
  const values = view.colour !== "state" && view.features ? view.features.values[view.colour] || {} : null;
  let low = Infinity, high = -Infinity;
  if (values) for (const v of Object.values(values)) { low = Math.min(low, v); high = Math.max(high, v); }
  for (let r = 0; r < rows; r++) {
    cells.push(el("span", { class: "label" }, row_names[r]));
    for (let c = 1; c <= columns; c++) {
      const name = `${row_names[r]}${String(c).padStart(2, "0")}`;
      const w = wells[name];
      const state = w ? w.state : "none";
      const cell = el("span", {
        class: "well" + (view.selected === name ? " selected" : ""),
        dataset: { well: name, state },
        title: w ? `${name}: ${state}, ${w.done}/${w.sites} sites done` : `${name}: not imaged`,
        onclick: () => { if (w) { history.replaceState(null, "", `/plates/${encodeURIComponent(view.plate)}/wells/${name}`); showWell(name); } },
      });
      if (values) {
        const v = values[name];
        if (v !== undefined) {
          cell.style.background = viridis(high > low ? (v - low) / (high - low) : 0.5);
          cell.dataset.value = String(v);
          cell.title = `${name}: ${view.colour} = ${fmt(v)}`;
        } else cell.style.background = "var(--none)";
      }
      cells.push(cell);
    }
  }
  fill(map, ...cells);
  const legend = document.getElementById("legend");
  if (values) fill(legend, el("span", {}, fmt(low), el("i", { class: "gradient" }), fmt(high)));
  else fill(legend, ...STATES.map((s) => el("span", {}, el("i", { style: `background:var(--${s})` }), s)));
}

async function showWell(name, quiet) {
  view.selected = name;
  drawMap();
  const panel = document.getElementById("well-panel");
  if (!quiet) fill(panel, el("h2", {}, `Well ${name}`), el("p", { class: "muted" }, "Loading…"));
  let data;
  try { data = await api(`/api/plates/${encodeURIComponent(view.plate)}/wells/${name}`); }
  catch (e) { fill(panel, el("h2", {}, `Well ${name}`), el("p", { class: "error" }, e.message)); return; }
  if (view.selected !== name) return;
  fill(panel, el("h2", {}, `Well ${name}`), ...data.sites.map(siteBox));
}

function kv(obj, cls) {
  return el("table", { class: cls }, ...Object.entries(obj).map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", { class: typeof v === "number" ? "num" : "" },
      Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : fmt(v)))));
}

function siteBox(s) {
  return el("div", { class: "site", dataset: { site: String(s.site), state: s.state || "none" } },
    el("h3", {}, `Site ${s.site}: ${s.state || "no job yet"}`, s.attempt ? ` (attempt ${s.attempt})` : ""),
    s.failure_reason ? el("p", { class: "error failure" }, `${s.failure_class}: ${s.failure_reason}`) : null,
    el("div", { class: "thumbs" }, ...s.images.map((i) => el("figure", {},
      el("a", { href: i.download, title: `download ${i.file_name}` },
        el("img", { class: "thumbnail", src: i.thumbnail, alt: `${i.channel} ${i.file_name}`, loading: "lazy", onerror: thumbnailFailed })),
      el("figcaption", {}, `${i.channel}: ${i.file_name}`)))),
    s.metadata && Object.keys(s.metadata).length ? [el("h3", {}, "Metadata"), kv(s.metadata, "metadata")] : null,
    s.measurements && Object.keys(s.measurements).length ? [el("h3", {}, "Measurements (Image table)"), kv(s.measurements, "measurements")] : null,
    s.provenance && Object.keys(s.provenance).length ? [el("h3", {}, "Provenance"), kv(s.provenance, "provenance")] : null,
    s.results && s.results.length ? [el("h3", {}, "Result files"),
      el("ul", { class: "results" }, ...s.results.map((r) => el("li", {}, el("a", { href: r.download }, r.name), ` (${r.size} bytes)`)))] : null);
}

async function thumbnailFailed(e) {
  // Say why instead of a broken picture (e.g. the stored image does not match its checksum).
  const img = e.target;
  const body = await fetch(img.src).then((r) => r.json()).catch(() => ({ error: "the thumbnail could not be loaded" }));
  img.replaceWith(el("div", { class: "thumb-error error", "data-channel": img.alt.split(" ")[0] },
    `${body.code ? body.code + ": " : ""}${body.error}`));
}

async function loadReport() {
  const section = document.getElementById("report");
  let report;
  try { report = await api(`/api/plates/${encodeURIComponent(view.plate)}/report`); }
  catch (e) { fill(section, el("h2", {}, "Report"), el("p", { class: "error" }, e.message)); return; }
  const plots = report.files.filter((f) => f.kind === "plot_png");
  fill(section, 
    el("h2", {}, `Report v${report.version}`),
    el("p", {}, `${report.wells} wells, ${report.sites} sites`, report.missing_sites.length ? `, ${report.missing_sites.length} missing` : ""),
    el("div", { class: "plots" }, ...plots.map((f) => el("figure", {},
      el("img", { class: "plot", src: f.view, alt: f.name }), el("figcaption", {}, f.name)))),
    report.missing_sites.length ? [el("h3", {}, "Missing and failed sites"),
      el("table", { class: "missing" }, ...report.missing_sites.map((m) =>
        el("tr", {}, el("td", {}, `${m.well} s${m.site}`), el("td", {}, m.state), el("td", {}, m.reason))))] : null,
    report.summary ? [el("h3", {}, "Summary and QC"), summaryView(report.summary)] : null,
    el("h3", {}, "Downloads"),
    el("ul", { class: "downloads" }, ...report.files.map((f) =>
      el("li", {}, el("a", { href: f.download }, f.name), ` (${f.kind}, ${f.size} bytes)`,
        f.view && f.kind !== "plot_png" ? [" · ", el("a", { href: f.view, target: "_blank", class: "view" }, "open")] : null))));
  try {
    view.features = await api(`/api/plates/${encodeURIComponent(view.plate)}/features`);
    const select = document.getElementById("colour-by");
    fill(select, el("option", { value: "state" }, "state"),
      ...view.features.features.map((f) => el("option", { value: f }, f)));
    select.value = view.colour in (view.features.values || {}) ? view.colour : "state";
  } catch (e) { /* a report without well tables: colour by state only */ }
}

function summaryView(summary) {
  const simple = {}, nested = {};
  for (const [k, v] of Object.entries(summary)) (v !== null && typeof v === "object" ? nested : simple)[k] = v;
  return el("div", { class: "summary" }, kv(simple, "summary-values"),
    ...Object.entries(nested).map(([k, v]) => el("details", { open: k.toLowerCase().includes("qc") ? "" : null },
      el("summary", {}, k), el("pre", {}, JSON.stringify(v, null, 2)))));
}

// Upload.

function uploadSection(plate) {
  const input = el("input", { type: "file", multiple: "", id: "files" });
  const drop = el("div", { id: "drop" }, "Drop a folder or image files here, or ", input);
  const result = el("div", { id: "upload-result" });
  const form = el("form", { id: "upload-form" },
    el("label", {}, "file name pattern ", el("input", { type: "text", name: "pattern", id: "pattern",
      placeholder: "_(?P<Well>[A-P]\\d{2})f(?P<Site>\\d{2})d(?P<Channel>\\d)\\.tif$" })),
    el("label", {}, "channel map ", el("input", { type: "text", name: "channel_map", id: "channel-map",
      placeholder: plate.channels.map((c, i) => `${i}=${c}`).join(",") })),
    el("label", {}, "site (when the pattern has no Site group) ", el("input", { type: "text", name: "site", id: "site", value: "0", size: "3" })),
    el("label", {}, "your token (a scientist's; not needed on a mesh without authentication) ", el("input", { type: "password", name: "token", id: "token", autocomplete: "off" })),
    drop, result);
  const send = async (files) => {
    if (!files.length) return;
    const body = new FormData(form);
    body.delete("files");
    for (const f of files) body.append("files", f, f.name);
    fill(result, el("p", { class: "muted" }, `uploading ${files.length} file(s)…`));
    try {
      const r = await api(`/api/plates/${encodeURIComponent(plate.name)}/upload`, { method: "POST", body });
      const problems = [...r.unmatched, ...r.conflicts];
      fill(result, el("p", { id: "upload-summary" },
        `registered ${r.created} new, ${r.replaced} replaced, ${r.unchanged} unchanged; ${r.sites_ready} site(s) ready`),
        el("ul", { class: "error", id: "upload-problems" }, ...problems.map((u) => el("li", {}, `${u.file}: ${u.reason}`))));
    } catch (e) { fill(result, el("p", { class: "error", id: "upload-error" }, e.message)); }
  };
  input.addEventListener("change", () => send([...input.files]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    send(entries.length ? (await Promise.all(entries.map(readEntry))).flat() : [...e.dataTransfer.files]);
  });
  return el("section", { id: "upload" }, el("h2", {}, "Upload images"),
    el("p", { class: "muted" }, "Images are stored and registered as `cellmesh ingest` does: the pattern's named groups say the well, site and channel."),
    form);
}

function readEntry(entry) {
  if (entry.isFile) return new Promise((ok, bad) => entry.file(ok, bad)).then((f) => [f]);
  const reader = entry.createReader();
  const all = [];
  return new Promise((ok, bad) => {
    const next = () => reader.readEntries(async (batch) => {
      if (!batch.length) { ok((await Promise.all(all.map(readEntry))).flat()); return; }
      all.push(...batch); next();
    }, bad);
    next();
  });
}

// Routing.

const path = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
if (path[0] === "plates" && path[1]) showPlate(path[1], path[2] === "wells" ? path[3] : null);
else showPlates();
