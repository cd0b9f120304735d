"""How close to the hardware: work counted against analytic counts, machine peaks, fractions, old result
files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vlexport.bench import peaks as peaks_mod
from vlexport.bench.peaks import machine_peaks, measure_peaks, peak_kind
from vlexport.bench.regress import compare
from vlexport.bench.rows import SCHEMA, BenchRow, fill_peak_fractions, fill_speedups, read_rows, write_rows
from vlexport.bench.work import count_flops, decode_shape, encoder_work, step_bytes, step_weight_elements
from vlexport.contracts.family import ComponentSpec
from vlexport.contracts.precision import get_precision
from vlexport.models.inputs import InputShape
from vlexport.weights import load_model, resolve

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_linear_and_conv_flops_match_the_analytic_count() -> None:
    b, s, d_in, d_out = 3, 7, 24, 40
    lin = nn.Linear(d_in, d_out)
    x = torch.randn(b, s, d_in)
    for _ in range(2):  # fake tensors first; the same count either way
        flops, how = count_flops(lin, (x,))
        assert flops == 2 * b * s * d_in * d_out and how == "fake"
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)  # a ViT patch embedding: 8x8 patches of a 32x32 image
    flops, _ = count_flops(conv, (torch.randn(2, 3, 32, 32),))
    assert flops == 2 * 2 * 8 * (8 * 8) * (3 * 4 * 4)


def test_data_dependent_forward_is_counted_on_real_tensors() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if bool(x.sum() > 0) else self.b(x)  # needs the data: fake tensors cannot say

    flops, how = count_flops(Branchy(), (torch.ones(2, 8),))
    assert how == "real" and flops == 2 * 2 * 8 * 8


@pytest.fixture(scope="module")
def tiny_itm():
    source = resolve("bridgetower-tiny", random_weights=True)
    model = load_model(source, "itm")
    task = source.family.task("itm")
    return model, task, task.components(model.config)


def test_model_flops_are_linear_in_batch_and_match_a_real_forward(tiny_itm) -> None:
    model, task, components = tiny_itm
    work = {
        b: encoder_work(model, components, task.make_inputs(model.config, InputShape(b, 16), 0))
        for b in (1, 4)
    }
    # every matmul of the model scales with batch
    assert work[1].flops > 0 and work[4].flops == 4 * work[1].flops
    assert set(work[1].flops_by_component) == {c.name for c in components}
    inputs = task.make_inputs(model.config, InputShape(2, 16), 0)
    spec = components[0]
    module = spec.build(model).eval()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*(inputs[n] for n in spec.inputs))
    assert encoder_work(model, components, inputs).flops == counter.get_total_flops()


def _toy_decoder(tied: bool) -> tuple[nn.Module, ComponentSpec]:
    v, d = 50, 16

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.unused = nn.Embedding(v, d), nn.Linear(d, d), nn.Linear(d, 300)
            self.head = nn.Linear(d, v, bias=False)
            if tied:
                self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (self.head(self.mid(self.emb(ids))), k)

    toy = Toy()
    spec = ComponentSpec(
        "decoder", ("input_ids", "past_key_values.0.key"), ("logits", "present.0.key"), {}, build=lambda m: m
    )
    return toy, spec


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_weights_count_what_the_step_reads(tied: bool) -> None:
    toy, spec = _toy_decoder(tied)
    batch, v, d = 3, 50, 16
    example = {"input_ids": torch.zeros(batch, 1, dtype=torch.long), "past_key_values.0.key": torch.zeros(1)}
    got = step_weight_elements(toy, spec, example, batch)
    # the head reads its whole matrix, mid its weight and bias; the unused layer is not read;
    # an untied embedding table is read one row per sample.
    assert got == v * d + d * d + d + (0 if tied else batch * d)


def test_decode_bytes_of_a_real_decoder_follow_its_cache_layout() -> None:
    source = resolve("blip-tiny", random_weights=True)
    model = load_model(source, "caption")
    components = source.family.task("caption").components(model.config)
    batch, prompt, new = 2, 5, 6
    shape = decode_shape(model, components, batch, prompt, new)
    text, vision = model.config.text_config, model.config.vision_config
    per_position = text.num_hidden_layers * 2 * batch * text.hidden_size  # K and V, all heads
    image_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    cross = text.num_hidden_layers * 2 * batch * text.hidden_size * image_tokens
    assert shape.kv_elements == pytest.approx(per_position * (prompt + new / 2) + cross)
    decoder_params = sum(p.numel() for p in model.text_decoder.parameters())
    assert (
        0.5 * decoder_params
        < shape.weight_elements
        <= decoder_params + sum(b.numel() for b in model.text_decoder.buffers() if b.is_floating_point())
    )
    fp32 = step_bytes(shape, weight_bytes=4, activation_bytes=4)
    assert fp32 == 4 * (shape.weight_elements + shape.kv_elements)
    assert step_bytes(shape, weight_bytes=1, activation_bytes=4) < fp32 / 2  # int8 weights


def test_peaks_are_sane_and_bounded_in_time() -> None:
    before = torch.get_num_threads()
    start = time.perf_counter()
    p = measure_peaks("cpu", 1, budget_s=1.0)
    assert time.perf_counter() - start < 30  # ~1-3 s on a quiet machine; bounded on a loaded one
    assert torch.get_num_threads() == before
    for kind in ("fp32-gemm", "int8-gemm", "memory"):
        peak = p.get(kind)
        assert peak is not None and peak.value > 0.05 and peak.method, (kind, p.notes)
    assert p.get("fp32-gemm").value < 1e5 and p.get("memory").value < 1e4  # GFLOP/s of one core, GB/s
    assert p.get("int8-gemm").unit == "GOP/s" and "best of" in p.get("fp32-gemm").method
    json.dumps(p.as_dict())  # the JSON header holds it


def test_machine_peaks_are_cached_and_a_second_look_keeps_the_best(monkeypatch) -> None:
    calls = []

    def fake(device: str, threads: int, budget_s: float) -> peaks_mod.Peaks:
        calls.append(device)
        value = 10.0 if len(calls) == 1 else 5.0
        return peaks_mod.Peaks(
            device,
            threads,
            {
                "fp32-gemm": peaks_mod.Peak("fp32-gemm", value, "GFLOP/s", "x"),
                "memory": peaks_mod.Peak("memory", value * len(calls), "GB/s", "y"),
            },
        )

    monkeypatch.setattr(peaks_mod, "_CACHE", {})
    monkeypatch.setattr(peaks_mod, "measure_peaks", fake)
    first = machine_peaks("cpu", 3)
    assert machine_peaks("cpu", 3, again_after_s=60) is first and len(calls) == 1  # fresh: not measured again
    merged = machine_peaks("cpu", 3, again_after_s=0)
    assert len(calls) == 2 and merged.get("fp32-gemm").value == 10.0 and merged.get("memory").value == 10.0
    assert merged.samples == 2 and peaks_mod.measured()[0]["threads"] == 3


def test_peak_kind_per_precision() -> None:
    def kind(name: str, generative: bool = False) -> str:
        return peak_kind(get_precision(name), generative)

    assert (
        kind("fp32") == "fp32-gemm"
        and kind("int8-dynamic") == "int8-gemm"
        and kind("int8-static") == "int8-gemm"
    )
    assert kind("fp16") == "fp16-gemm" and kind("bf16") == "bf16-gemm"
    assert kind("int8-weight") == "fp32-gemm"  # weight-only: the matmuls run in float
    assert kind("int8-dynamic", True) == "memory"  # decode steps are bandwidth-bound


def _row(backend: str, precision: str, p50: float, **kw) -> BenchRow:
    return BenchRow(
        model="m",
        task="itm",
        backend=backend,
        precision=precision,
        batch=2,
        seq_len=16,
        image_size=64,
        device="cpu-a",
        latency_p50_ms=p50,
        **kw,
    )


def test_fractions_are_achieved_over_peak() -> None:
    rows = [
        _row("eager", "fp32", 100.0, work_flops=20e9, peak_kind="fp32-gemm", peak_value=400.0),
        _row("onnx", "int8-dynamic", 25.0, work_flops=20e9, peak_kind="int8-gemm", peak_value=1600.0),
        _row("onnx", "fp16", 50.0, work_flops=20e9, peak_kind="fp16-gemm", peak_value=None),
        _row(
            "eager",
            "fp32",
            80.0,
            new_tokens=8,
            decode_ms_per_token=10.0,
            work_bytes_per_step=2e9,
            peak_kind="memory",
            peak_value=40.0,
        ),
        _row("onnx", "fp32", 10.0, work_flops=20e9, peak_kind="fp32-gemm", peak_value=400.0, status="error"),
    ]
    fill_peak_fractions(rows)
    assert rows[0].achieved_gflops == 200.0 and rows[0].peak_fraction == 0.5
    assert rows[1].achieved_gflops == 800.0 and rows[1].peak_fraction == 0.5
    assert rows[2].achieved_gflops == 400.0 and rows[2].peak_fraction is None  # no peak of that kind measured
    assert rows[3].achieved_gbps == 200.0 and rows[3].peak_fraction == 5.0  # GB/s judged against memory
    assert rows[4].achieved_gflops is None and rows[4].peak_fraction is None  # failed rows are never fast


def test_committed_results_still_load_and_gate(tmp_path: Path) -> None:
    files = sorted(
        p
        for p in RESULTS.glob("*.json")
        if json.loads(p.read_text()).get("schema", "").startswith("vlexport-bench/")
    )
    assert files, RESULTS
    for path in files:
        rows, meta = read_rows(path)
        assert rows and all(r.latency_p50_ms or not r.ok for r in rows)
        assert not compare(rows, rows).failed, path
    # A schema-1 baseline against a current file that carries the new fields: the gate judges ratios as
    # before.
    base, _ = read_rows(RESULTS / "cpu-ci.json")
    current = [
        BenchRow(**{**r.__dict__, "work_flops": 1e9, "peak_kind": "fp32-gemm", "peak_value": 100.0})
        for r in base
    ]
    fill_speedups(current)
    fill_peak_fractions(current)
    write_rows(tmp_path / "now.json", current, peaks=[{"device": "cpu"}])
    again, meta = read_rows(tmp_path / "now.json")
    assert meta["schema"] == SCHEMA and meta["peaks"] == [{"device": "cpu"}]
    assert all(r.peak_fraction is not None for r in again if r.ok)
    report = compare(base, again)
    assert not report.failed and report.compared == len([r for r in base if r.backend != "eager"])
