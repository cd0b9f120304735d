"""int8-bnb: the bitsandbytes LLM.int8 eager baseline, loaded exactly as BLIP-2's documentation does it.

``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0})``:
the Linear layers become bitsandbytes ``Linear8bitLt`` (int8 matmuls, fp16 outlier columns above the
threshold), everything else fp16. It needs CUDA; on a machine without it the request is refused up front
(exit 2) with what to use instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlexport.errors import UsageError
from vlexport.quantize.precision import Int8BnbConfig


def check_available(device: str = "auto") -> None:
    """UsageError (exit 2) unless bitsandbytes and a CUDA device are both here."""
    import importlib.util

    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise UsageError("int8-bnb (bitsandbytes LLM.int8, load_in_8bit) runs on CUDA GPUs only, and no CUDA device "
                         "is available here. On CPU use int8-weight (ONNX MatMulNBits: `vlexport quantize DIR "
                         "--precision int8-weight`) or int8-dynamic.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("int8-bnb needs bitsandbytes: pip install 'vlexport[int8]' (bitsandbytes >= 0.45).")


def load_8bit(hf_class: Any, directory: str | Path, config: Int8BnbConfig | None = None) -> Any:
    """``hf_class`` from a save_pretrained ``directory`` with LLM.int8 weights on GPU 0 (BLIP-2's recipe)."""
    from transformers import BitsAndBytesConfig

    config = config or Int8BnbConfig()
    check_available()
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.threshold)
    return hf_class.from_pretrained(str(directory), quantization_config=quant, device_map={"": 0},
                                    dtype="float16").eval()
