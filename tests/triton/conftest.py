"""Fixtures of the Triton tests: one repository of tiny artifacts and one real server per test session.

The integration tests (marked ``xdist_group("triton-server")``, run with ``--dist loadgroup``) share one
server: it starts once, loads every model, and is stopped by PID at the end of the session.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.triton.server import Server, missing_reason

# Sizes no preset has (nothing in the serving path may be keyed to preset names or sizes).
_ODD_SIZES = {
    "vision_config": {"hidden_size": 40, "intermediate_size": 72, "image_size": 48, "num_attention_heads": 5},
    "text_config": {
        "hidden_size": 48,
        "intermediate_size": 80,
        "encoder_hidden_size": 40,
        "max_position_embeddings": 40,
        "num_attention_heads": 6,
    },
}


def odd_blip_checkpoint(root: Path) -> Path:
    """A save_pretrained BLIP captioning directory with non-preset sizes, its own tokenizer and processor."""
    import torch
    from transformers import AutoConfig, BlipForConditionalGeneration, PreTrainedTokenizerFast

    from vlexport.presets import get_preset
    from vlexport.runtime.tokenizer import build_placeholder

    d = get_preset("blip-tiny").config_dict()
    for sub, values in _ODD_SIZES.items():
        d[sub].update(values)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(3)
    model = BlipForConditionalGeneration(config).eval()
    src = root / "odd-blip-caption"
    model.save_pretrained(src)
    text = config.text_config
    settings = {
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "sep_token_id": text.sep_token_id,
        "eos_token_id": [text.sep_token_id],
    }
    tok = build_placeholder(text.vocab_size, settings, (("bos_token_id",), ("sep_token_id",)))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(src)
    (src / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.5, 0.4, 0.3],
                "image_std": [0.25, 0.2, 0.3],
                "rescale_factor": 1 / 255,
                "resample": 2,
            }
        )
    )
    return src


@pytest.fixture(scope="session")
def triton_artifacts(exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name in the repository -> artifact directory (shared tiny exports, plus the non-preset checkpoint)."""
    import vlexport
    from vlexport.pipeline import ExportJob, run_export

    reason = missing_reason()
    if reason:  # before any export: without the server these artifacts serve no test
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("triton-artifacts")
    odd = root / "odd"
    run_export(ExportJob(str(odd_blip_checkpoint(root)), odd))
    opt = exported("blip2-opt-tiny", "generate")
    # an int4 variant: MatMulNBits, GatherBlockQuantized and ORT's fused attention in the served graphs
    opt4 = root / "opt4"
    vlexport.quantize(opt, out=opt4, precision="int4-weight", quantize_embeddings=True)
    return {
        "itm": exported("bridgetower-tiny", "itm"),
        "caption": exported("blip-tiny", "caption"),
        "opt": opt,
        "opt4": opt4,
        "odd": odd,
    }


@pytest.fixture(scope="session")
def triton_repo(triton_artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlexport.serve.triton_config import ServeOptions
    from vlexport.serve.triton_repo import write_repository

    repo = tmp_path_factory.mktemp("triton") / "repo"
    opts = ServeOptions(
        max_batch_size=8, kind="cpu", backend="python-onnxruntime", ensemble=True, max_queue_delay_us=2000
    )
    for name, directory in triton_artifacts.items():  # one run per artifact: each extends the repository
        ensemble = name == "itm"  # generative artifacts take no --ensemble (their model is the pipeline)
        write_repository(
            [directory], repo, replace(opts, ensemble=ensemble), name=name, backend="python-onnxruntime"
        )
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    models = sorted(p.name for p in triton_repo.iterdir() if (p / "config.pbtxt").is_file())
    server = Server(triton_repo, models, tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    try:
        server.startup_s = server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def clients(triton_server: Server):
    from tritonclient import grpc, http

    # used from the test thread only: tritonclient's http client (gevent) must stay on the thread that made it
    made = {
        "http": http.InferenceServerClient(triton_server.http_url, network_timeout=120.0),
        "grpc": grpc.InferenceServerClient(triton_server.grpc_url),
    }
    yield made
    for client in made.values():  # clients first, then the server (the server fixture stops it afterwards)
        client.close()
    time.sleep(0.1)
