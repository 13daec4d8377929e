"""``ambert serve``: sentence embeddings over HTTP, several models, concurrent requests batched.

The API embedding users already call:

* ``POST /embed`` — Hugging Face text-embeddings-inference's: ``{"inputs": "text" | ["text", …],
  "model": "name"?}`` → ``[[float, …], …]`` (mean-pooled, L2-normalised, as sentence-transformers gives);
* ``POST /v1/embeddings`` — the OpenAI shape: ``{"input": "text" | [...], "model": "name"}`` →
  ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...]}], "model": …,
  "usage": {"prompt_tokens": n, "total_tokens": n}}``;
* ``GET /health``; ``GET /metrics`` (Prometheus: requests, batch sizes, queue time, device cycles, pool
  bytes in use, evictions, fallbacks).

Models live in a :class:`ambert.sw.runtime.pool.ModelPool` (their weights mapped from the artifacts,
under ``--memory-budget``). Requests queue per model; one inference thread per process runs batches on
the device chain (``--device``, with the runtime's per-operation fallback: the same bits), each formed
when the thread is free to take it: the model whose oldest request has waited longest, with up to
``max_batch`` of its queued sentences. So every request that arrived while a batch ran rides in the
next batch of its model, and requests are served oldest first whatever their model. A request
that finds the thread free waits at most ``max_wait_s`` (default 0) for company. The integer model's bits
do not depend on the batch a sentence lands in.

Errors are JSON ``{"error": "...", "error_type": "..."}``: 400 for a body that is not the API's JSON,
404 for an unknown model, 413 for an input longer than the model takes or more inputs than a request may
carry (the limit named), 422 for an empty input, 503 with ``Retry-After`` when the queue is full.
"""

import asyncio
import collections
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["ServedModel", "ServerConfig", "build_app", "serve"]


@dataclass
class ServedModel:
    name: str
    artifact: str
    model_dir: str = None           # the tokenizer's folder (default: the bundled MiniLM's)
    fp32: bool = False              # serve the Hugging Face FP32 model of model_dir instead (a baseline)


@dataclass
class ServerConfig:
    models: list
    device: str = "cpu"
    max_batch: int = 32             # sentences per batch
    max_request: int = 256          # sentences per request
    max_wait_s: float = 0.0         # with the device free, how long a batch waits for company
    queue_limit: int = 1024         # sentences waiting, all models together
    memory_budget: int = None       # bytes of mapped weights
    extra: dict = field(default_factory=dict)

    def to_json(self):
        return json.dumps({**self.__dict__, "models": [m.__dict__ for m in self.models]})

    @classmethod
    def from_json(cls, text):
        d = json.loads(text)
        d["models"] = [ServedModel(**m) for m in d["models"]]
        return cls(**d)


