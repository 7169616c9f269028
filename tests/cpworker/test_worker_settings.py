"""The worker's settings: a WORK_DIR CellProfiler cannot read images from is
refused at start, with the reason."""

from __future__ import annotations

import pytest

from services.common.settings import SettingsError, load
from services.cpworker.__main__ import VARS

REQUIRED = {
    "CP_PYTHON": "/opt/cp/bin/python",
    "AWS_ACCESS_KEY_ID": "k",
    "AWS_SECRET_ACCESS_KEY": "s",
    "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
}


def test_a_work_dir_with_a_hidden_folder_is_refused() -> None:
    # Under ~/.local, CellProfiler's default Images filter ("directory doesnot
    # containregexp [\\/]\.") drops every file: each site would fail as
    # "formed no image set".
    with pytest.raises(SettingsError) as caught:
        load(VARS, {**REQUIRED, "WORK_DIR": "/home/u/.local/share/cellmesh/work"})
    message = str(caught.value)
    assert (
        "WORK_DIR='/home/u/.local/share/cellmesh/work' is not valid: its folder '.local' starts with '.'"
        in message
    )
    assert "choose a folder with no hidden part" in message


def test_a_plain_work_dir_is_taken() -> None:
    assert (
        load(VARS, {**REQUIRED, "WORK_DIR": "/var/lib/cellmesh/work"})["WORK_DIR"] == "/var/lib/cellmesh/work"
    )
