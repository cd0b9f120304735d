"""The MatMulNBits writer of the weight-only precisions (int8-weight, int4-weight; their pass is
quantize/onnx_weight_only.py): every MatMul with a constant weight becomes ONNX Runtime's ``MatMulNBits`` at
the config's ``weight_bits``.

Each weight is stored as 8- or 4-bit blocks of ``block_size`` values along the input dimension with one fp32
scale (and a zero point) per block, quantized by ONNX Runtime's own kernels (``quantize_matmul_8bits`` /
``_4bits``, what its ``MatMulNBitsQuantizer`` calls). The kernels run at the config's ``accuracy_level``, 4 by
default: on x86 the 8-bit MatMulNBits has a fast kernel only for int8 compute (activations quantized per
block inside the kernel, per call); its fp32/fp16/bf16 compute levels are reference loops, measured 20-40x
slower than the fp32 MatMul they replace (README, "Precisions"); the 4-bit kernel is fastest at level 4 too
(benchmarks/results/matmulnbits-micro.json). The CUDA provider ignores the level and computes in fp16.

The graph is rewritten one weight at a time: the source is opened without its external data, each weight is
read from the parent's data file, quantized and appended to the new one. A 14 GB BLIP-2 decoder quantizes
in ~1 GB of memory instead of loading twice its size, as ``MatMulNBitsQuantizer`` does. Embedding Gathers
stay fp32 unless the config's ``quantize_embeddings`` asks for ``GatherBlockQuantized`` (same width and
blocks; a tied lm_head reads the same bytes). ORT >= 1.22 has the x86 8-bit kernels; an older ORT is
refused up front (its CPU provider would fail on the first call).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from vlexport.contracts.precision import WeightOnlyConfig
from vlexport.errors import UsageError

MIN_ORT = (1, 22)  # the first ONNX Runtime with x86 kernels for 8-bit MatMulNBits (4-bit ones are older)


def check_runtime(precision: str) -> None:
    import onnxruntime

    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    if version < MIN_ORT:
        raise UsageError(
            f"{precision} needs ONNX Runtime >= {'.'.join(map(str, MIN_ORT))} (8-bit MatMulNBits "
            f"kernels on x86); {onnxruntime.__version__} is installed. Upgrade onnxruntime, or use "
            "--precision int8-dynamic."
        )


class _Tensors:
    """Initializer bytes in and out: the parent's (inline or external) and the new file's (inline or
    appended)."""

    def __init__(self, src: Path, dst: Path, external: bool) -> None:
        self.src_dir, self.location = src.parent, f"{dst.name}.data"
        # closed in close()
        self.out = open(dst.parent / self.location, "wb") if external else None  # noqa: SIM115
        self._inputs: dict[str, object] = {}

    def read(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(np.prod(t.dims, dtype=np.int64))
        path = str(self.src_dir / info["location"])
        f = self._inputs.get(path)
        if f is None:
            f = self._inputs[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
        f.seek(int(info.get("offset", 0)))
        return np.fromfile(f, dtype=dtype, count=count).reshape(tuple(t.dims))

    def write(self, t: TensorProto, array: np.ndarray | None = None) -> TensorProto:
        """``array`` under ``t``'s name, or the parent's ``t`` itself, as it is stored in the new file."""
        if array is None:
            if t.data_location != TensorProto.EXTERNAL:
                return t  # inline in the parent: small, stays inline
            array = self.read(t)
        out = numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), t.name)
        if self.out is None or out.ByteSize() < 1024:  # small constants stay inline, as onnx.save does
            return out
        offset = self.out.tell()
        pad = -offset % 4096  # page-aligned, so ORT can mmap each tensor
        self.out.write(b"\0" * pad)
        data = out.raw_data
        out.ClearField("raw_data")
        out.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self.location),
            ("offset", str(offset + pad)),
            ("length", str(len(data))),
        ):
            entry = out.external_data.add()
            entry.key, entry.value = key, value
        self.out.write(data)
        return out

    def close(self) -> None:
        for f in self._inputs.values():
            f.close()
        if self.out is not None:
            self.out.close()


def quantize_block(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's ``bits``-wide (4 or 8) block quantization of a [K, N] weight, by its own kernels (what
    ``MatMulNBitsQuantizer`` calls): packed [N, blocks, block_size * bits / 8] uint8, scales [N, blocks] and
    zero points [N, ceil(blocks * bits / 8)] (4-bit ones two to a byte)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    per_byte = 8 // bits
    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        weight = np.pad(weight, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block_size // per_byte), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    kernel(
        packed,
        np.ascontiguousarray(weight, dtype=np.float32),
        scales,
        zero_points,
        block_size,
        cols,
        rows,
        symmetric,
    )
    return packed, scales, zero_points


def _all_nodes(graph: onnx.GraphProto):
    """Every node, subgraphs (If / Loop bodies) included: an initializer a body reads must be kept."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def linear_weight(
    node: onnx.NodeProto, inits: dict[str, TensorProto], producer: dict[str, onnx.NodeProto]
) -> tuple[TensorProto, bool, onnx.NodeProto | None] | None:
    """``x @ W`` with a constant 2-D fp32 ``W``: (W's initializer, whether it is stored [N, K], the Transpose
    between them or None). The exporter writes ``nn.Linear`` three ways: MatMul on a pre-transposed
    initializer, Gemm(transB=1) where the module flattens to 2-D first (OPT's FFN), and MatMul on a
    Transpose of a tied weight (OPT's lm_head shares the embedding table)."""
    if node.domain or len(node.input) < 2:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        transposed = bool(attrs.get("transB", 0))
    elif node.op_type == "MatMul" and len(node.input) == 2:
        transposed = False
    else:
        return None
    via = None
    weight = inits.get(node.input[1])
    if weight is None and node.op_type == "MatMul":
        via = producer.get(node.input[1])
        perm = [a.ints for a in via.attribute if a.name == "perm"] if via is not None else []
        if via is None or via.op_type != "Transpose" or (perm and list(perm[0]) != [1, 0]):
            return None
        weight, transposed = inits.get(via.input[0]), True
    if weight is None or len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
        return None
    return weight, transposed, via


