"""The generated repository in a real tritonserver (python backend, `--backend python-onnxruntime`): answers
equal eager's scores (within the artifact's tolerance) and `vlexport run`'s tokens exactly, concurrent
requests each get their own answer, malformed requests get a clear error and the server keeps serving."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.triton.client import generate, image_bytes, scores, strings, tensor

pytestmark = pytest.mark.xdist_group("triton-server")  # one server per session: these tests share a worker
TEXTS = ["a cat on a mat", "two dogs", "a red bus in the rain at night"]


def test_the_server_python_has_only_the_repository_requirements(triton_server, triton_repo) -> None:
    from tests.triton.server import env_python_lacks

    assert all(env_python_lacks(m) for m in ("torch", "transformers", "vlexport", "onnx")), (
        "the env is not bare"
    )
    assert not any(env_python_lacks(m) for m in ("numpy", "PIL", "tokenizers", "onnxruntime"))
    assert "tokenizers>=" in (triton_repo / "requirements.txt").read_text()


def _run(artifact: Path, image: bytes, tmp_path: Path, texts: list[str] = (), **kwargs):
    from vlexport.runtime.run import run_artifact

    path = tmp_path / f"img-{hash(image) & 0xFFFF}.png"
    path.write_bytes(image)
    return run_artifact(artifact, path, list(texts), device="cpu", **kwargs)


def _eager_itm(artifact: Path, image: bytes, texts: list[str], tmp_path: Path) -> dict[str, np.ndarray]:
    """The eager fp32 model's ITM scores on the inputs `vlexport run` builds (the reference validation
    uses)."""
    import torch

    from vlexport.contracts.manifest import Manifest
    from vlexport.models import get_family
    from vlexport.runtime.preprocess import image_settings, load_image
    from vlexport.runtime.texts import placeholder_batch as _placeholder_batch
    from vlexport.weights import load_model, source_from_manifest

    manifest = Manifest.read(artifact)
    task = get_family(manifest.family).task(manifest.task)
    path = tmp_path / "eager.png"
    path.write_bytes(image)
    pixels = load_image(path, image_settings(artifact, manifest))
    ids, mask = _placeholder_batch(artifact, texts)
    feeds = task.run_inputs(
        {"input_ids": ids, "attention_mask": mask, "pixel_values": np.repeat(pixels, len(texts), axis=0)}
    )
    model = load_model(source_from_manifest(manifest, artifact), manifest.task)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return task.scores({"logits": out.logits.numpy()}, len(texts))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_itm_ensemble_answers_image_and_texts_with_eager_scores(
    triton_server, clients, triton_artifacts, tmp_path: Path, protocol: str
) -> None:
    from vlexport.contracts.manifest import Manifest

    artifact = triton_artifacts["itm"]
    image = image_bytes(1)
    served = scores(clients[protocol], "itm", image, TEXTS)
    eager = _eager_itm(artifact, image, TEXTS, tmp_path)
    tol = Manifest.read(artifact).validation.tolerance
    assert set(served) == set(eager) == {"match_probability", "match_logit"}
    for name in eager:
        np.testing.assert_allclose(
            served[name], eager[name], atol=tol["atol"], rtol=tol["rtol"], err_msg=name
        )
    run = _run(artifact, image, tmp_path, TEXTS)  # and what `vlexport run` computes, line by line
    np.testing.assert_allclose(
        served["match_logit"], [line.score["match_logit"] for line in run.lines], atol=1e-5
    )


GENERATION = [  # (artifact, prompt, num_beams): BLIP caption, BLIP-2 OPT fp32 and int4, an odd checkpoint
    ("caption", None, None),
    ("caption", "a photo of", 3),
    ("opt", "what is in the picture?", None),
    ("opt", None, 2),
    ("opt4", "what is in the picture?", None),
    ("odd", None, None),
    ("odd", "a picture of", 2),
]


@pytest.mark.parametrize(
    ("name", "prompt", "beams"), GENERATION, ids=[f"{a}-{p is not None}-{b}" for a, p, b in GENERATION]
)
def test_generation_is_token_for_token_vlexport_run(
    triton_server, clients, triton_artifacts, tmp_path: Path, name: str, prompt: str | None, beams: int | None
) -> None:
    image = image_bytes(2)
    text, ids = generate(clients["grpc" if beams else "http"], name, image, prompt, num_beams=beams)
    run = _run(triton_artifacts[name], image, tmp_path, [prompt] if prompt else [], num_beams=beams)
    (line,) = run.lines
    assert ids == line.ids and len(ids) > 3
    assert text == line.output


def test_concurrent_requests_each_get_their_own_answer(
    triton_server, clients, triton_artifacts, tmp_path: Path
) -> None:
    cases = [("itm", image_bytes(10 + i), TEXTS[: 1 + i % 3]) for i in range(6)]
    cases += [("caption", image_bytes(20 + i), f"photo number {i}") for i in range(6)]
    expected = []
    for name, image, texts in cases:
        run = _run(triton_artifacts[name], image, tmp_path, [texts] if isinstance(texts, str) else texts)
        expected.append(
            run.lines[0].ids if isinstance(texts, str) else [line.score["match_logit"] for line in run.lines]
        )
    # every answer differs (by far more than 1e-5): a swapped or mixed-up one would be caught
    assert len({str(np.round(e, 3).tolist()) for e in expected}) == len(cases)

    def ask(i: int):
        from tritonclient import grpc, http

        name, image, texts = cases[i]
        # One client per thread: tritonclient's http client (gevent) must stay on the thread that made it.
        client = (
            http.InferenceServerClient(triton_server.http_url)
            if i % 2
            else grpc.InferenceServerClient(triton_server.grpc_url)
        )
        try:
            if isinstance(texts, str):
                return generate(client, name, image, texts)[1]
            return scores(client, name, image, texts)["match_logit"].tolist()
        finally:
            client.close()

    with futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(len(cases))))
    for i, (g, e) in enumerate(zip(got, expected)):
        if isinstance(cases[i][2], str):
            assert g == e, i  # token ids: exact
        else:
            np.testing.assert_allclose(g, e, atol=1e-5, err_msg=str(i))


def _bad_cases(good: bytes):
    B = "BYTES"
    return [  # (model, inputs as (name, array, dtype), what the error must say)
        ("itm", [("IMAGE", np.zeros([1], np.float32), "FP32"), ("TEXT", strings("a"), B)], "expects 'BYTES'"),
        ("itm", [("IMAGE", strings(good, good), B), ("TEXT", strings("a"), B)], "Expected [1], got [2]"),
        ("itm", [("IMAGE", strings(b"not an image"), B), ("TEXT", strings("a"), B)], "Cannot decode IMAGE"),
        ("itm", [("IMAGE", strings(good[:60]), B), ("TEXT", strings("a"), B)], "Cannot decode IMAGE"),
        ("itm", [("IMAGE", strings(good), B), ("TEXT", strings(""), B)], "empty string"),
        ("itm", [("IMAGE", strings(good), B), ("TEXT", strings("word " * 40), B)], "positions"),
        ("itm_model", [("input_ids", np.zeros([1, 4], np.int32), "INT32")], "missing required input"),
        ("caption", [("IMAGE", strings(good), B), ("TEXT", strings(""), B)], "empty string"),
        (
            "caption",
            [("IMAGE", strings(good), B), ("TEXT", strings("word " * 30), B)],
            "longer than the model's 64 positions",
        ),
        (
            "caption",
            [("IMAGE", strings(good), B), ("NUM_BEAMS", np.array([0], np.int32), "INT32")],
            "NUM_BEAMS must be in 1..16",
        ),
        ("opt", [("IMAGE", strings(b"\x89PNG\r\n\x1a\n" + b"x" * 40), B)], "Cannot decode IMAGE"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_malformed_request_gets_a_clear_error_and_the_server_keeps_serving(
    triton_server, clients, case: int
) -> None:
    good = image_bytes(3)
    model, inputs, message = _bad_cases(good)[case]
    client = clients["grpc" if case % 2 else "http"]
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [tensor(client, n, a, d) for n, a, d in inputs])
    assert message in err.value.message(), err.value.message()
    assert len(generate(client, "caption", good, max_new_tokens=3)[1]) == 4  # [bos] + 3: still serving
    assert scores(client, "itm", good, ["a"])["match_logit"].shape == (1,)


# ---------------------------------------------------------------- in-flight batching of generation
def _client_for(triton_server, i: int):
    from tritonclient import grpc, http

    # one client per thread: tritonclient's http client (gevent) must stay on the thread that made it
    if i % 2:
        return http.InferenceServerClient(triton_server.http_url, network_timeout=120.0)
    return grpc.InferenceServerClient(triton_server.grpc_url)


def _ask_all(triton_server, jobs: list[dict]) -> list[tuple[list[int], float, float]]:
    """Every job sent at once from its own thread: (token ids, start, end) per job, in job order."""
    import time

    def ask(i: int):
        client = _client_for(triton_server, i)
        try:
            job = jobs[i]
            t0 = time.monotonic()
            ids = generate(
                client,
                job["name"],
                job["image"],
                job.get("prompt"),
                num_beams=job.get("beams"),
                max_new_tokens=job.get("max_new"),
            )[1]
            return ids, t0, time.monotonic()
        finally:
            client.close()

    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(ask, range(len(jobs))))


def _expected(triton_artifacts, tmp_path: Path, job: dict) -> list[int]:
    run = _run(
        triton_artifacts[job["name"]],
        job["image"],
        tmp_path,
        [job["prompt"]] if job.get("prompt") else [],
        num_beams=job.get("beams"),
        max_new_tokens=job.get("max_new"),
    )
    return run.lines[0].ids


def test_a_burst_above_the_row_limit_is_batched_queued_and_answered_token_for_token(
    triton_server, clients, triton_artifacts, tmp_path: Path
) -> None:
    # 20 requests, 34 rows (beams count as rows) against the repository's limit of 8: prompts of different
    # lengths, beams and lengths mixed, two models; each answer must be what `vlexport run` gives it alone
    prompts = [None, "a photo of", "a red bus", "two"]
    jobs = [
        {
            "name": ("caption", "opt", "odd")[i % 3],
            "image": image_bytes(40 + i),
            "prompt": prompts[i % 4],
            "beams": (None, 3, None, 2)[i % 4],
            "max_new": (4, 12, 20, 7, 16)[i % 5],
        }
        for i in range(20)
    ]
    expected = [_expected(triton_artifacts, tmp_path, job) for job in jobs]
    got = _ask_all(triton_server, jobs)
    assert [g[0] for g in got] == expected


def test_short_requests_are_not_held_back_by_one_at_max_new_tokens(
    triton_server, clients, triton_artifacts, tmp_path: Path
) -> None:
    import threading
    import time

    from vlexport.contracts.manifest import Manifest

    limit = Manifest.read(triton_artifacts["caption"]).generation["max_positions"] - 1  # prompt: [bos]
    long = {"name": "caption", "image": image_bytes(60), "beams": 4, "max_new": limit}  # 4 of the 8 rows
    shorts = [{"name": "caption", "image": image_bytes(61 + i), "max_new": 1} for i in range(3)]
    expected = [_expected(triton_artifacts, tmp_path, job) for job in [long, *shorts]]
    assert len(expected[0]) == 1 + limit  # it really runs to the model's last position
    done = threading.Event()
    answers: list[tuple[int, list[int], float]] = []

    def keep_asking(i: int) -> None:  # short requests, one after the other, until the long one is answered
        client = _client_for(triton_server, i)
        try:
            while not done.is_set():
                ids = generate(client, "caption", shorts[i]["image"], max_new_tokens=1)[1]
                answers.append((i, ids, time.monotonic()))
        finally:
            client.close()

    threads = [threading.Thread(target=keep_asking, args=(i,)) for i in range(len(shorts))]
    try:
        (long_answer,) = _ask_all(triton_server, [long])  # warm-up of the short clients overlaps nothing
        for t in threads:
            t.start()
        time.sleep(0.05)
        (long_answer,) = _ask_all(triton_server, [long])
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert long_answer[0] == expected[0]
    assert all(ids == expected[1 + i] for i, ids, _ in answers)
    # answered as each finished: short requests came back while the long one was running
    during = [a for a in answers if long_answer[1] < a[2] < long_answer[2]]
    assert len(during) >= 2, (long_answer[1:], [a[2] for a in answers])


def test_a_client_that_goes_away_mid_generation_frees_its_rows(
    triton_server, clients, triton_artifacts, tmp_path: Path
) -> None:
    import time

    from tritonclient import grpc

    from vlexport.contracts.manifest import Manifest

    limit = Manifest.read(triton_artifacts["caption"]).generation["max_positions"] - 1
    client = grpc.InferenceServerClient(triton_server.grpc_url)
    inputs = [
        tensor(client, "IMAGE", strings(image_bytes(70)), "BYTES"),
        tensor(client, "NUM_BEAMS", np.array([16], np.int32), "INT32"),
        tensor(client, "MAX_NEW_TOKENS", np.array([limit], np.int32), "INT32"),
    ]
    try:
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("caption", inputs, client_timeout=0.02)  # the client gives up mid generation
    finally:
        client.close()
    deadline = time.monotonic() + 30
    while "was cancelled after" not in triton_server.log_tail(200_000) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "caption: the request was cancelled after" in triton_server.log_tail(200_000)
    jobs = [{"name": "caption", "image": image_bytes(71 + i), "max_new": 5} for i in range(3)]
    got = _ask_all(triton_server, jobs)  # still serving, exactly
    assert [g[0] for g in got] == [_expected(triton_artifacts, tmp_path, job) for job in jobs]
