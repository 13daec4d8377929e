"""``ambert serve`` (sw/server.py): the API, batching, bad requests, a full queue, and the real server on an
ephemeral loopback port started and stopped by the test."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from ambert.sw.quant import artifact
from ambert.sw.quant.hf import encode, mean_pool
from ambert.sw.server import ServedModel, ServerConfig, build_app
from conftest import WORDS


@pytest.fixture(scope="module")
def served(tiny, tiny_bert_dir, tmp_path_factory):
    """Two models (the tiny one and a variant), their artifacts, and the embeddings the reference gives."""
    import dataclasses
    folder = tmp_path_factory.mktemp("serve")
    qm = tiny[0]
    layer = qm.layers[0]
    variant = dataclasses.replace(qm, layers=[dataclasses.replace(layer, w1=torch.flip(layer.w1, [0]).contiguous()),
                                              *qm.layers[1:]])
    paths = {n: str(artifact.save(m, folder / f"{n}.safetensors")) for n, m in (("tiny", qm), ("variant", variant))}

    def want(name, sentences):
        model = qm if name == "tiny" else variant
        enc = encode(tiny[2], sentences)
        hidden = model.forward(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])   # dequantized
        return mean_pool(hidden, enc["attention_mask"]).tolist()

    models = [ServedModel(n, p, tiny_bert_dir) for n, p in paths.items()]
    return models, want


def _client(config):
    from starlette.testclient import TestClient
    return TestClient(build_app(config))


SENTENCES = [" ".join(WORDS[i:i + 5]) for i in range(0, 40, 4)]


def test_both_apis_answer_with_the_reference_embeddings(served):
    models, want = served
    with _client(ServerConfig(models)) as client:
        got = client.post("/embed", json={"inputs": SENTENCES[:3]}).json()
        assert got == want("tiny", SENTENCES[:3])                         # the first model is the default
        one = client.post("/embed", json={"inputs": SENTENCES[0], "model": "variant"}).json()
        assert one == want("variant", SENTENCES[:1])
        r = client.post("/v1/embeddings", json={"input": SENTENCES[:2], "model": "variant"}).json()
        assert [d["embedding"] for d in r["data"]] == want("variant", SENTENCES[:2])
        assert r["object"] == "list" and [d["index"] for d in r["data"]] == [0, 1] and r["usage"]["prompt_tokens"] > 0
        assert client.get("/health").json()["models"] == ["tiny", "variant"]
        metrics = client.get("/metrics").text
        assert 'ambert_requests_total{endpoint="/embed",status="200"} 2.0' in metrics
        assert "ambert_pool_bytes_in_use" in metrics and "ambert_batch_sentences_count" in metrics


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    models, want = served
    app = build_app(ServerConfig(models, max_batch=8, max_wait_s=0.2))
    import httpx

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                replies = await asyncio.gather(*(client.post("/embed", json={"inputs": [s]}) for s in SENTENCES[:6]))
                metrics = (await client.get("/metrics")).text
        return [r.json() for r in replies], metrics

    replies, metrics = asyncio.run(main())
    assert replies == [want("tiny", [s]) for s in SENTENCES[:6]]
    batches = float(metrics.split("ambert_batch_sentences_count ")[1].split()[0])
    assert batches < 6                                                    # some ran together


def test_a_batch_forms_when_the_thread_takes_it_oldest_request_first(served, monkeypatch):
    """Requests that arrive while a batch runs all ride in their model's next batch; the model whose
    request has waited longest goes first."""
    from ambert.sw import server
    models, want = served
    ran, real = [], server._Engine.run_batch

    def recorded(self, name, sentences):
        ran.append((name, len(sentences)))
        if len(ran) == 1:
            time.sleep(0.5)                         # the first batch runs while the others arrive
        return real(self, name, sentences)

    monkeypatch.setattr(server._Engine, "run_batch", recorded)
    app = build_app(ServerConfig(models, max_batch=8))
    import httpx

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                first = asyncio.ensure_future(client.post("/embed", json={"inputs": [SENTENCES[0]]}))
                await asyncio.sleep(0.2)
                later = []
                for k, name in enumerate(["variant", "tiny", "tiny", "variant", "tiny"]):
                    later.append(asyncio.ensure_future(client.post("/embed", json={"inputs": [SENTENCES[k + 1]],
                                                                                  "model": name})))
                    await asyncio.sleep(0.01)
                return (await first).json(), [(await r).json() for r in later]

    first, later = asyncio.run(main())
    assert ran == [("tiny", 1), ("variant", 2), ("tiny", 3)]
    assert first == want("tiny", SENTENCES[:1])
    assert later == [want(name, [SENTENCES[k + 1]])
                     for k, name in enumerate(["variant", "tiny", "tiny", "variant", "tiny"])]


@pytest.mark.parametrize("body, status, why", [
    (b"{not json", 400, "the body is not JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"text": "x"}).encode(), 400, "missing 'inputs'"),
    (json.dumps({"inputs": 5}).encode(), 400, "must be a string or a list of strings"),
    (json.dumps({"inputs": ["ok", 7]}).encode(), 400, "input 1 is a int, not text"),
    (json.dumps({"inputs": []}).encode(), 422, "no input given"),
    (json.dumps({"inputs": ["the cat", "  "]}).encode(), 422, "input 1 is empty"),
    (json.dumps({"inputs": "the cat", "model": "gpt"}).encode(), 404, "no model named 'gpt'"),
    (json.dumps({"inputs": " ".join(["cat"] * 40)}).encode(), 413, "tokens long; model 'tiny' takes at most 24"),
    (json.dumps({"inputs": ["the cat"] * 300}).encode(), 413, "300 inputs in one request; at most 256"),
    (b'{"inputs": "caf\xe9"}', 400, "the body is not JSON"),                      # not UTF-8
    (json.dumps({"inputs": "caf\udce9"}).encode(), 400, "input 0 is not valid UTF-8 text"),   # a lone surrogate
])
def test_bad_requests_get_a_status_and_a_reason(served, body, status, why):
    models, _ = served
    with _client(ServerConfig(models)) as client:
        r = client.post("/embed", content=body)
        assert r.status_code == status and why in r.json()["error"], r.text
        assert client.post("/embed", json={"inputs": "the cat"}).status_code == 200     # and it goes on


def test_a_full_queue_answers_503_with_retry_after(served):
    models, _ = served
    with _client(ServerConfig(models, queue_limit=4)) as client:
        r = client.post("/embed", json={"inputs": SENTENCES[:5]})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "limit 4" in r.json()["error"]
        assert client.post("/embed", json={"inputs": SENTENCES[:4]}).status_code == 200


def test_models_past_the_memory_budget_keep_answering(served):
    models, want = served
    from ambert.sw.runtime.pool import tensor_bytes
    size = tensor_bytes(artifact.read_header(models[0].artifact))     # room for one model, not two
    with _client(ServerConfig(models, memory_budget=size + size // 2)) as client:
        for name in ("tiny", "variant", "tiny", "variant"):
            assert client.post("/embed", json={"inputs": SENTENCES[:2], "model": name}).json() == want(name, SENTENCES[:2])
        assert client.app.state.engine.pool.evictions == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, path, payload, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_the_server_on_loopback_serves_and_stops_cleanly_on_sigterm(served):
    """``ambert serve`` as a user starts it: on 127.0.0.1 only, answering, then SIGTERM: exit 0."""
    models, want = served
    port = _free_port()
    args = [str(os.path.join(os.path.dirname(sys.executable), "ambert")), "serve", "--port", str(port),
            "--device", "cpu"]
    for m in models:
        args += ["--model-artifact", f"{m.name}={m.artifact}:{m.model_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _post(port, "/embed", {"inputs": "the cat"}, timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {proc.stdout.read()[-2000:]}")
                time.sleep(0.2)
        assert _post(port, "/v1/embeddings", {"input": SENTENCES[:2], "model": "variant"})["data"][1]["embedding"] \
            == want("variant", SENTENCES[:2])[1]
        with socket.socket() as s:                      # nothing on another address of this machine
            others = [a for a in socket.gethostbyname_ex(socket.gethostname())[2] if not a.startswith("127.")]
            if others:
                assert s.connect_ex((others[0], port)) != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out[-2000:]        # uvicorn ends by the signal it got
    assert "ready" in out and "stopped, every request answered" in out and "Traceback" not in out


@pytest.mark.parametrize("argv, why", [
    (["--model-artifact", "nameonly"], "write NAME=ARTIFACT or NAME=ARTIFACT:MODEL_FOLDER"),
    (["--model-artifact", "m=/nowhere.safetensors"], "model 'm': artifact /nowhere.safetensors does not exist"),
    (["--model-artifact", "m={a}", "--model-artifact", "m={a}"], "two models share a name"),
    (["--model-artifact", "m={a}", "--workers", "0"], "--workers must be at least 1, not 0"),
    (["--model-artifact", "m={a}", "--memory-budget", "-5"], "--memory-budget must be a positive number of bytes"),
])
def test_bad_serve_options_are_refused_by_name(served, capsys, argv, why):
    from ambert.sw.cli import main
    models, _ = served
    assert main(["serve", *(a.format(a=models[0].artifact) for a in argv)]) == 2
    assert why in capsys.readouterr().err


class _FailingDevice:
    """A backend whose every matmul fails: the runtime's fallback takes each one (same bits)."""
    name = "flaky"

    def __init__(self):
        from ambert.sw.runtime.base import Stats
        self.stats = Stats()

    def matmul(self, *args):
        from ambert.sw.runtime import DeviceError
        raise DeviceError("the device went away (injected)")

    def expect(self, *args):
        pass

    def run_layer(self, p, x8, x16, mask, matmul=None, next_p=None):
        from ambert.sw.quant.ref import ref_layer
        return ref_layer(x8, x16, p, mask, matmul=matmul)

    def close(self):
        pass


