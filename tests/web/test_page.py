"""The web page in a real browser (Debian's chromium driven by Playwright),
over a real local mesh: catalog, scheduler, a CellProfiler worker, reducer,
the project's S3 server and the web service as processes.

Screenshots go to the test's tmp dir (`screenshots/`)."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.common.s3 import ObjectStore
from services.mesh import microscope
from services.mesh.demo import Mesh, start_mesh, stop_mesh
from tests.e2e.meshkit import catalog_stub, create_generated_plate, options

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
#: The generated images' names: {plate}_{well}_s{site}_{channel}.tif
PATTERN = r"_(?P<Well>[A-P]\d{2})_s(?P<Site>\d+)_(?P<Channel>DNA|GFP)\.tif$"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    run = tmp_path_factory.mktemp("web-mesh")
    mesh = await start_mesh(options(run, workers=1))
    assert mesh.web_url, "the local mesh starts the web page"
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    if not _installed(CHROMIUM):
        pytest.fail(
            "Debian's chromium is not installed: run scripts/setup.sh (apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


def _installed(path: Path) -> bool:
    return path.exists()


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


def _shots(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


async def test_plate_map_turns_done_live_then_a_well_and_the_report(
    mesh: Mesh, browser: Any, tmp_path: Path
) -> None:
    """While a plate runs the page shows wells turning done with no reload;
    clicking a well shows its thumbnails, measurements and provenance; the
    report's plots load; the map colours by a per-well feature."""
    plate = "WEBLIVE"
    async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
        catalog = catalog_stub(channel)
        sites = await create_generated_plate(catalog, tmp_path / "img", plate, 2, 3, 1, size=256)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        await page.goto(mesh.web_url)
        await page.click(f"#plates tr[data-plate='{plate}'] a")
        await page.wait_for_selector("#plate-map .well[data-well='B03']")
        assert page.url == f"{mesh.web_url}plates/{plate}"
        # What each well looked like, as the page drew it, from now on.
        await page.evaluate(
            """() => {
                window.__loadedOnce = true;
                window.__seen = {};
                window.__doneAt = {};
                const note = () => document.querySelectorAll('#plate-map .well').forEach(w => {
                    const s = (window.__seen[w.dataset.well] ||= []);
                    if (s[s.length - 1] !== w.dataset.state) s.push(w.dataset.state);
                    if (w.dataset.state === 'done' && !(w.dataset.well in window.__doneAt))
                        window.__doneAt[w.dataset.well] = Date.now();
                });
                note();
                new MutationObserver(note).observe(document.getElementById('plate-map'),
                    {childList: true, subtree: true, attributes: true});
            }"""
        )
        before = await page.eval_on_selector_all(
            "#plate-map .well[data-state]", "ws => ws.map(w => w.dataset.state)"
        )
        assert len(before) == 6 and "done" not in before, before
        shots = _shots(tmp_path)
        await page.screenshot(path=str(shots / "1-plate-before-images.png"), full_page=True)

        feeding = microscope.acquire(store, catalog, plate, sites, images_per_second=4)
        await feeding
        await page.wait_for_function(
            "() => document.querySelectorAll('#plate-map .well[data-state=done]').length >= 1",
            timeout=240_000,
        )
        await page.screenshot(path=str(shots / "2-plate-running.png"), full_page=True)
        await page.wait_for_function(
            "() => document.querySelectorAll('#plate-map .well[data-state=done]').length == 6",
            timeout=300_000,
        )
        assert await page.evaluate("() => window.__loadedOnce === true"), "the page reloaded"
        seen = await page.evaluate("() => window.__seen")
        for well, states in seen.items():
            assert states[-1] == "done" and len(states) >= 2, f"{well} was drawn as {states}"
        counts = await page.inner_text("#counts")
        assert "done 6" in counts, counts
        # How long after the catalog recorded a site done the page drew it (same machine, same clock).
        drawn_at = await page.evaluate("() => window.__doneAt")
        listed = await catalog.ListSites(catalog_pb2.ListSitesRequest(plate=plate))
        lags = sorted(
            drawn_at[j.site.well] / 1000 - j.finished_at.ToMicroseconds() / 1e6 for j in listed.sites
        )
        print(f"site done in the catalog -> drawn done on the page: {', '.join(f'{x:.2f}' for x in lags)} s")
        assert 0 <= lags[0] and lags[-1] < 5, lags

        # The report: its plots load (presigned URLs on the object store).
        await page.wait_for_selector("#report img.plot", timeout=180_000)
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#report img.plot')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=30_000,
        )
        plots = await page.eval_on_selector_all("#report img.plot", "is => is.map(i => i.alt)")
        assert "heatmap_cells_per_well.png" in plots, plots
        downloads = await page.eval_on_selector_all(
            "#report ul.downloads a:not(.view)", "as => as.map(a => a.href)"
        )
        opened = await page.eval_on_selector_all(
            "#report ul.downloads a.view", "as => as.map(a => a.textContent)"
        )
        assert opened == ["open"]  # qc.html opens in the browser too
        report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate=plate))).report
        assert len(downloads) == len(report.files)
        summary = next(f for f in report.files if f.kind == catalog_pb2.REPORT_FILE_KIND_SUMMARY_JSON)
        link = next(h for h in downloads if f"/{summary.object.key}?" in h)
        # The download link, fetched as a browser would: the registered bytes.
        data = await asyncio.to_thread(_download, link)
        assert hashlib.sha256(data).hexdigest() == summary.object.sha256
        await page.screenshot(path=str(shots / "3-plate-done-with-report.png"), full_page=True)

        # A well: its sites' thumbnails, measurements and provenance.
        jobs = {
            j.site.well: j
            for j in (
                await catalog.ListSites(catalog_pb2.ListSitesRequest(plate=plate, with_results=True))
            ).sites
        }
        await page.click("#plate-map .well[data-well='A02']")
        await page.wait_for_selector("#well-panel .site table.measurements")
        await page.wait_for_function(
            "() => { const t = [...document.querySelectorAll('#well-panel img.thumbnail')];"
            " return t.length == 2 && t.every(i => i.complete && i.naturalWidth > 0); }",
            timeout=30_000,
        )
        assert page.url.endswith(f"/plates/{plate}/wells/A02")
        measured = await _table(page, "#well-panel table.measurements")
        image_csv = next(r for r in jobs["A02"].results if r.name.endswith("Image.csv"))
        row = next(csv.DictReader(io.StringIO((await store.get_bytes(image_csv.object.key)).decode())))
        assert float(measured["Count_Nuclei"]) == float(row["Count_Nuclei"]) == sites[1].nuclei
        provenance = await _table(page, "#well-panel table.provenance")
        assert provenance["cellprofiler_version"].startswith("4.2.8")
        assert provenance["worker_id"] == jobs["A02"].provenance.worker_id
        sizes = await page.eval_on_selector_all(
            "#well-panel img.thumbnail", "is => is.map(i => [i.naturalWidth, i.naturalHeight])"
        )
        assert sizes == [[256, 256], [256, 256]], sizes
        await page.screenshot(path=str(shots / "4-well-A02.png"), full_page=True)

        # Colour by a per-well feature of the report.
        options_now = await page.eval_on_selector_all("#colour-by option", "os => os.map(o => o.value)")
        feature = "cells_per_well: Count_Nuclei"
        assert feature in options_now and "Image: Image_Count_Nuclei" in options_now, options_now
        assert not [o for o in options_now if "ExecutionTime" in o or "ModuleError" in o], options_now
        await page.select_option("#colour-by", feature)
        values = await page.eval_on_selector_all(
            "#plate-map .well[data-value]",
            "ws => Object.fromEntries(ws.map(w => [w.dataset.well, +w.dataset.value]))",
        )
        assert values == {s.well: s.nuclei for s in sites}
        await page.screenshot(path=str(shots / "5-plate-by-nuclei-count.png"), full_page=True)
        # The plates page shows the plate settled, with its report.
        await page.goto(mesh.web_url)
        row = page.locator(f"#plates tr[data-plate='{plate}']")
        await row.wait_for()
        assert "6/6" in await row.inner_text() and "v1" in await row.inner_text()
        assert not console, console
        await page.close()