class _Rewrite:
    """The node-by-node rewrite of one graph: linears to MatMulNBits, embedding Gathers
    (``quantize_embeddings``) to GatherBlockQuantized, each weight quantized once (a tied table and its
    lm_head share the same bytes)."""

    def __init__(self, graph: onnx.GraphProto, config: WeightOnlyConfig, tensors: _Tensors) -> None:
        self.config, self.tensors, self.bits = config, tensors, config.weight_bits
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.uses = Counter(name for node in _all_nodes(graph) for name in node.input)
        self.uses.update(o.name for o in graph.output)
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[TensorProto] = []
        self.written: Counter[str] = Counter()
        # (initializer, stored [N, K]) -> (K, N, names of the packed [N, blocks, blob] bytes, scales, zps)
        self._quantized: dict[tuple[str, bool], tuple[int, int, list[str]]] = {}

    def quantized(self, weight: TensorProto, transposed: bool) -> tuple[int, int, list[str]]:
        """``weight`` (as ``x @ W``'s [K, N]; ``transposed``: stored [N, K]) in blocks, written once."""
        key = (weight.name, transposed)
        if key not in self._quantized:
            w = self.tensors.read(weight)
            w = w.T if transposed else w
            k, n = w.shape
            packed, scales, zero_points = quantize_block(
                w, self.bits, self.config.block_size, self.config.symmetric
            )
            del w
            base = f"{weight.name}{'' if transposed else '_kn'}"
            arrays = {f"{base}_Q{self.bits}": packed, f"{base}_scales": scales}
            if not self.config.symmetric:
                arrays[f"{base}_zero_points"] = zero_points
            self.new_inits += [self.tensors.write(TensorProto(name=name), a) for name, a in arrays.items()]
            self._quantized[key] = (k, n, list(arrays))
        return self._quantized[key]

    def linear(self, node: onnx.NodeProto) -> bool:
        found = linear_weight(node, self.inits, self.producer)
        if found is None:
            return False
        weight, transposed, via = found
        k, n, inputs = self.quantized(weight, transposed)
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = f"{node.output[0]}_nobias" if bias else node.output[0]
        self.nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0], *inputs],
                [out],
                name=f"{node.name}_Q{self.bits}" if node.name else "",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=self.bits,
                block_size=self.config.block_size,
                accuracy_level=self.config.accuracy_level,
            )
        )
        if bias:
            self.nodes.append(
                onnx.helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name}_bias")
            )
        self.written["MatMulNBits"] += 1
        self.uses[node.input[1]] -= 1
        if via is not None and self.uses[node.input[1]] == 0:  # the Transpose fed only quantized MatMuls
            self.uses[weight.name] -= 1
        return True

    def gather(self, node: onnx.NodeProto) -> bool:
        """An embedding lookup on a constant [rows, width] fp32 table, as ``GatherBlockQuantized`` over the
        table's blocks along its width: the very bytes MatMulNBits reads for ``x @ table.T``, so a tied
        lm_head and its embedding share one quantized table. Tables whose width is not a whole number of
        blocks stay fp32 (MatMulNBits pads the last block; the Gather would need its own copy)."""
        table = self.inits.get(node.input[0]) if node.op_type == "Gather" and not node.domain else None
        axis = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"]
        if (
            table is None
            or (axis and axis[0] != 0)
            or len(table.dims) != 2
            or table.data_type != TensorProto.FLOAT
            or table.dims[1] % self.config.block_size
        ):
            return False
        rows = table.dims[0]
        _, _, (packed, *rest) = self.quantized(table, transposed=True)
        # MatMulNBits takes the bytes as [rows, blocks, blob] and the Gather as [rows, width * bits / 8]: a
        # Reshape (ORT folds it at load) keeps one copy in the file
        view, shape = f"{packed}_rows", f"{packed}_rows_shape"
        if shape not in self.inits:
            self.inits[shape] = numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape)
            self.new_inits.append(self.inits[shape])
            self.nodes.append(
                onnx.helper.make_node("Reshape", [packed, shape], [view], name=f"{view}_reshape")
            )
        self.nodes.append(
            onnx.helper.make_node(
                "GatherBlockQuantized",
                [view, node.input[1], *rest],
                list(node.output),
                name=f"{node.name}_Q{self.bits}" if node.name else "",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=self.config.block_size,
                bits=self.bits,
            )
        )
        self.written["GatherBlockQuantized"] += 1
        self.uses[table.name] -= 1
        return True


