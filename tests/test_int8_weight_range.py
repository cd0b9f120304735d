"""int8 weights keep 8 bits only where the CPU multiplies them exactly (vlexport/cpu.py): the unset
``reduce_range`` knob resolves to this machine's, ``--reduce-range`` / ``--no-reduce-range`` choose for
another, the manifest records the choice, and 8-bit weights are refused on a CPU that saturates them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import vlexport.cpu
from vlexport.cli import main
from vlexport.contracts import precision
from vlexport.contracts.manifest import Manifest
from vlexport.cpu import exact_int8_dot


def test_exact_int8_dot_reads_the_cpu_flags() -> None:
    assert not exact_int8_dot(frozenset({"avx2", "avx512f", "avx512bw"}), "x86_64")  # vpmaddubsw saturates
    assert exact_int8_dot(frozenset({"avx2", "avx512_vnni"}), "x86_64")
    assert exact_int8_dot(frozenset({"avx_vnni"}), "x86_64") and exact_int8_dot(
        frozenset({"amx_int8"}), "x86_64"
    )
    assert exact_int8_dot(frozenset(), "aarch64")
    assert not exact_int8_dot(frozenset(), "x86_64")  # unknown: 7 bits, which runs right everywhere


@pytest.mark.parametrize("exact", [True, False])
def test_an_unset_reduce_range_is_this_cpus(monkeypatch, exact: bool) -> None:
    monkeypatch.setattr(precision, "exact_int8_dot", lambda: exact)
    for config in (precision.Int8DynamicConfig, precision.Int8StaticConfig):
        assert config().reduce_range is (not exact)
        assert (
            config(reduce_range=True).reduce_range is True
            and config(reduce_range=False).reduce_range is False
        )
        # resolved once: copies and knob round trips keep the value, not the machine they are read on
        resolved = config()
        monkeypatch.setattr(precision, "exact_int8_dot", lambda: not exact)
        assert resolved.with_knobs(min_cosine=0.99).reduce_range is (not exact)
        assert precision.precision_from_record(resolved.name, resolved.knobs()).reduce_range is (not exact)
        monkeypatch.setattr(precision, "exact_int8_dot", lambda: exact)


def _weight_codes(path: Path) -> int:
    """The largest |code| of the graph's int8 weight initializers."""
    model = onnx.load(str(path))
    codes = [
        numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8
    ]
    assert codes
    return int(max(np.abs(c.astype(np.int32)).max() for c in codes))


def test_reduce_range_flags_and_the_refusal_on_a_saturating_cpu(
    exported, tmp_path: Path, monkeypatch, capsys
):
    parent = exported("bridgetower-tiny", "itm")
    for flag, bits in (("--reduce-range", 7), ("--no-reduce-range", 8)):
        out = tmp_path / flag.strip("-")
        assert main(["quantize", str(parent), "-o", str(out), "--precision", "int8-dynamic", flag]) == 0
        m = Manifest.read(out)
        assert m.precision_knobs["reduce_range"] is (bits == 7) and m.derived_from["weight_bits"] == bits
        codes = _weight_codes(out / "model.onnx")
        assert codes <= 64 if bits == 7 else codes > 64, codes
    capsys.readouterr()
    assert (
        main(["quantize", str(parent), "-o", str(tmp_path / "f"), "--precision", "fp16", "--reduce-range"])
        == 2
    )
    assert "--reduce-range applies to --precision int8-dynamic or int8-static" in " ".join(
        capsys.readouterr().err.split()
    )

    monkeypatch.setattr(vlexport.cpu, "exact_int8_dot", lambda *a: False)  # as on an AVX2 machine
    assert main(["validate", str(tmp_path / "reduce-range")]) == 0  # 7-bit weights run right anywhere
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "no-reduce-range")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "int8 weights with all 8 bits" in err and "this CPU has no VNNI or AMX" in err
    assert "--precision int8-dynamic --reduce-range" in err and "Traceback" not in err
