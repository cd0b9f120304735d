"""Images as a user has them: 16- and 32-bit grey (PNG ``I;16``, TIFF ``I``) and float images are converted by
their real range, not clipped to white; values with no one meaning as a colour are refused; a calibration
folder with a damaged image is refused, naming it, rather than calibrated on part of the folder without a
word."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.faults.cli_helpers import cli

SETTINGS = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _grey16() -> np.ndarray:
    """A 16x16 ramp over the whole 16-bit range (most of it above 255, which RGB conversion clipped to
    white)."""
    return (np.arange(256, dtype=np.float64).reshape(16, 16) * 257).astype(np.uint16)


def _reference(grey8: np.ndarray) -> np.ndarray:
    import tempfile

    from PIL import Image

    from vlexport.runtime.preprocess import ImageSettings, load_image

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ref.png"
        Image.fromarray(grey8).convert("RGB").save(path)
        return load_image(path, ImageSettings(**SETTINGS))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("grey16.png", lambda a: a),  # PNG I;16
        ("grey32.tif", lambda a: a.astype(np.int32)),  # TIFF I
    ],
)
def test_wide_grey_images_are_scaled_by_their_range(tmp_path: Path, name: str, make) -> None:
    from PIL import Image

    from vlexport.runtime.preprocess import ImageSettings, load_image

    ramp = _grey16()
    Image.fromarray(make(ramp)).save(tmp_path / name)
    got = load_image(tmp_path / name, ImageSettings(**SETTINGS))
    want = _reference(np.rint(ramp / 257).astype(np.uint8))  # the same picture saved as 8-bit grey
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 200  # not one white plane


def test_float_images_in_0_1_are_scaled(tmp_path: Path) -> None:
    from PIL import Image

    from vlexport.runtime.preprocess import ImageSettings, load_image

    ramp = np.arange(256, dtype=np.float32).reshape(16, 16) / 255
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(
        load_image(tmp_path / "f.tif", ImageSettings(**SETTINGS)),
        _reference(np.arange(256, dtype=np.uint8).reshape(16, 16)),
    )


def test_values_without_a_colour_meaning_are_refused(exported, tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.fromarray(np.full((16, 16), -5, dtype=np.int32)).save(tmp_path / "neg.tif")
    rc, err = cli(
        capsys, "run", exported("bridgetower-tiny", "itm"), "--image", tmp_path / "neg.tif", "--text", "a cat"
    )
    assert rc == 2 and "is a I image with values from -5 to -5, outside 0..65535" in err, err


def test_a_damaged_image_in_a_calibration_folder_is_refused(exported, tmp_path: Path, capsys) -> None:
    from PIL import Image

    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (40 * i, 90, 200 - 40 * i)).save(cal / f"ok{i}.png")
    good = (cal / "ok0.png").read_bytes()
    (cal / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    out = tmp_path / "q"
    rc, err = cli(
        capsys,
        "quantize",
        exported("bridgetower-tiny", "itm"),
        "-o",
        out,
        "--precision",
        "int8-static",
        "--calibration",
        cal,
    )
    assert rc == 2 and f"--calibration {cal}: 1 of its images cannot be used" in err and "cut.png" in err, err
    assert "Nothing was written" in err and not out.exists()