def test_a_device_that_fails_mid_batch_falls_back_with_the_same_bits(served):
    from ambert.sw.runtime.cpu import CpuDevice
    models, want = served
    with _client(ServerConfig(models)) as client:
        client.app.state.engine.devices = [_FailingDevice(), CpuDevice()]
        with pytest.warns(RuntimeWarning, match="injected"):
            got = client.post("/embed", json={"inputs": SENTENCES[:3]}).json()
        assert got == want("tiny", SENTENCES[:3])
        metrics = client.get("/metrics").text
        assert "ambert_fallback_ops_total 16.0" in metrics       # 8 matmuls a layer (attention's 2 too) x 2


def _start(models, *extra):
    port = _free_port()
    args = [str(os.path.join(os.path.dirname(sys.executable), "ambert")), "serve", "--port", str(port),
            "--device", "cpu", *extra]
    for m in models:
        args += ["--model-artifact", f"{m.name}={m.artifact}:{m.model_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            _post(port, "/embed", {"inputs": "the cat"}, timeout=5)
            return proc, port
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.2)


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def test_a_client_that_disconnects_mid_request_costs_nothing(served):
    models, want = served
    proc, port = _start(models)
    try:
        body = json.dumps({"inputs": SENTENCES}).encode()
        for cut in (len(body) // 2, len(body)):             # mid-body, and right after sending it all
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:cut])
        assert _post(port, "/embed", {"inputs": SENTENCES[:2]}) == want("tiny", SENTENCES[:2])
    finally:
        out = _stop(proc)
    assert "Traceback" not in out, out[-2000:]


