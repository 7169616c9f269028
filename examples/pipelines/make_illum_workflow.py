"""Writes the two-stage example workflow next to this file, made by
CellProfiler 4.2 itself from nuclei.cppipe (so every setting is one
CellProfiler wrote):

    illum_dna.cppipe      plate stage: CorrectIlluminationCalculate of DNA over
                          all images ("All: Across cycles", Regular, median
                          filter), saved as IllumDNA.npy on the last cycle
    nuclei_illum.cppipe   per site: nuclei.cppipe with IllumDNA.npy let through
                          the Images filter and loaded as an illumination
                          function, and DNA divided by it before the nuclei
                          are found

Run it with CellProfiler's Python (scripts/install_cellprofiler.sh prints it):

    $(cat var/cp_python) examples/pipelines/make_illum_workflow.py
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    import cellprofiler_core.modules  # noqa: F401  (registers the modules)
    from cellprofiler.modules.correctilluminationapply import CorrectIlluminationApply
    from cellprofiler.modules.correctilluminationcalculate import CorrectIlluminationCalculate
    from cellprofiler.modules.saveimages import SaveImages
    from cellprofiler_core.pipeline import Pipeline

    def load() -> Pipeline:
        p = Pipeline()
        p.load(str(HERE / "nuclei.cppipe"))
        return p

    def by_name(p: Pipeline, name: str) -> object:
        return next(m for m in p.modules() if m.module_name == name)

    # The plate stage: input modules, the calculation, the saved function.
    stage = load()
    for module in list(stage.modules()):
        if module.module_name not in ("Images", "Metadata", "NamesAndTypes", "Groups"):
            stage.remove_module(module.module_num)
    calc = CorrectIlluminationCalculate()
    calc.image_name.value = "DNA"
    calc.illumination_image_name.value = "IllumDNA"
    calc.intensity_choice.value = "Regular"
    calc.each_or_all.value = "All: Across cycles"
    calc.smoothing_method.value = "Median Filter"
    calc.automatic_object_width.value = "Manually"
    calc.size_of_smoothing_filter.value = 20
    calc.rescale_option.value = "Yes"
    calc.set_module_num(len(stage.modules()) + 1)
    stage.add_module(calc)
    save = SaveImages()
    save.save_image_or_figure.value = "Image"
    save.image_name.value = "IllumDNA"
    save.file_name_method.value = "Single name"
    save.single_file_name.value = "IllumDNA"
    save.file_format.value = "npy"
    save.when_to_save.value = "Last cycle"
    save.pathname.value = "Default Output Folder|"
    save.set_module_num(len(stage.modules()) + 1)
    stage.add_module(save)
    write(stage, "illum_dna.cppipe")

    # The per-site analysis: IllumDNA as a third image, DNA corrected by it;
    # the Images filter lets the .npy through (it is not an image extension).
    analysis = load()
    images = by_name(analysis, "Images")
    images.filter_choice.value = "Custom"
    images.filter.value = 'or (extension does isimage) (file does endwith ".npy")'
    nat = by_name(analysis, "NamesAndTypes")
    nat.add_assignment()
    group = nat.assignments[-1]
    group.rule_filter.value = 'and (file does contain "IllumDNA")'
    group.image_name.value = "IllumDNA"
    group.load_as_choice.value = "Illumination function"
    apply = CorrectIlluminationApply()
    apply.images[0].image_name.value = "DNA"
    apply.images[0].corrected_image_name.value = "CorrDNA"
    apply.images[0].illum_correct_function_image_name.value = "IllumDNA"
    apply.images[0].divide_or_subtract.value = "Divide"
    apply.set_module_num(5)
    analysis.add_module(apply)
    primary = by_name(analysis, "IdentifyPrimaryObjects")
    primary.x_name.value = "CorrDNA"
    intensity = by_name(analysis, "MeasureObjectIntensity")
    intensity.images_list.value = "CorrDNA, DNA, GFP"
    write(analysis, "nuclei_illum.cppipe")
    return 0


def write(pipeline: object, name: str) -> None:
    buf = io.StringIO()
    pipeline.dump(buf)  # type: ignore[attr-defined]
    (HERE / name).write_text(buf.getvalue(), encoding="utf-8")
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    sys.exit(main())
