"""Writes the BBBC013 workflow that cellmesh runs, made by CellProfiler 4.2
itself from the CellProfiler team's pipelines in the shared data
(bbbc013_translocation_plate, see its README), with only these changes:

    illum.cppipe      ExampleSBSIllumination.cppipe. CellProfiler 4.2 cannot
                      save .mat files and drops both SaveImages modules when
                      it loads the original; they are added back saving
                      Channel1ILLUM.npy and Channel2ILLUM.npy (same names,
                      same last cycle, Default Output Folder). Its images are
                      named as the analysis names them (OrigBlue -> rawGFP,
                      OrigGreen -> rawDNA), because a plate's channels are one
                      set of names for all its stages.
    analysis.cppipe   derived/ExampleSBS_cp4.cppipe (the original re-saved by
                      CellProfiler 4.2 with its metadata settings fixed). Its
                      Images and NamesAndTypes load the illumination functions as .npy
                      instead of .mat, and CalculateStatistics is removed: it
                      works across all image sets (cellmesh would run the
                      pipeline per plate) and fails on any subset without
                      both control classes; cellmesh's plate report does the
                      plate-level statistics.

The illumination functions stay crossed between channels as in the original
example (Channel1ILLUM, calculated from GFP, is applied as IllumDNA).

    $(cat var/cp_python) examples/pipelines/bbbc013/make_bbbc013_workflow.py [SHARED_DATA]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def main(argv: list[str]) -> int:
    shared = Path(argv[0]) if argv else REPO.parent / "shared" / "data"
    source = shared / "bbbc013_translocation_plate"
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    import cellprofiler_core.modules  # noqa: F401  (registers the modules)
    from cellprofiler.modules.saveimages import SaveImages
    from cellprofiler_core.pipeline import Pipeline

    illum = Pipeline()
    illum.load(str(source / "ExampleSBSIllumination.cppipe"))
    for image, name in (("IllumBlue", "Channel1ILLUM"), ("IllumGreen", "Channel2ILLUM")):
        save = SaveImages()
        save.save_image_or_figure.value = "Image"
        save.image_name.value = image
        save.file_name_method.value = "Single name"
        save.single_file_name.value = name
        save.file_format.value = "npy"
        save.when_to_save.value = "Last cycle"
        save.pathname.value = "Default Output Folder|"
        save.set_module_num(len(illum.modules()) + 1)
        illum.add_module(save)
    text = dump(illum).replace("OrigBlue", "rawGFP").replace("OrigGreen", "rawDNA")
    write(text, "illum.cppipe")

    analysis = Pipeline()
    analysis.load(str(source / "derived" / "ExampleSBS_cp4.cppipe"))
    for module in list(analysis.modules()):
        if module.module_name == "CalculateStatistics":
            analysis.remove_module(module.module_num)
    text = dump(analysis)
    assert text.count('(file does endwith ".mat")') == 3  # the Images filter and two rules
    write(text.replace('(file does endwith ".mat")', '(file does endwith ".npy")'), "analysis.cppipe")
    return 0


def dump(pipeline: object) -> str:
    buf = io.StringIO()
    pipeline.dump(buf)  # type: ignore[attr-defined]
    return buf.getvalue()


def write(text: str, name: str) -> None:
    (HERE / name).write_text(text, encoding="utf-8")
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
