"""Thumbnails from stored image bytes (tifffile/Pillow), without a server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from services.common.settings import SettingsError
from services.web.mesh import numeric_columns, well_state
from services.web.settings import WebSettings
from services.web.thumbs import NotAnImage, thumbnail_png


def _tiff(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, photometric="minisblack")
    return out.getvalue()


def test_a_16_bit_tiff_is_stretched_between_its_percentiles_and_scaled_down() -> None:
    pixels = np.zeros((512, 400), np.uint16)
    pixels[:, 200:] = 4000  # a dim image: half dark, half at 4000 of 65535
    png = thumbnail_png(_tiff(pixels), 128)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (100, 128)
        grey = np.asarray(im)
    assert grey[:, :40].max() == 0 and grey[:, 60:].min() == 255  # stretched to the full 8 bits


def test_a_stack_shows_its_first_plane_and_colour_stays_colour() -> None:
    stack = np.stack([np.full((64, 64), v, np.uint8) for v in (0, 200, 50)])
    stack[0, :32] = 100
    with Image.open(io.BytesIO(thumbnail_png(_tiff(stack), 64))) as im:
        assert im.size == (64, 64) and np.asarray(im)[:32].min() == 255
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 250
    png_in = io.BytesIO()
    Image.fromarray(rgb).save(png_in, format="PNG")
    with Image.open(io.BytesIO(thumbnail_png(png_in.getvalue(), 64))) as im:
        assert im.mode == "RGB" and im.size == (30, 20)


def test_bytes_that_are_no_image_are_refused_with_a_reason() -> None:
    with pytest.raises(NotAnImage, match="not an image"):
        thumbnail_png(b"Image.csv,1,2\n", 64)
    with pytest.raises(NotAnImage, match="TIFF cannot be read|no pixels"):
        thumbnail_png(b"II*\x00" + b"\x00" * 20, 64)


def test_a_well_takes_its_least_advanced_state_and_failure_first() -> None:
    assert well_state([]) == "none"
    assert well_state(["done", "running"]) == "running"
    assert well_state(["done", "done"]) == "done"
    assert well_state(["waiting", "done", "failed"]) == "failed"


def test_well_table_columns_are_read_after_their_table_prefix() -> None:
    row = {"Metadata_Well": "A01", "Metadata_Object_Count": "12", "Image_Count_Nuclei": "12",
           "Image_ExecutionTime_01Images": "0.1", "Image_ModuleError_02Metadata": "0", "Image_ImageNumber": "3",
           "Image_Intensity_MeanIntensity_GFP": "0.5"}  # fmt: skip
    assert numeric_columns(row, "Image_") == {
        "Image_Count_Nuclei": 12.0,
        "Image_Intensity_MeanIntensity_GFP": 0.5,
    }


def test_measurements_leave_out_bookkeeping_columns() -> None:
    row = {"ImageNumber": "1", "Count_Nuclei": "17", "FileName_DNA": "a.tif", "Metadata_Well": "A01",
           "Intensity_MeanIntensity_GFP": "0.25", "Threshold_FinalThreshold_Nuclei": "nan", "Note": "x",
           "ExecutionTime_05IdentifyPrimaryObjects": "0.14", "ModuleError_01Images": "0", "Height_DNA": "256",
           "Threshold_OrigThreshold_Nuclei": "0.04", "Group_Index": "1"}  # fmt: skip
    assert numeric_columns(row) == {
        "Count_Nuclei": 17.0,
        "Intensity_MeanIntensity_GFP": 0.25,
        "Threshold_OrigThreshold_Nuclei": 0.04,
    }


def test_settings_come_from_the_environment_and_every_problem_is_named() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "S3_ENDPOINT_URL": "http://10.0.0.5:4566",
        "AUTH": "off",
    }
    s = WebSettings.from_env(env)
    assert s.auth is None
    assert (s.http_port, s.grpc_port, s.s3_public_endpoint_url) == (8080, 50056, "http://10.0.0.5:4566")
    s = WebSettings.from_env({**env, "S3_PUBLIC_ENDPOINT_URL": "https://s3.lab.example", "HTTP_PORT": "9000"})
    assert (s.http_port, s.s3_public_endpoint_url) == (9000, "https://s3.lab.example")
    with pytest.raises(SettingsError) as raised:
        WebSettings.from_env({"HTTP_PORT": "web", "THUMBNAIL_PX": "0", "AWS_ACCESS_KEY_ID": "k"})
    text = str(raised.value)
    assert "HTTP_PORT" in text and "THUMBNAIL_PX" in text and "AWS_SECRET_ACCESS_KEY" in text
    with pytest.raises(SettingsError, match="TLS_CA"):  # AUTH=on (the default) needs its certificate
        WebSettings.from_env({**env, "AUTH": "on"})


def test_real_microscope_images_make_thumbnails(shared_data: Path) -> None:
    """The CellProfiler team's ExampleHuman site and a BBBC013 image."""
    files = sorted((shared_data / "example_human" / "images").glob("*.tif"))
    files.append(shared_data / "bbbc013_translocation_plate" / "images" / "Channel2-01-A-01.tif")
    assert len(files) == 4
    for path in files:
        with Image.open(io.BytesIO(thumbnail_png(path.read_bytes(), 256))) as im:
            grey = np.asarray(im)
        assert im.size == (256, 256), path.name
        assert grey.min() == 0 and grey.max() == 255, path.name  # stretched, not blank
        assert 0.001 < (grey > 128).mean() < 0.9, path.name  # cells on a background (PH3: few)