async def _table(page: Any, selector: str) -> dict[str, str]:
    rows = await page.eval_on_selector_all(
        f"{selector} tr", "rs => rs.map(r => [r.cells[0].innerText, r.cells[1].innerText])"
    )
    return dict(rows)


async def test_dropping_a_folder_registers_its_images(mesh: Mesh, browser: Any, tmp_path: Path) -> None:
    """Files dropped on the page are stored and registered as `cellmesh
    ingest` does, in the name of the user whose token comes with them; no
    token, a viewer's token and a pattern that cannot work are refused with
    what to fix, and register nothing."""
    plate = "WEBDROP"
    assert mesh.pki is not None, "the test mesh runs with AUTH=on"
    async with mesh.channel() as channel:
        catalog = catalog_stub(channel)
        sites = await create_generated_plate(catalog, tmp_path / "folder", plate, 1, 2, 1, size=128, seed=5)
        files = sorted(p for s in sites for p in s.files.values())
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        await page.goto(f"{mesh.web_url}plates/{plate}")
        await page.wait_for_selector("#drop")

        await page.fill("#pattern", PATTERN)
        await page.set_input_files("#files", [str(files[0])])
        await page.wait_for_selector("#upload-error")
        assert "UNAUTHENTICATED" in await page.inner_text("#upload-error")
        assert "token" in await page.inner_text("#upload-error")
        await page.fill("#token", mesh.pki.token("viewer"))
        await page.set_input_files("#files", [])
        await page.set_input_files("#files", [str(files[0])])
        await page.wait_for_function(
            "document.getElementById('upload-error') && "
            "document.getElementById('upload-error').innerText.includes('PERMISSION_DENIED')"
        )
        assert not (await catalog.ListImages(catalog_pb2.ListImagesRequest(plate=plate))).images

        await page.fill("#token", mesh.pki.token("scientist"))
        await page.fill("#pattern", r"_(?P<Well>[A-P]\d{2})\.tif$")
        await page.set_input_files("#files", [])
        await page.set_input_files("#files", [str(files[0])])
        await page.wait_for_function(
            "document.getElementById('upload-error') && "
            "document.getElementById('upload-error').innerText.includes('INVALID_ARGUMENT')"
        )
        assert "(?P<Channel>...)" in await page.inner_text("#upload-error")
        assert not (await catalog.ListImages(catalog_pb2.ListImagesRequest(plate=plate))).images

        await page.fill("#pattern", PATTERN)
        payload = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in files]
        await page.evaluate(
            """(files) => {
                const dt = new DataTransfer();
                for (const f of files) {
                    const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
                    dt.items.add(new File([bytes], f.name, {type: 'image/tiff'}));
                }
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""",
            payload,
        )
        await page.wait_for_selector("#upload-summary", timeout=60_000)
        text = await page.inner_text("#upload-summary")
        assert "registered 4 new" in text and "2 site(s) ready" in text, text
        await page.screenshot(path=str(_shots(tmp_path) / "6-upload-registered.png"), full_page=True)
        images = (await catalog.ListImages(catalog_pb2.ListImagesRequest(plate=plate))).images
        got = {(i.site.well, i.site.site, i.channel): (i.file_name, i.object.sha256) for i in images}
        want = {
            (s.well, s.site, c): (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
            for s in sites
            for c, p in s.files.items()
        }
        assert got == want
        for image in images:
            assert (
                image.object.key
                == f"images/{plate}/{image.site.well}/s{image.site.site}/{image.channel}/{image.file_name}"
            )
        await page.close()

        # A thumbnail is made once from the stored image, then served from the cache;
        # only thumbnails (and tables) are kept, never the images themselves.
        url = f"{mesh.web_url}thumbnails/{plate}/A02/0/GFP.png"
        took = []
        for _ in range(2):
            start = time.perf_counter()
            png = await asyncio.to_thread(_download, url)
            took.append(time.perf_counter() - start)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"thumbnail of a 128 px TIFF: {took[0] * 1000:.0f} ms made, {took[1] * 1000:.0f} ms cached")
        cache = mesh.procs.log_dir.parent / "web-cache"
        kept = {p.name for p in cache.rglob("*") if p.is_file()}
        gfp = next(i for i in images if i.site.well == "A02" and i.channel == "GFP")
        assert f"{gfp.object.sha256}-256.png" in kept
        assert not kept & {i.object.sha256 for i in images}, "images were kept in the web cache"
        status, body = await asyncio.to_thread(_get, f"{mesh.web_url}thumbnails/{plate}/A01/0/NOPE.png")
        assert status == 404 and "NOPE" in body["error"]


