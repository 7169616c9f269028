"""The worker's image-set check (cp_child.match_image_sets, used warm and
cold): every image set CellProfiler formed is one site's files, each site
once, in any order (a pipeline that groups numbers its sets group by group)."""

from __future__ import annotations

from services.cpworker.cp_child import match_image_sets

SITES = [
    {"DNA": "/in/DNA/00000/a1.tif", "GFP": "/in/GFP/00000/a1.tif"},
    {"DNA": "/in/DNA/00001/a2.tif", "GFP": "/in/GFP/00001/a2.tif"},
    {"DNA": "/in/DNA/00002/b1.tif", "GFP": "/in/GFP/00002/b1.tif"},
]


def test_sets_in_site_order_or_in_any_other_order_match() -> None:
    assert match_image_sets([dict(s) for s in SITES], SITES) == ""
    grouped = [SITES[0], SITES[2], SITES[1]]  # e.g. grouped by a metadata key A01, B01 | A02
    assert match_image_sets([dict(s) for s in grouped], SITES) == ""


def test_a_set_that_mixes_two_sites_names_the_file() -> None:
    mixed = [dict(SITES[0]), {"DNA": SITES[1]["DNA"], "GFP": SITES[2]["GFP"]}, dict(SITES[2])]
    problem = match_image_sets(mixed, SITES)
    assert problem.startswith("CellProfiler loaded image "), problem
    assert "but the catalog registered" in problem


def test_the_same_site_twice_is_refused() -> None:
    problem = match_image_sets([dict(SITES[0]), dict(SITES[0]), dict(SITES[1])], SITES)
    assert problem == "CellProfiler formed the same image set twice"


def test_a_missing_image_name_is_a_problem_only_when_every_name_is_required() -> None:
    partial = [{"DNA": s["DNA"]} for s in SITES]
    assert match_image_sets(partial, SITES, require_all=False) == ""
    assert "load no image named GFP" in match_image_sets(partial, SITES)


def test_one_site_run_names_the_file_that_was_loaded_instead() -> None:
    problem = match_image_sets([{"DNA": "/in/GFP/a1.tif", "GFP": "/in/GFP/a1.tif"}], [SITES[0]])
    assert problem == (
        "CellProfiler loaded image DNA from /in/GFP/a1.tif, but the catalog registered "
        "/in/DNA/00000/a1.tif as DNA"
    )
