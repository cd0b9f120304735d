"""A precision registered through the contracts alone (a config plus its pass) runs through every public verb.

The throwaway precision ``fp32-round`` keeps fp32 storage but rounds every float weight of an ONNX graph to
``mantissa_bits`` bits (round to nearest even on the bit pattern): a real, cheap rewrite whose error is known.
Nothing else is patched: if the CLI, the orchestrator, validation, ``vlexport list``, the bench or the
manifest had a table keyed by precision name, this precision would miss it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vlexport.cli import main
from vlexport.contracts.backends import DeriveContext, Derived, ExportJob
from vlexport.contracts.manifest import Manifest
from vlexport.contracts.passes import register_pass, unregister_pass
from vlexport.contracts.precision import (
    PRECISIONS,
    PrecisionConfig,
    Tolerance,
    get_precision,
    register_precision,
    unregister_precision,
)
from vlexport.errors import UsageError
from vlexport.pipeline import run_export

NAME = "fp32-round"


@dataclass(frozen=True)
class RoundedConfig(PrecisionConfig):
    mantissa_bits: int = 10  # fp16's mantissa: cosines of ~0.99999 on tiny models
    name: ClassVar[str] = NAME
    dtype: ClassVar[str] = "float32"
    weight_bits: ClassVar[int] = 32
    compute: ClassVar[str] = "fp32"
    tolerance: ClassVar[Tolerance] = Tolerance(min_cosine=0.999, min_agreement=0.9)
    backends: ClassVar[tuple[str, ...]] = ("onnx",)
    description: ClassVar[str] = "fp32 weights rounded to fewer mantissa bits (test-only)"

    def __post_init__(self) -> None:
        if not 1 <= self.mantissa_bits <= 22:
            raise UsageError(f"mantissa_bits must be in 1..22, got {self.mantissa_bits}.")


def rounded(w: np.ndarray, bits: int) -> np.ndarray:
    drop = 23 - bits
    u = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    half = (1 << (drop - 1)) - 1 + ((u >> drop) & 1)  # round half to even
    return (((u + half) >> drop) << drop).astype(np.uint32).view(np.float32)


class RoundPass:
    backend = "onnx"
    precision = NAME

    def __init__(self) -> None:
        self.seen: list[PrecisionConfig] = []

    def derive(self, ctx: DeriveContext) -> Derived:
        config = ctx.job.precision  # the instance the CLI (or the caller) built, knobs included
        assert isinstance(config, RoundedConfig)
        self.seen.append(config)
        components = {}
        for name, comp in ctx.parent.components.items():
            model = onnx.load(str(ctx.parent_dir / comp.file))
            for init in model.graph.initializer:
                if init.data_type == onnx.TensorProto.FLOAT:
                    init.CopyFrom(
                        numpy_helper.from_array(
                            rounded(numpy_helper.to_array(init), config.mantissa_bits), init.name
                        )
                    )
            onnx.save(model, str(ctx.out_dir / comp.file))
            components[name] = replace(comp, size_bytes=(ctx.out_dir / comp.file).stat().st_size)
        return Derived(components, details={"mantissa_bits": config.mantissa_bits})


@pytest.fixture
def round_pass() -> Iterator[RoundPass]:
    """The precision and its pass, registered for one test and removed afterwards, whatever the test did."""
    register_precision(RoundedConfig())
    p = register_pass(RoundPass())
    try:
        yield p
    finally:
        unregister_pass("onnx", NAME)
        unregister_precision(NAME)


def _float_weights(directory: Path) -> np.ndarray:
    manifest = Manifest.read(directory)
    (comp,) = manifest.components.values()
    model = onnx.load(str(directory / comp.file))
    return np.concatenate(
        [
            numpy_helper.to_array(i).ravel()
            for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT
        ]
    )


def test_registered_precision_runs_through_every_verb(
    round_pass: RoundPass, exported, tmp_path: Path, capsys
) -> None:
    parent = exported("bridgetower-tiny", "itm")

    # vlexport quantize: the name enters at the CLI, the config travels to the pass
    out = tmp_path / "rounded"
    assert main(["quantize", str(parent), "-o", str(out), "--precision", NAME]) == 0
    assert round_pass.seen == [RoundedConfig()]
    manifest = Manifest.read(out)
    assert manifest.precision == NAME and manifest.precision_knobs == {"mantissa_bits": 10}
    assert manifest.precision_config == RoundedConfig()
    assert manifest.derived_from == {
        "backend": "onnx",
        "precision": "fp32",
        "path": str(parent.resolve()),
        "mantissa_bits": 10,
    }
    acc = manifest.validation.accuracy
    cosine = acc.outputs["logits"]["cosine"]
    assert manifest.validation.passed and acc.precision == NAME and 0.999 <= cosine < 1.0 and not acc.misses
    low = _float_weights(out).view(np.uint32) & ((1 << 13) - 1)
    assert not low.any()  # every weight really has 10 mantissa bits
    capsys.readouterr()

    # vlexport validate: from the directory alone, the recorded config judges it
    assert main(["validate", str(out)]) == 0
    assert "validation passed" in capsys.readouterr().out

    # vlexport list: the config's facts, and the backend it names
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["precisions"][NAME] == {
        "dtype": "float32",
        "weight_bits": 32,
        "compute": "fp32",
        "tolerance": {"min_cosine": 0.999, "min_agreement": 0.9},
        "backends": ["onnx"],
        "knobs": {"mantissa_bits": 10},
        "description": RoundedConfig.description,
    }
    assert NAME in {b["name"]: b for b in data["backends"]}["onnx"]["precisions"]

    # the manifest round trip with a knob the CLI does not expose: the library builds the config
    seven = tmp_path / "seven"
    run_export(ExportJob(str(parent), seven, backend="onnx", precision=RoundedConfig(mantissa_bits=7)))
    assert round_pass.seen[-1] == RoundedConfig(mantissa_bits=7)
    assert Manifest.read(seven).precision_config == RoundedConfig(mantissa_bits=7)
    assert not (_float_weights(seven).view(np.uint32) & ((1 << 16) - 1)).any()
    with pytest.raises(UsageError, match="mantissa_bits must be in 1..22"):
        get_precision(NAME).with_knobs(mantissa_bits=40)

    # vlexport bench: built from the fp32 parent already in the work dir (reused, not rebuilt), and the
    # given artifact measured as built
    work = tmp_path / "work"
    shutil.copytree(parent, work / "bridgetower-tiny-itm-onnx")
    report = tmp_path / "rows.json"
    assert (
        main(
            [
                "bench",
                "bridgetower-tiny",
                str(out),
                "--random-weights",
                "--task",
                "itm",
                "--backends",
                "onnx",
                "--precision",
                f"fp32,{NAME}",
                "--batch-sizes",
                "2",
                "--warmup",
                "0",
                "--iters",
                "2",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--work-dir",
                str(work),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    rows = json.loads(report.read_text())["rows"]
    assert [(r["backend"], r["precision"], r["status"]) for r in rows] == [
        ("eager", "fp32", "ok"),
        ("onnx", "fp32", "ok"),
        ("onnx", NAME, "ok"),
        ("onnx", NAME, "ok"),
    ]
    assert all(r["peak_kind"] == "fp32-gemm" for r in rows)
    built = Manifest.read(work / f"bridgetower-tiny-itm-onnx-{NAME}")
    # the reused parent
    assert built.derived_from["path"] == str((work / "bridgetower-tiny-itm-onnx").resolve())
    assert sorted(p.name for p in work.iterdir()) == [
        "bridgetower-tiny-itm-onnx",
        f"bridgetower-tiny-itm-onnx-{NAME}",
    ]


def test_an_unregistered_precision_is_gone() -> None:
    assert NAME not in PRECISIONS
    with pytest.raises(UsageError, match="Unknown precision"):
        get_precision(NAME)