class ApiError(Exception):
    def __init__(self, status, message, kind, headers=None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class _Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ambert_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.batch = Histogram("ambert_batch_sentences", "sentences per batch run", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue = Histogram("ambert_queue_seconds", "time from arrival to the start of its batch",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))
        self.cycles = Counter("ambert_device_cycles", "accelerator cycles (simulated or board devices)",
                              registry=r)
        self.fallbacks = Counter("ambert_fallback_ops", "matmuls run on a fallback backend", registry=r)
        self.pool_bytes = Gauge("ambert_pool_bytes_in_use", "bytes of model weights mapped", registry=r)
        self.evictions = Gauge("ambert_pool_evictions", "models evicted from the pool so far", registry=r)
        self.queued = Gauge("ambert_queued_sentences", "sentences waiting for a batch", registry=r)


class _Engine:
    """The models, their tokenizers, the device chain and the one inference thread of this process."""

    def __init__(self, config, metrics):
        from ambert.sw.quant.hf import load_tokenizer
        from ambert.sw.runtime.pool import ModelPool
        self.config, self.metrics = config, metrics
        self.pool = ModelPool(config.memory_budget)
        self.tokenizers, self.devices = {}, None
        from ambert.sw.quant.artifact import read_header
        self.fp32, self.limits = {}, {}         # limits: the tokens each model takes
        for m in config.models:
            size = self.pool.add(m.name, m.artifact)
            self.limits[m.name] = read_header(m.artifact)["config"]["max_positions"]
            self.tokenizers[m.name] = load_tokenizer(m.model_dir)
            if m.fp32:
                from ambert.sw.quant.hf import load_bert
                self.fp32[m.name] = load_bert(m.model_dir).eval()
            print(f"ambert serve: model {m.name!r} from {m.artifact} ({size / 2**20:.1f} MiB of weights)",
                  flush=True)
        # a Hugging Face fast tokenizer keeps its padding and truncation settings in shared state: the
        # event loop's checks and the inference thread's batches take turns with it
        self.tok_lock = threading.Lock()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="ambert-infer")
        self.queued = 0
        self.lock = threading.Lock()

    def _device_chain(self):
        from ambert.sw.runtime import device_chain
        if self.devices is None:
            self.devices = device_chain(self.config.device)
        return self.devices

    def run_batch(self, name, sentences):
        """Embeddings of ``sentences`` (one batch) with model ``name``: a float32 [n, C] tensor."""
        import torch
        from ambert.sw.quant.hf import encode, mean_pool
        from ambert.sw.runtime import OffloadedBert
        if name in self.fp32:
            with self.tok_lock:
                enc = encode(self.tokenizers[name], sentences, max_length=self.limits[name])
            with torch.no_grad():
                return mean_pool(self.fp32[name](**enc).last_hidden_state, enc["attention_mask"])
        qm = self.pool.get(name)
        with self.tok_lock:
            enc = encode(self.tokenizers[name], sentences, max_length=qm.config["max_positions"])
        module = OffloadedBert(qm, None, self._device_chain())
        with torch.no_grad():
            hidden = module(**enc).last_hidden_state
        st = module.last_stats
        m = self.metrics
        m.cycles.inc(st.cycles)
        m.fallbacks.inc(sum(v for k, v in st.ops.items() if k != self.devices[0].name))
        m.pool_bytes.set(self.pool.bytes_in_use)
        m.evictions.set(self.pool.evictions)
        return mean_pool(hidden, enc["attention_mask"])

    def check(self, name, sentences):
        """Refuse what no batch could take, before it queues: ApiError naming the problem."""
        from ambert.sw.quant.hf import check_text
        if name not in self.tokenizers:
            raise ApiError(404, f"no model named {name!r} (this server has {', '.join(self.tokenizers)})",
                           "NotFound")
        if not sentences:
            raise ApiError(422, "no input given", "Validation")
        if len(sentences) > self.config.max_request:
            raise ApiError(413, f"{len(sentences)} inputs in one request; at most {self.config.max_request}",
                           "Validation")
        limit = self.limits[name]
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise ApiError(400, f"input {i} is a {type(s).__name__}, not text", "Validation")
            try:
                check_text(s, f"input {i}")
            except ValueError as e:
                raise ApiError(400, str(e), "Validation") from None
            if not s.strip():
                raise ApiError(422, f"input {i} is empty", "Validation")
            n = self.count_tokens(name, s)
            if n > limit:
                raise ApiError(413, f"input {i} is {n} tokens long; model {name!r} takes at most {limit}",
                               "Validation")

    def count_tokens(self, name, sentence):
        with self.tok_lock:
            return len(self.tokenizers[name](sentence)["input_ids"])



class _Dispatcher:
    """Requests of every model, queued per model in arrival order, and the one inference thread that runs
    their batches (see the module's docstring). A batch is formed when the thread takes it — not when
    the previous one starts — so every request that arrived meanwhile rides in it: the model whose oldest
    request has waited longest goes next, with up to ``max_batch`` of its sentences (whole requests, in
    arrival order; a request larger than that runs alone). A request whose client went away before its
    batch formed is dropped unrun."""

    def __init__(self, engine):
        self.engine = engine
        self.pending = {m.name: collections.deque() for m in engine.config.models}
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def embed(self, name, sentences):
        engine, cfg = self.engine, self.engine.config
        with engine.lock:
            if engine.queued + len(sentences) > cfg.queue_limit:
                raise ApiError(503, f"the server is busy: {engine.queued} sentences queued (limit "
                                    f"{cfg.queue_limit}); try again shortly", "Overloaded", {"Retry-After": "1"})
            engine.queued += len(sentences)
            engine.metrics.queued.set(engine.queued)
        done = asyncio.get_running_loop().create_future()
        self.pending[name].append((sentences, done, time.monotonic()))
        self.wake.set()
        return await done

    def _release(self, sentences):
        with self.engine.lock:
            self.engine.queued -= len(sentences)
            self.engine.metrics.queued.set(self.engine.queued)

    def _oldest(self):
        """The model whose first live request arrived first, or None; drops requests already abandoned."""
        best = None
        for name, queue in self.pending.items():
            while queue and queue[0][1].done():
                self._release(queue.popleft()[0])
            if queue and (best is None or queue[0][2] < self.pending[best][0][2]):
                best = name
        return best

    async def _loop(self):
        loop = asyncio.get_running_loop()
        cfg = self.engine.config
        while True:
            name = self._oldest()
            if name is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            queue = self.pending[name]
            # the thread is free: wait for company at most max_wait_s after the oldest request came
            deadline = queue[0][2] + cfg.max_wait_s
            while sum(len(item[0]) for item in queue) < cfg.max_batch and time.monotonic() < deadline:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch, size = [], 0
            while queue and (not batch or size + len(queue[0][0]) <= cfg.max_batch):
                item = queue.popleft()
                if item[1].done():                  # its client went away
                    self._release(item[0])
                    continue
                batch.append(item)
                size += len(item[0])
            if batch:
                await self._run(loop, name, batch)

    async def _run(self, loop, name, batch):
        m, engine = self.engine.metrics, self.engine
        now = time.monotonic()
        for _, _, t in batch:
            m.queue.observe(now - t)
        sentences = [s for item in batch for s in item[0]]
        m.batch.observe(len(sentences))
        try:
            emb = await loop.run_in_executor(engine.thread, engine.run_batch, name, sentences)
        except Exception as e:          # noqa: BLE001 - every request of the batch learns why
            error = ApiError(500, f"the batch failed: {e}", "Backend")
            for _, done, _ in batch:
                if not done.done():
                    done.set_exception(error)
        else:
            rows = emb.tolist()
            i = 0
            for item, done, _ in batch:
                if not done.done():          # a client that went away leaves a cancelled future
                    done.set_result(rows[i:i + len(item)])
                i += len(item)
        finally:
            self._release(sentences)