def _get(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_the_api_says_what_to_fix(mesh: Mesh) -> None:
    """Bad requests get a status and a message naming the problem."""
    web = mesh.web_url
    status, body = await asyncio.to_thread(_get, f"{web}api/plates/NO_SUCH_PLATE/wells")
    assert status == 404 and body["code"] == "NOT_FOUND" and "NO_SUCH_PLATE" in body["error"]
    status, body = await asyncio.to_thread(_get, f"{web}api/plates/bad%20name")
    assert status == 400 and "letters, digits" in body["error"]
    status, body = await asyncio.to_thread(_get, f"{web}api/plates/P1/wells/Z99x")
    assert status == 400 and "well" in body["error"]
    status, body = await asyncio.to_thread(
        _get, f"{web}api/plates/P1/upload", b"x=1", {"Content-Type": "text/plain"}
    )
    assert status == 400 and "multipart" in body["error"]
    empty_form = {"Content-Type": "multipart/form-data; boundary=x"}
    status, body = await asyncio.to_thread(_get, f"{web}api/plates/P1/upload", b"--x--\r\n", empty_form)
    assert status == 400 and "pattern" in body["error"]
    status, body = await asyncio.to_thread(_get, f"{web}thumbnails/P1/A01/x/DNA.png")
    assert status == 400 and "SITE" in body["error"]


async def test_a_failed_site_is_red_with_its_reason(mesh: Mesh, browser: Any, tmp_path: Path) -> None:
    """A site whose image does not match its registered checksum fails as an
    input problem: its well turns red live and the well shows why."""
    plate = "WEBFAIL"
    async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
        catalog = catalog_stub(channel)
        (site,) = await create_generated_plate(catalog, tmp_path / "img", plate, 1, 1, 1, size=128, seed=9)
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        await page.goto(f"{mesh.web_url}plates/{plate}/wells/A01")
        await page.wait_for_selector("#plate-map .well[data-well='A01']")
        regs = []
        for name, path in site.files.items():
            stored = await store.put_file(f"images/{plate}/A01/s0/{name}/{path.name}", path)
            digest = stored.sha256 if name == "GFP" else "0" * 64  # DNA registered with another checksum
            regs.append(
                catalog_pb2.ImageRegistration(
                    site=types_pb2.SiteRef(plate=plate, well="A01", site=0),
                    channel=name,
                    object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=digest),
                    file_name=path.name,
                )
            )
        await catalog.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs))
        await page.wait_for_selector("#plate-map .well[data-well='A01'][data-state=failed]", timeout=120_000)
        failure = page.locator("#well-panel .failure")
        await failure.wait_for(timeout=30_000)
        (job,) = (await catalog.ListSites(catalog_pb2.ListSitesRequest(plate=plate))).sites
        assert job.failure_class == types_pb2.FAILURE_CLASS_INPUT_PROBLEM
        assert await failure.inner_text() == f"FAILURE_CLASS_INPUT_PROBLEM: {job.failure_reason}"
        # The thumbnail of the image that does not match says so instead of drawing other bytes.
        said = page.locator("#well-panel .thumb-error[data-channel=DNA]")
        await said.wait_for(timeout=30_000)
        assert (await said.inner_text()).startswith("DATA_LOSS: ") and "SHA-256" in await said.inner_text()
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#well-panel img.thumbnail')].every(i => i.complete)"
        )
        thumbs = await page.eval_on_selector_all(
            "#well-panel img.thumbnail", "is => is.map(i => [i.alt, i.naturalWidth > 0])"
        )
        assert thumbs == [[f"GFP {site.files['GFP'].name}", True]]
        reply = await page.request.get(f"{mesh.web_url}thumbnails/{plate}/A01/0/DNA.png")
        assert reply.status == 502 and "SHA-256" in (await reply.json())["error"]
        await page.screenshot(path=str(_shots(tmp_path) / "7-failed-site.png"), full_page=True)
        await page.close()
