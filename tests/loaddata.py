"""Pipelines rewritten the way Distributed-CellProfiler users write them: the
four input modules (Images, Metadata, NamesAndTypes, Groups) replaced by one
LoadData reading load_data.csv from the Default Input Folder, with absolute
PathName_ columns (Base image location None); the analysis modules as they are."""

from __future__ import annotations

import re

INPUT_MODULES = ("Images", "Metadata", "NamesAndTypes", "Groups")
LOADDATA = "\n".join(
    [
        "LoadData:[module_num:1|svn_version:'Unknown'|variable_revision_number:6|show_window:False|"
        "notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]",
        "    Input data file location:Default Input Folder|",
        "    Name of the file:load_data.csv",
        "    Load images based on this data?:Yes",
        "    Base image location:None|",
        "    Process just a range of rows?:No",
        "    Rows to process:1,100000",
        "    Group images by metadata?:No",
        "    Select metadata tags for grouping:",
        "    Rescale intensities?:Yes",
    ]
)


def with_loaddata(cppipe: str) -> str:
    """`cppipe` (a CellProfiler 4 pipeline's text) with its input modules
    replaced by LoadData, the other modules renumbered after it."""
    header, *blocks = cppipe.rstrip("\n").split("\n\n")
    kept = [b for b in blocks if b.split(":", 1)[0] not in INPUT_MODULES]
    assert len(kept) == len(blocks) - len(INPUT_MODULES), "expected all four input modules"
    modules = [LOADDATA]
    for number, block in enumerate(kept, start=2):
        first, _, rest = block.partition("\n")
        first = re.sub(r"module_num:\d+", f"module_num:{number}", first, count=1)
        modules.append(f"{first}\n{rest}")
    header = re.sub(r"ModuleCount:\d+", f"ModuleCount:{len(modules)}", header, count=1)
    return "\n\n".join([header, *modules]) + "\n"
