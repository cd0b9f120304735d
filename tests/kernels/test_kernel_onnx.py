"""onnx_translation_table: the ops export through torch.onnx.export(dynamo=True) as ORT's fused contrib ops,
and ONNX Runtime (CPU) reproduces the reference on shapes other than the export example."""

from __future__ import annotations

import collections
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import vlexport_kernels
from torch import nn
from vlexport_kernels import use_backend

ort = pytest.importorskip("onnxruntime")

# fp32 tolerance, ORT vs the reference: MultiHeadAttention and SkipLayerNormalization compute the same math in
# fp32 in another summation order. Outputs are O(1) (up to ~4 after the LayerNorms); measured <= 1.5e-6 (block
# output, two LayerNorms deep) and <= 4e-7 (attention alone). A wrong mask or scale is off by > 1e-2.
FP32_ATOL = 1e-5
# fp16 graph vs the fp32 reference on the same fp16 inputs: ORT may round intermediates (scores, the sum
# before the LayerNorm) to fp16 where the reference keeps fp32 until its final cast: a couple of fp16 ulps at
# |y| < 8, i.e. <= 8e-3. Measured <= 5e-4.
FP16_ATOL = 1e-2

HIDDEN, HEADS = 32, 2


class TinyEncoderDecoderBlock(nn.Module):
    """Every way vlexport.inject calls the ops: self-attention under an HF additive padding mask (B, 1, 1, S),
    post-norm add + LayerNorm, cross-attention with a boolean key padding mask, a scaled (link tower) add +
    LayerNorm, and causal self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.cross_q = nn.Linear(HIDDEN, HIDDEN)
        self.cross_kv = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.norm1 = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.norm2 = nn.LayerNorm(HIDDEN, eps=1e-5)
        for norm in (self.norm1, self.norm2):
            nn.init.normal_(norm.weight, 1.0, 0.3)
            nn.init.normal_(norm.bias, 0.0, 0.3)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], HEADS, HIDDEN // HEADS).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], HIDDEN)

    def forward(self, x, mask, encoder, encoder_mask):
        q, k, v = (self.heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        hf_mask = (1.0 - mask[:, None, None, :].float()) * torch.finfo(
            torch.float32
        ).min  # HF's extended mask
        h = vlexport_kernels.add_layer_norm(
            self.merge(vlexport_kernels.attention(q, k, v, attn_bias=hf_mask)),
            x,
            self.norm1.weight,
            self.norm1.bias,
            self.norm1.eps,
        )
        ck, cv = (self.heads(t) for t in self.cross_kv(encoder).chunk(2, dim=-1))
        cross = vlexport_kernels.attention(
            self.heads(self.cross_q(h)), ck, cv, key_padding_mask=encoder_mask, scale=0.2
        )
        h = vlexport_kernels.add_layer_norm(
            self.merge(cross),
            h,
            self.norm2.weight,
            self.norm2.bias,
            self.norm2.eps,
            alpha=0.7,
            residual_scale=0.3,
        )
        causal = vlexport_kernels.attention(q, k, v, causal=True)
        return h, causal


def block_inputs(batch: int, seq: int, enc_seq: int) -> tuple[torch.Tensor, ...]:
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2 + 1 :] = 0  # right padding in the last sample
    encoder_mask = torch.rand(batch, enc_seq) > 0.3
    encoder_mask[:, 0] = True
    if batch > 1:
        encoder_mask[0] = False  # a sample with no encoder token: fully masked rows
    return torch.randn(batch, seq, HIDDEN), mask, torch.randn(batch, enc_seq, HIDDEN), encoder_mask


def export(module: nn.Module, args: tuple, dynamic_shapes, path: Path) -> onnx.ModelProto:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=vlexport_kernels.onnx_translation_table(),
            opset_version=18,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    return onnx.load(str(path))


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter((node.domain or "", node.op_type) for node in model.graph.node)


def run_ort(path: Path, args: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})


@pytest.fixture(scope="module")
def exported_block(tmp_path_factory) -> tuple[nn.Module, Path, onnx.ModelProto]:
    torch.manual_seed(0)
    block = TinyEncoderDecoderBlock().eval()
    batch, seq, enc = (torch.export.Dim(n, min=1, max=1024) for n in ("batch", "seq", "enc_seq"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: enc}, {0: batch, 1: enc})
    path = tmp_path_factory.mktemp("onnx") / "block.onnx"
    return block, path, export(block, block_inputs(2, 7, 5), dynamic, path)


def test_graph_holds_one_fused_node_per_op_call(exported_block) -> None:
    _, _, model = exported_block
    ops = op_counts(model)
    assert ops[("com.microsoft", "MultiHeadAttention")] == 3
    assert ops[("com.microsoft", "SkipLayerNormalization")] == 2
    assert ops[("", "Softmax")] == 0 and ops[("", "LayerNormalization")] == 0  # (MatMuls: the Linear layers)
    assert not any(node.domain == "vlexport" for node in model.graph.node)  # nothing left untranslated


@pytest.mark.parametrize(
    "shape", [(2, 7, 5), (3, 11, 4), (1, 1, 9), (4, 6, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_ort_matches_reference_on_other_shapes(exported_block, shape) -> None:
    block, path, _ = exported_block
    args = block_inputs(*shape)
    with torch.no_grad(), use_backend("reference"):
        expected = block(*args)
    got = run_ort(path, args)
    for name, g, e in zip(("block", "causal"), got, expected):
        assert g.shape == tuple(e.shape), name
        np.testing.assert_allclose(g, e.numpy(), atol=FP32_ATOL, rtol=0, err_msg=name)
        assert np.isfinite(g).all()


class Fp16Ops(nn.Module):
    """The other translation paths: a T5-style (1, H, Sq, Sk) fp32 bias on fp16 attention (clamped, cast), a
    2-D bias, and add_layer_norm on a rank-4 input (reshaped around SkipLayerNormalization)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(HIDDEN))
        self.bias = nn.Parameter(0.3 * torch.randn(HIDDEN))

    def forward(self, q, k, v, position_bias, bias_2d, x, residual):
        a = vlexport_kernels.attention(q, k, v, attn_bias=position_bias)
        b = vlexport_kernels.attention(q, k, v, attn_bias=bias_2d, causal=True)
        return a, b, vlexport_kernels.add_layer_norm(x, residual, self.weight, self.bias, 1e-5)


