"""The HTTP API with micro-batching on and off: images per second and latency, one run.

Trains a small model on a slice of hymenoptera (in a temporary NANOSTREAM_HOME), then for each
mode starts `python -m nanostream serve` on a free local port (--no-batching for the baseline),
warms both up, and sends a fixed number of single-image requests (real photos from
hymenoptera/val, multipart, with an API key) at concurrency 1 and 8 from threads with their
own httpx clients, alternating the two servers for a few rounds. Prints a table of medians and
the batched/unbatched throughput ratio at concurrency 8, then stops the servers.

    python bench/bench_serve.py                          # 3 rounds of 64 requests per setting
    python bench/bench_serve.py --rounds 1 --requests 32 # quicker, noisier

Every request and server start has a timeout and the servers are stopped in `finally`, so the
run ends by itself. Other load on the machine shows up in the numbers: the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

START_TIMEOUT_S = 180     # the server imports torch and loads nothing until the first request
REQUEST_TIMEOUT_S = 120   # one request, queueing included; far above any healthy latency
WARMUP = 32               # requests at concurrency 8 before measuring: loads the model and lets
                          # oneDNN build its kernels for the batch sizes that occur


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_model(home: Path, per_class: int) -> str:
    """A model trained on per_class photos of each class of hymenoptera/train; returns its id."""
    from nanostream.data import scan_folder
    from nanostream.models import save_trained
    from nanostream.paths import datasets_dir
    from nanostream.train import TrainConfig, train

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


def request_photos(n: int) -> list[tuple[str, bytes]]:
    from nanostream.paths import datasets_dir

    photos = sorted((datasets_dir() / "hymenoptera" / "val").glob("*/*.jpg"))[:n]
    return [(p.name, p.read_bytes()) for p in photos]


class Server:
    """`python -m nanostream serve` in a subprocess, for as long as the with-block runs."""

    def __init__(self, home: Path, batching: bool):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "nanostream", "serve", "--port", str(self.port)]
        if not batching:
            command.append("--no-batching")
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

    def batch_stats(self, model_id: str) -> dict:
        """The server's forward-pass counters for the model (zeros with batching off)."""
        health = httpx.get(f"{self.url}/healthz", timeout=10, trust_env=False).json()
        return health["batches"].get(model_id, {"batches": 0, "images": 0})

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


def run_load(url: str, headers: dict, photos: list[tuple[str, bytes]], requests: int,
             concurrency: int) -> dict:
    """`requests` single-image predictions from `concurrency` threads; throughput and latency."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=headers, trust_env=False) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = photos[i % len(photos)]
                t0 = time.perf_counter()
                try:
                    response = client.post(url, files=[("file", (name, data, "image/jpeg"))])
                    ok = response.status_code == 200
                    problem = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - t0
                with lock:
                    if problem:
                        errors.append(problem)
                    else:
                        latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else float("nan")

    return {"images_per_s": len(latencies) / wall, "p50_ms": 1000 * percentile(0.50),
            "p99_ms": 1000 * percentile(0.99), "ok": len(latencies), "errors": errors, "wall_s": wall}


def measure(server: Server, model_id: str, headers: dict, photos, requests: int, concurrency: int) -> dict:
    before = server.batch_stats(model_id)
    r = run_load(f"{server.url}/v1/models/{model_id}/predict", headers, photos, requests, concurrency)
    after = server.batch_stats(model_id)
    passes = after["batches"] - before["batches"]
    r["per_pass"] = (after["images"] - before["images"]) / passes if passes else 1.0
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="measured requests per setting and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two modes (medians reported)")
    parser.add_argument("--per-class", type=int, default=10, help="training photos per class")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="nanostream-bench-serve-"))
    os.environ["NANOSTREAM_HOME"] = str(home)
    try:
        import torch

        from nanostream import keys

        t0 = time.perf_counter()
        model_id = train_model(home, args.per_class)
        _, key = keys.create_key("bench")
        photos = request_photos(16)
        print(f"trained {model_id} in {time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
        headers = {"Authorization": f"Bearer {key}"}
        modes = {"batched": True, "unbatched": False}
        results: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in modes for c in args.concurrency}
        # Both servers run side by side (an idle one costs nothing) and the modes alternate,
        # so a burst of other load on the machine hits both rather than one.
        with contextlib.ExitStack() as stack:
            servers = {mode: stack.enter_context(Server(home, batching)) for mode, batching in modes.items()}
            for mode, server in servers.items():
                warm = measure(server, model_id, headers, photos, WARMUP, max(args.concurrency))
                if warm["errors"]:
                    raise RuntimeError(f"{mode} warm-up failed: {warm['errors'][0]}")
            for round_ in range(1, args.rounds + 1):
                for concurrency in args.concurrency:
                    for mode, server in servers.items():
                        r = measure(server, model_id, headers, photos, args.requests, concurrency)
                        results[mode, concurrency].append(r)
                        print(f"  round {round_} {mode:<9} c={concurrency}: {r['images_per_s']:6.1f} img/s  "
                              f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                              f"{r['per_pass']:4.1f} img/forward pass  ({r['ok']} ok, {len(r['errors'])} errors, "
                              f"device {server.health.get('device')})", flush=True)
                        for problem in r["errors"][:3]:
                            print(f"    error: {problem}")

        def median(runs: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        print(f"\n{args.requests} single-image requests per setting and round, {args.rounds} rounds (medians), "
              f"model {model_id} (efficientnet_lite0), load average now {os.getloadavg()[0]:.1f}")
        print(f"{'mode':<10} {'conc':>4} {'img/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'img/pass':>9} {'errors':>7}")
        for (mode, concurrency), runs in results.items():
            print(f"{mode:<10} {concurrency:>4} {median(runs, 'images_per_s'):8.1f} {median(runs, 'p50_ms'):9.1f} "
                  f"{median(runs, 'p99_ms'):9.1f} {median(runs, 'per_pass'):9.1f} "
                  f"{sum(len(r['errors']) for r in runs):>7}")
        top = max(args.concurrency)
        pairs = zip(results["batched", top], results["unbatched", top])
        ratios = [b["images_per_s"] / u["images_per_s"] for b, u in pairs]
        print(f"\nthroughput batched / unbatched at concurrency {top}: {statistics.median(ratios):.2f}x median "
              f"(rounds: {', '.join(f'{r:.2f}x' for r in ratios)}; target >= 2x)")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
