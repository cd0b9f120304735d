"""Per-component attribution of a generative variant's accuracy (validate/attribution.py).

The reference for each row is built by hand: a copy of the fp32 artifact with that one component's file
replaced by the variant's, decoded greedily against HF ``generate()`` on the eager model. The figures the
quantize step recorded must be those of that hand-made mix, and the mix must differ from fp32 (a row that
could not tell a quantized component from an fp32 one would be a report that cannot fail).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlexport.cli import main
from vlexport.contracts.manifest import Manifest
from vlexport.runtime import load_artifact
from vlexport.validate import eager_references
from vlexport.validate.attribution import FIGURES, changed_components
from vlexport.weights import load_model, source_from_manifest


def _hand_mixed(parent: Path, variant: Path, component: str, out: Path) -> Path:
    shutil.copytree(parent, out)
    comp = Manifest.read(variant).components[component]
    for rel in filter(None, (comp.file, comp.external_data)):
        shutil.copy2(variant / rel, out / rel)
    m = json.loads((out / "manifest.json").read_text())
    m["components"][component] = json.loads((variant / "manifest.json").read_text())["components"][component]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_attribution_is_each_component_alone(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip2-opt-tiny", "generate")
    variant = tmp_path / "mixed"
    argv = ["quantize", str(parent), "-o", str(variant)]
    assert main([*argv, "--components", "image_encoder=int4-weight,decoder=int8-weight"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "per component (each alone at its precision, the others fp32" in printed
    m = Manifest.read(variant)
    rows = m.validation.accuracy.components
    assert {k: r["precision"] for k, r in rows.items()} == {
        "image_encoder": "int4-weight",
        "decoder": "int8-weight",
    }
    assert changed_components(m, Manifest.read(parent)) == ["image_encoder", "decoder"]

    fp32 = Manifest.read(parent)
    source = source_from_manifest(fp32, parent)
    check = eager_references(load_model(source, fp32.task), source.family.task(fp32.task))
    for name, row in rows.items():
        mixed = _hand_mixed(parent, variant, name, tmp_path / f"by-hand-{name}")
        want = check.attribution(load_artifact(mixed, device="cpu")).accuracy.generation
        for key in FIGURES:
            if key == "agreement_with_near_ties":  # near-ties are judged with the variant's tolerance
                continue
            assert row[key] == pytest.approx(want[key], abs=1e-9), (name, key)
        assert row["greedy_samples"] == 4
        assert row["min_logit_cosine"] < 1.0 - 1e-7  # the component really was quantized


def test_no_attribution_with_one_changed_component(exported, tmp_path: Path, capsys) -> None:
    parent = exported("blip2-opt-tiny", "generate")
    out = tmp_path / "dec"
    assert main(["quantize", str(parent), "-o", str(out), "--components", "decoder=int8-weight"]) == 0
    capsys.readouterr()
    m = Manifest.read(out)
    assert m.validation.accuracy.components == {}  # the whole variant's report is the decoder's
    assert changed_components(m, Manifest.read(parent)) == ["decoder"]
