"""The HTTP API with micro-batching on and off, and one server for many models: images per
second, latency and memory, one run.

Trains a small model on a slice of hymenoptera (in a temporary NANOSTREAM_HOME), then for each
mode starts `python -m nanostream serve` on a free local port (--no-batching for the baseline:
the same server, each request running its own forward pass), warms both up, and sends a fixed
number of single-image requests (real photos from hymenoptera/val, multipart, with an API key)
at concurrency 1 and 8, alternating the two servers for a few rounds. The client is lean (one
keep-alive http.client connection per thread, request bodies built beforehand) because it runs
on the same CPU. Prints a table of medians, the batched/unbatched throughput ratio at the top
concurrency, and the server's CPU time per image in each mode, which other load on the
machine cannot distort the way it distorts throughput; then stops the servers.

    python bench/bench_serve.py                          # 5 rounds of 64 requests per setting
    python bench/bench_serve.py --rounds 1 --requests 32 # quicker, noisier

The many-models run registers copies of the model with heads of their own (as fast-mode
models on one backbone are) and sends each request to a random one of 8, at concurrency 8, to
two servers: the default, whose batcher batches across the models that share the backbone,
and `serve --per-model-batching`, which batches each model's requests apart. Then it starts
fresh servers with 8 and with 64 of the models loaded and reads their resident memory (the
target: 64 models in less than 1.5 times the memory of 8), and what loading cost a request:
the first one (backbone and head), the same model again, and a second model's first (its head).

    python bench/bench_serve.py --run many               # the many-models run alone

Every request and server start has a timeout and the servers are stopped in `finally`, so the
run ends by itself. Other load on the machine shows up in the throughput: the load average is
printed with every measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

START_TIMEOUT_S = 180     # the server imports torch and loads nothing until the first request
REQUEST_TIMEOUT_S = 120   # one request, queueing included; far above any healthy latency
WARMUP = 32               # requests at concurrency 8 before measuring: loads the model and lets
                          # oneDNN build its kernels for the batch sizes that occur
MANY = 8                  # models the many-models run spreads its requests over
MEMORY_COUNTS = (8, 64)   # models loaded in the servers whose memory is compared
MEMORY_TARGET = 1.5       # the issue's: 64 models in less than 1.5x the memory of 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_model(home: Path, per_class: int) -> str:
    """A model trained on per_class photos of each class of hymenoptera/train; returns its id."""
    from nanostream.engine.data import scan_folder
    from nanostream.engine.models import save_trained
    from nanostream.paths import datasets_dir
    from nanostream.engine.train import TrainConfig, train

    data = home / "data"
    for label in ("ants", "bees"):
        (data / label).mkdir(parents=True)
        photos = sorted((datasets_dir() / "hymenoptera" / "train" / label).glob("*.jpg"))[:per_class]
        if not photos:
            sys.exit(f"no photos under {datasets_dir()}/hymenoptera/train/{label}")
        for photo in photos:
            shutil.copy(photo, data / label / photo.name)
    result = train(scan_folder(data), TrainConfig(backbone="efficientnet_lite0", augment="none"))
    return save_trained(result)[0]


def copies_with_own_heads(home: Path, model_id: str, count: int) -> list[str]:
    """`count` models registered beside model_id: its bundle with the head's weights moved by
    seeded noise, so each answers differently on the same backbone features. Returns their ids."""
    import torch

    from nanostream.engine.bundle import read_bundle, save_bundle
    from nanostream.engine.models import model_path

    meta, tensors = read_bundle(model_path(model_id))
    weight = tensors["head.linear.weight"]
    ids = []
    for i in range(count):
        copy_id = f"m-{0xbe00000000 + i:010x}"
        moved = weight + weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(i))
        save_bundle(model_path(copy_id), {**meta, "model_id": copy_id}, {**tensors, "head.linear.weight": moved})
        ids.append(copy_id)
    return ids


def request_photos(n: int) -> list[tuple[str, bytes]]:
    from nanostream.paths import datasets_dir

    photos = sorted((datasets_dir() / "hymenoptera" / "val").glob("*/*.jpg"))[:n]
    return [(p.name, p.read_bytes()) for p in photos]


class Server:
    """`python -m nanostream serve` in a subprocess, for as long as the with-block runs."""

    def __init__(self, home: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "nanostream", "serve", "--port", str(self.port), *flags]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "NANOSTREAM_HOME": str(home)},
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=2, trust_env=False)
                if health.status_code == 200:
                    self.health = health.json()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a starting server, bounded by START_TIMEOUT_S
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {START_TIMEOUT_S} s")

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used, all its threads (Linux /proc; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss_mib(self) -> float:
        """The server's resident memory now (Linux /proc; NaN elsewhere)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return float("nan")
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kib) / 1024

    def health_now(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10, trust_env=False).json()

    def batch_stats(self) -> dict:
        """The server's forward-pass counters, summed over its networks (zeros with batching off)."""
        batches = self.health_now()["batches"].values()
        return {key: sum(b[key] for b in batches) for key in ("batches", "images", "mixed")}

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def multipart_body(name: str, data: bytes) -> tuple[bytes, str]:
    """One image in the multipart field 'file', as a browser or `curl -F` sends it: (body, content type)."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_load(url: str, targets: list[str], headers: dict, photos: list[tuple[str, bytes]], requests: int,
             concurrency: int) -> dict:
    """`requests` single-image predictions from `concurrency` threads, request i to the path
    targets[i % len(targets)]; throughput and latency.

    The client shares the CPU with the server, so it is kept lean: one keep-alive http.client
    connection per thread and request bodies built beforehand (~0.4 ms of CPU per request,
    where an httpx client costs ~3 ms). It costs the same in both modes either way.
    """
    parsed = urlsplit(url)
    bodies = [multipart_body(name, data) for name, data in photos]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=REQUEST_TIMEOUT_S)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body, content_type = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    connection.request("POST", targets[i % len(targets)], body=body,
                                       headers={**headers, "Content-Type": content_type})
                    response = connection.getresponse()
                    text = response.read()
                    problem = None if response.status == 200 else f"HTTP {response.status}: {text[:200]!r}"
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()  # reconnects on the next request
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        latencies.append(elapsed)
        finally:
            connection.close()

    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    client_cpu = time.process_time() - cpu_started
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else float("nan")

    return {"images_per_s": len(latencies) / wall, "p50_ms": 1000 * percentile(0.50),
            "p99_ms": 1000 * percentile(0.99), "ok": len(latencies), "errors": errors, "wall_s": wall,
            "client_cpu_ms": 1000 * client_cpu / max(1, requests)}


def predict_path(model_id: str) -> str:
    return f"/v1/models/{model_id}/predict"


def measure(server: Server, targets: list[str], headers: dict, photos, requests: int, concurrency: int) -> dict:
    before = server.batch_stats()
    cpu_before = server.cpu_seconds()
    r = run_load(server.url, targets, headers, photos, requests, concurrency)
    cpu_after = server.cpu_seconds()
    after = server.batch_stats()
    passes = after["batches"] - before["batches"]
    r["per_pass"] = (after["images"] - before["images"]) / passes if passes else 1.0
    r["mixed"] = (after["mixed"] - before["mixed"]) / passes if passes else 0.0  # passes serving 2+ models
    # The server's CPU time per image: what an image costs, whatever else the machine runs
    r["server_cpu_ms"] = (1000 * (cpu_after - cpu_before) / max(1, r["ok"])
                          if cpu_before is not None and cpu_after is not None else float("nan"))
    return r


def compare(home: Path, modes: dict[str, tuple[str, ...]], targets: list[str], headers: dict, photos,
            args, concurrencies: list[int]) -> dict[tuple[str, int], list[dict]]:
    """Servers with these flags side by side (an idle one costs nothing), warmed up on every
    target, then the modes alternating for args.rounds, so a burst of other load on the machine
    hits both rather than one."""
    warm_targets = list(dict.fromkeys(targets))  # each model first, so all are loaded before measuring
    results: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in concurrencies}
    with contextlib.ExitStack() as stack:
        servers = {mode: stack.enter_context(Server(home, *flags)) for mode, flags in modes.items()}
        for mode, server in servers.items():
            warm = measure(server, warm_targets, headers, photos, max(WARMUP, len(warm_targets)),
                           max(concurrencies))
            if warm["errors"]:
                raise RuntimeError(f"{mode} warm-up failed: {warm['errors'][0]}")
        for round_ in range(1, args.rounds + 1):
            for concurrency in concurrencies:
                for mode, server in servers.items():
                    r = measure(server, targets, headers, photos, args.requests, concurrency)
                    results[mode, concurrency].append(r)
                    print(f"  round {round_} {mode:<9} c={concurrency}: {r['images_per_s']:6.1f} img/s  "
                          f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                          f"{r['per_pass']:4.1f} img/forward pass  server CPU {r['server_cpu_ms']:5.1f} ms/img  "
                          f"client CPU {r['client_cpu_ms']:4.1f} ms/req  ({r['ok']} ok, {len(r['errors'])} errors, "
                          f"load average {os.getloadavg()[0]:.1f})", flush=True)
                    for problem in r["errors"][:3]:
                        print(f"    error: {problem}")
    return results


def report(results: dict[tuple[str, int], list[dict]], faster: str, slower: str, top: int, target: str) -> None:
    """The medians by mode and concurrency, and the throughput and CPU ratios at concurrency top."""
    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"{'mode':<10} {'conc':>4} {'img/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'img/pass':>9} {'mixed':>6} "
          f"{'srv CPU ms/img':>15} {'errors':>7}")
    for (mode, concurrency), runs in results.items():
        print(f"{mode:<10} {concurrency:>4} {median(runs, 'images_per_s'):8.1f} {median(runs, 'p50_ms'):9.1f} "
              f"{median(runs, 'p99_ms'):9.1f} {median(runs, 'per_pass'):9.1f} {median(runs, 'mixed'):6.2f} "
              f"{median(runs, 'server_cpu_ms'):15.1f} {sum(len(r['errors']) for r in runs):>7}")
    print("(mixed: the share of forward passes that served more than one model)")
    pairs = list(zip(results[faster, top], results[slower, top]))
    ratios = [b["images_per_s"] / u["images_per_s"] for b, u in pairs]
    print(f"\nthroughput {faster} / {slower} at concurrency {top}: {statistics.median(ratios):.2f}x median "
          f"(rounds: {', '.join(f'{r:.2f}x' for r in ratios)}; {target})")
    cpu_ratios = [u["server_cpu_ms"] / b["server_cpu_ms"] for b, u in pairs]
    print(f"server CPU per image {slower} / {faster} at concurrency {top}: {statistics.median(cpu_ratios):.2f}x "
          f"median (rounds: {', '.join(f'{r:.2f}x' for r in cpu_ratios)}): the throughput ratio where both "
          f"servers keep the CPU busy and nothing else runs")


def one_model_run(home: Path, model_id: str, headers: dict, photos, args) -> None:
    results = compare(home, {"batched": (), "unbatched": ("--no-batching",)}, [predict_path(model_id)],
                      headers, photos, args, args.concurrency)
    print(f"\n{args.requests} single-image requests per setting and round, {args.rounds} rounds (medians), "
          f"model {model_id} (efficientnet_lite0), load average now {os.getloadavg()[0]:.1f}")
    report(results, "batched", "unbatched", max(args.concurrency), "target >= 2x")


@dataclass(frozen=True)
class LoadedServer:
    """A fresh server after it loaded some models: its memory, and what loading cost a request."""

    idle_mib: float         # resident memory before the first request
    loaded_mib: float       # ... once every model answered
    per_network: dict       # /healthz "models_loaded": models on each network
    first_ms: float         # the very first request: loads the backbone (and traces it) and a head
    again_ms: float         # the same model once more: nothing to load
    another_ms: float       # a second model's first request: its head on the loaded backbone


def loaded_server(home: Path, models: list[str], headers: dict, photos, requests: int) -> LoadedServer:
    """A fresh server with `models` loaded. It answers `requests` in all: three alone (the first
    model twice, then the second), each model once, the rest to random ones; the same number
    whatever the count, so that the traffic's own memory (buffers, the allocator's arenas) is the
    same in the servers compared."""
    with Server(home) as server:
        idle = server.rss_mib()
        alone = [run_load(server.url, [predict_path(m)], headers, photos, 1, 1) for m in models[:1] * 2 + models[1:2]]
        rest = requests - len(alone) - len(models)
        targets = [predict_path(m) for m in models + random.Random(len(models)).choices(models, k=rest)]
        r = run_load(server.url, targets, headers, photos, len(targets), MANY)
        failed = [run["errors"][0] for run in (*alone, r) if run["errors"]]
        if failed:
            raise RuntimeError(f"loading {len(models)} models failed: {failed[0]}")
        first, again, another = (run["p50_ms"] for run in alone)
        return LoadedServer(idle, server.rss_mib(), server.health_now()["models_loaded"], first, again, another)


def many_models_run(home: Path, model_id: str, headers: dict, photos, args) -> None:
    models = copies_with_own_heads(home, model_id, max(MEMORY_COUNTS))
    chosen = random.Random(0).choices(models[:MANY], k=args.requests)  # the same sequence for both servers
    print(f"\nmany models: {MANY} models on one backbone (copies of {model_id} with heads of their own), "
          f"concurrency {MANY}, each request to a random one", flush=True)
    results = compare(home, {"across": (), "per-model": ("--per-model-batching",)},
                      [predict_path(m) for m in chosen], headers, photos, args, [MANY])
    print(f"\n{args.requests} single-image requests per mode and round, each to a random one of {MANY} models, "
          f"{args.rounds} rounds (medians), load average now {os.getloadavg()[0]:.1f}")
    report(results, "across", "per-model", MANY, "across: one batcher for every model on the backbone")

    print(f"\nserver memory (resident, MiB) with {' and '.join(map(str, MEMORY_COUNTS))} models loaded, "
          f"{args.memory_rounds} fresh server(s) each, {2 * max(MEMORY_COUNTS)} requests each:", flush=True)
    rss: dict[int, list[float]] = {n: [] for n in MEMORY_COUNTS}
    for round_ in range(1, args.memory_rounds + 1):
        for n in MEMORY_COUNTS:
            run = loaded_server(home, models[:n], headers, photos, 2 * max(MEMORY_COUNTS))
            rss[n].append(run.loaded_mib)
            print(f"  round {round_} {n:>3} models: {run.loaded_mib:7.1f} MiB (idle server {run.idle_mib:.1f} MiB; "
                  f"models per network {run.per_network}); first request {run.first_ms:.0f} ms, the same model "
                  f"again {run.again_ms:.0f} ms, a second model's first {run.another_ms:.0f} ms", flush=True)
    low, high = (statistics.median(rss[n]) for n in MEMORY_COUNTS)
    spread = ", ".join(f"{n} models {min(v):.0f}-{max(v):.0f} MiB" for n, v in rss.items())
    print(f"memory {MEMORY_COUNTS[1]} / {MEMORY_COUNTS[0]} models: {high / low:.2f}x median ({spread}; "
          f"target < {MEMORY_TARGET}x); each model past the {MEMORY_COUNTS[0]}th adds "
          f"{(high - low) / (MEMORY_COUNTS[1] - MEMORY_COUNTS[0]):.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="measured requests per setting and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two modes (medians reported)")
    parser.add_argument("--per-class", type=int, default=10, help="training photos per class")
    parser.add_argument("--run", choices=["one", "many", "both"], default="both",
                        help="one model batched and not, many models on one backbone, or both")
    parser.add_argument("--memory-rounds", type=int, default=2, help="fresh servers per model count")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="nanostream-bench-serve-"))
    os.environ["NANOSTREAM_HOME"] = str(home)
    try:
        import torch

        from nanostream.store import keys
        from nanostream.engine.device import machine_summary

        print(machine_summary(), flush=True)

        t0 = time.perf_counter()
        model_id = train_model(home, args.per_class)
        _, key = keys.create_key("bench")
        photos = request_photos(16)
        print(f"trained {model_id} in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
        headers = {"Authorization": f"Bearer {key}"}
        if args.run in ("one", "both"):
            one_model_run(home, model_id, headers, photos, args)
        if args.run in ("many", "both"):
            many_models_run(home, model_id, headers, photos, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