def test_fp16_and_broadcast_paths(tmp_path) -> None:
    def inputs(batch: int, sq: int, sk: int):
        f16 = torch.float16
        bias = torch.randn(1, HEADS, sq, sk)
        bias[..., -1] = torch.finfo(torch.float32).min  # -inf once cast to fp16 unless clamped
        return (
            torch.randn(batch, HEADS, sq, 16).to(f16),
            torch.randn(batch, HEADS, sk, 16).to(f16),
            torch.randn(batch, HEADS, sk, 16).to(f16),
            bias,
            torch.randn(sq, sk).to(f16),
            torch.randn(batch, 2, sq, HIDDEN).to(f16),
            torch.randn(batch, 2, sq, HIDDEN).to(f16),
        )

    module = Fp16Ops().half().eval()
    batch, sq, sk = (torch.export.Dim(n, min=1, max=1024) for n in ("batch", "sq", "sk"))
    dynamic = (
        {0: batch, 2: sq},
        {0: batch, 2: sk},
        {0: batch, 2: sk},
        {2: sq, 3: sk},
        {0: sq, 1: sk},
        {0: batch, 2: sq},
        {0: batch, 2: sq},
    )
    model = export(module, inputs(2, 5, 7), dynamic, tmp_path / "fp16.onnx")
    ops = op_counts(model)
    assert (
        ops[("com.microsoft", "MultiHeadAttention")] == 2
        and ops[("com.microsoft", "SkipLayerNormalization")] == 1
    )
    for shape in [(2, 5, 7), (3, 4, 9)]:
        args = inputs(*shape)
        with torch.no_grad(), use_backend("reference"):
            expected = module(*args)
        for g, e in zip(run_ort(tmp_path / "fp16.onnx", args), expected):
            assert g.dtype == np.float16 and np.isfinite(g).all()
            np.testing.assert_allclose(g.astype(np.float32), e.float().numpy(), atol=FP16_ATOL, rtol=0)
