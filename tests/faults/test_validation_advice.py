"""A validation miss says what to do next, and from `quantize` it names the variant and its output, not only
the source it was built from."""

from __future__ import annotations

from pathlib import Path

from tests.faults.cli_helpers import cli
from vlexport.contracts.precision import Tolerance, get_precision


def test_a_quantize_miss_names_the_variant_and_what_to_do(
    exported, tmp_path: Path, capsys, monkeypatch
) -> None:
    src = exported("altclip-tiny", "features")
    # A threshold no int8 graph meets: the variant is below its thresholds, nothing else is wrong with it.
    monkeypatch.setattr(
        type(get_precision("int8-dynamic")), "tolerance", Tolerance(min_cosine=0.9999999, min_agreement=0.9)
    )
    out = tmp_path / "q8"
    rc, err = cli(capsys, "quantize", src, "-o", out, "--precision", "int8-dynamic")
    assert (
        rc == 1 and f"Validation failed for the onnx int8-dynamic build of {src} (features) for {out}" in err
    ), err
    assert (
        f"Nothing was written to {out}." in err
        and "pass --accept-degraded to keep it marked as degraded" in err
    )
    assert not out.exists()