def test_a_worker_killed_mid_batch_leaves_the_server_answering(served):
    """Two worker processes under load; one is killed while requests are in flight: the requests it held
    fail clearly (a closed connection), every answer given is right, and the server goes on answering."""
    import http.client
    import threading
    models, want = served
    proc, port = _start(models, "--workers", "2")
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [int(pid) for pid in children
                   if "ambert" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                   or "multiprocessing" in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")]
        assert len(workers) >= 2, children
        body = json.dumps({"inputs": SENTENCES}).encode()
        expected = want("tiny", SENTENCES)
        outcomes, stop = [], time.monotonic() + 3.0

        def client():
            while time.monotonic() < stop:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    outcomes.append(("answer", r.status, json.loads(r.read())))
                except (ConnectionError, http.client.HTTPException, OSError) as e:
                    outcomes.append(("failed", type(e).__name__, None))
                finally:
                    conn.close()

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(workers[0], signal.SIGKILL)
        for t in threads:
            t.join()
        answers = [o for o in outcomes if o[0] == "answer"]
        assert answers and all(status == 200 and got == expected for _, status, got in answers)
        answered, deadline = 0, time.monotonic() + 60
        while answered < 10 and time.monotonic() < deadline:
            try:
                assert _post(port, "/embed", {"inputs": SENTENCES[:2]}) == want("tiny", SENTENCES[:2])
                answered += 1
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)                              # a connection the dead worker held fails clearly
        assert answered == 10
    finally:
        _stop(proc)