def build_app(config):
    """The ASGI application (Starlette) serving ``config``."""
    from contextlib import asynccontextmanager
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = _Metrics()
    engine = _Engine(config, metrics)
    dispatch = []
    default = config.models[0].name

    @asynccontextmanager
    async def lifespan(app):
        dispatch.append(_Dispatcher(engine))
        print(f"ambert serve: ready ({len(config.models)} model(s), device {config.device})", flush=True)
        yield
        dispatch[0].task.cancel()
        engine.thread.shutdown(wait=True)
        print("ambert serve: stopped, every request answered", flush=True)

    async def body(request):
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}", "Validation") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "Validation")
        return data

    def inputs(data, key):
        if key not in data:
            raise ApiError(400, f"missing {key!r}: give a string or a list of strings", "Validation")
        value = data[key]
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ApiError(400, f"{key!r} must be a string or a list of strings", "Validation")
        return value

    async def run(request, endpoint, handler):
        from starlette.requests import ClientDisconnect
        try:
            response = await handler(request)
            status = 200
        except ClientDisconnect:            # gone before its body arrived: nobody to answer
            response, status = Response(status_code=499), 499
        except ApiError as e:
            response = JSONResponse({"error": str(e), "error_type": e.kind}, status_code=e.status, headers=e.headers)
            status = e.status
        metrics.requests.labels(endpoint, str(status)).inc()
        return response

    async def embeddings(request, key):
        """The request's model name, its sentences (under ``key``) and their embeddings."""
        data = await body(request)
        name = data.get("model", default)
        sentences = inputs(data, key)
        engine.check(name, sentences)
        return name, sentences, await dispatch[0].embed(name, sentences)

    async def embed(request):
        async def handle(request):
            return JSONResponse((await embeddings(request, "inputs"))[2])
        return await run(request, "/embed", handle)

    async def openai(request):
        async def handle(request):
            name, sentences, rows = await embeddings(request, "input")
            tokens = sum(engine.count_tokens(name, s) for s in sentences)
            return JSONResponse({"object": "list", "model": name,
                                 "data": [{"object": "embedding", "index": i, "embedding": r}
                                          for i, r in enumerate(rows)],
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return await run(request, "/v1/embeddings", handle)

    async def health(request):
        return JSONResponse({"status": "ok", "models": [m.name for m in config.models], "device": config.device})

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[Route("/embed", embed, methods=["POST"]),
                            Route("/v1/embeddings", openai, methods=["POST"]),
                            Route("/health", health), Route("/metrics", prometheus)], lifespan=lifespan)
    app.state.engine = engine
    return app


def app_from_environment():
    """The application for a uvicorn worker process (``--workers N``): its config from the environment."""
    import os
    return build_app(ServerConfig.from_json(os.environ["AMBERT_SERVE_CONFIG"]))


def serve(config, host="127.0.0.1", port=8080, workers=1):
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first. (uvicorn then ends the process
    by the signal it got, as a service manager expects: exit status -15 after SIGTERM.)"""
    import os
    import uvicorn
    if workers > 1:
        os.environ["AMBERT_SERVE_CONFIG"] = config.to_json()
        uvicorn.run("ambert.sw.server:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, log_level="warning", timeout_graceful_shutdown=30)
    else:
        uvicorn.run(build_app(config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
