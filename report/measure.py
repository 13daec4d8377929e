"""How the report and the benchmarks measure: the machine, wall time, memory of a process tree, device
cycles turned into time. One definition of each, shared by ``ambert.report`` and ``benchmarks/``."""

import http.client
import json
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["INT8_FEATURES", "cpu_description", "cpu_int8_features", "best_of_interleaved", "status_kib",
           "process_tree", "tree_memory", "gpipe_makespan", "link_cycles", "encoder_weight_bytes", "ServeProcess", "percentile"]

# the CPU features int8 GEMM kernels are built on (x86: AVX2's vpmaddubsw, AVX-512 VNNI, AMX; ARM: the
# dot-product and int8 matrix-multiply extensions)
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _cpuinfo():
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine()):
                model = value.strip()
            if key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_int8_features():
    """The CPU's model name and which of :data:`INT8_FEATURES` it has."""
    model, flags = _cpuinfo()
    return model, [f for f in INT8_FEATURES if f in flags]


def cpu_description():
    """One line: the CPU's model name and which of its features int8 kernels use."""
    model, have = cpu_int8_features()
    return f"{model}; int8 features: {', '.join(have) or 'none of ' + ', '.join(INT8_FEATURES)}"


def best_of_interleaved(fns, reps):
    """Best wall time in seconds of each function, the runs interleaved (a machine whose speed drifts
    slows every contender alike)."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def status_kib(field, pid="self"):
    """A ``VmRSS`` / ``VmHWM`` line of ``/proc/<pid>/status``, in KiB. (VmHWM, not getrusage's
    ru_maxrss: after fork + exec the latter still holds the parent's peak.)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status: memory figures need Linux")


def process_tree(pid):
    """``pid`` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [int(c) for c in subprocess.run(["pgrep", "-P", str(p)], capture_output=True,
                                                 text=True).stdout.split()]
    return out


def tree_memory(pid, weight_file):
    """``(peak RSS MiB, PSS MiB, PSS MiB of the mappings of weight_file)``, each summed over ``pid``'s
    process tree. PSS counts a page shared by n processes as 1/n in each: summed, a file mapped by every
    worker counts once."""
    peak = pss = weights = 0
    name = Path(weight_file).name
    for p in process_tree(pid):
        try:
            peak += status_kib("VmHWM", p)
            current = None
            for line in Path(f"/proc/{p}/smaps").read_text().splitlines():
                parts = line.split()
                if "-" in parts[0] and len(parts) >= 5:
                    current = parts[-1] if len(parts) >= 6 else ""
                elif line.startswith("Pss:"):
                    kib = int(parts[1])
                    pss += kib
                    if current and Path(current).name == name:
                        weights += kib
        except (OSError, RuntimeError):
            continue                    # a process that ended while we read it
    return peak / 1024, pss / 1024, weights / 1024


def link_cycles(nbytes, bytes_per_s, clock_hz):
    """Device clock cycles that moving ``nbytes`` over a link of ``bytes_per_s`` takes."""
    return nbytes / bytes_per_s * clock_hz


def gpipe_makespan(stage_micro, send_cycles):
    """Replay GPipe's forward schedule from each stage's cycles per micro-batch: stage s starts micro-batch
    i when it has finished i - 1 and stage s - 1 has finished i and sent it (``send_cycles``)."""
    p, m = len(stage_micro), len(stage_micro[0])
    done = [[0.0] * m for _ in range(p)]
    for s in range(p):
        for i in range(m):
            ready = max(done[s][i - 1] if i else 0.0, done[s - 1][i] + send_cycles if s else 0.0)
            done[s][i] = ready + stage_micro[s][i]
    return done[-1][-1]


def encoder_weight_bytes(qm):
    """Bytes of the encoder's int8 weights and int32 biases, as the artifact stores them (a tile-pruned
    model's weights by their non-zero tiles and tile masks)."""
    from ambert.sw.quant.artifact import stored_weights
    return sum(t.numel() * t.element_size() for t in stored_weights(qm).values())


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class ServeProcess:
    """An ``ambert serve`` process on a free loopback port, started (and answering) on ``with`` entry and
    drained with SIGTERM on exit. ``models``: ``(name, artifact path, Hugging Face folder)`` triples;
    ``extra``: more command-line arguments; ``fp32``: serve the FP32 model instead (``--baseline-fp32``)."""

    def __init__(self, models, *extra, fp32=False, start_s=300):
        self.models, self.extra, self.fp32, self.start_s = models, extra, fp32, start_s

    def __enter__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [str(Path(sys.executable).with_name("ambert")), "serve", "--port", str(self.port), "--device", "cpu",
                *self.extra]
        for name, path, folder in self.models:
            args += ["--model-artifact", f"{name}={path}:{folder}"]
        if self.fp32:
            args.append("--baseline-fp32")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.start_s
        while True:
            try:
                self.post(http.client.HTTPConnection("127.0.0.1", self.port, timeout=60), self.models[0][0], "warm up")
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"the server did not start: {self.proc.stdout.read()[-2000:]}") from None
                time.sleep(0.3)

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()

    @property
    def pid(self):
        return self.proc.pid

    @staticmethod
    def post(conn, model, sentence):
        conn.request("POST", "/embed", json.dumps({"inputs": [sentence], "model": model}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        return body

    def load(self, models, sentences, clients, seconds):
        """Closed-loop clients (each sends the next sentence as soon as its answer comes) for ``seconds``,
        requests alternating over ``models``: ``(sentences/s, sorted latencies in s)``."""
        latencies, lock, stop_at, errors = [], threading.Lock(), time.monotonic() + seconds, []

        def client(k):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            i, mine = k, []
            while time.monotonic() < stop_at:
                t = time.monotonic()
                try:
                    self.post(conn, models[i % len(models)], sentences[i % len(sentences)])
                except Exception as e:      # noqa: BLE001 - reported below, the run is void
                    errors.append(e)
                    return
                mine.append(time.monotonic() - t)
                i += clients
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        return len(latencies) / (time.monotonic() - t0), sorted(latencies)