def weight_only_nbits(
    src: Path,
    dst: Path,
    config: WeightOnlyConfig,
    *,
    external: bool,
    exclude: tuple[str, ...] = (),
    only: Collection[str] | None = None,
) -> dict[str, int]:
    """Write ``src`` to ``dst`` with its constant-weight MatMuls (and Gemms) as MatMulNBits of
    ``config.weight_bits`` (and, with ``config.quantize_embeddings``, its embedding Gathers as
    GatherBlockQuantized); returns how many of each op it wrote.

    ``exclude``: node names kept fp32; ``only``: the node names rewritten (None: every one the rule takes;
    the int8 activation schemes keep their left-out MatMuls this way, quantize/search.py ``write_kept``).
    ``external``: write the weights to ``dst.name + ".data"``.
    """
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    tensors = _Tensors(src, dst, external)
    rewrite = _Rewrite(graph, config, tensors)
    try:
        for node in graph.node:
            if (
                node.name in exclude
                or (only is not None and node.name not in only)
                or not (rewrite.linear(node) or (config.quantize_embeddings and rewrite.gather(node)))
            ):
                rewrite.nodes.append(node)
        uses = rewrite.uses
        nodes = [
            n for n in rewrite.nodes if not (n.op_type == "Transpose" and all(uses[o] == 0 for o in n.output))
        ]
        kept = [tensors.write(t) for t in graph.initializer if uses[t.name] > 0]
    finally:
        tensors.close()
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + rewrite.new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return {"MatMulNBits": 0, **rewrite.written}
