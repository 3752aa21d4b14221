"""The API's OpenAPI document against the API: Schemathesis, with and without a key, finds nothing.

A real server (uvicorn on 127.0.0.1, in a thread) serves a published and a private copy of the
tiny model; the Schemathesis CLI runs against it exactly as `schemathesis run URL --checks all`
does, bounded by --max-examples and a fixed seed, with the repository's schemathesis.toml.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from model_fixture import serving_home
from nanostream.store import keys
from nanostream.api.app import create_app

ROOT = Path(__file__).resolve().parents[1]
PRIVATE, PUBLIC = "m-00000000a1", "m-00000000b2"
PREDICT = "/v1/models/{model_id}/predict"


@dataclass(frozen=True)
class Server:
    url: str
    key: str
    spec: dict


@pytest.fixture(scope="module")
def server(datasets, tmp_path_factory):
    """A NANOSTREAM_HOME of its own with both models warm, served on a free local port."""
    home = tmp_path_factory.mktemp("schema-home")
    with serving_home(home, private=(PRIVATE,), public=(PUBLIC,)) as model:
        _, key = keys.create_key("schemathesis")
        uv = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not uv.started:  # poll with a bound: uvicorn sets it once it listens
                assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            url = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
            photo = ("file", (model.photos[0].name, model.photos[0].read_bytes(), "image/jpeg"))
            for model_id in (PUBLIC, PRIVATE):  # a first prediction loads the model: not part of the run
                warm = httpx.post(f"{url}/v1/models/{model_id}/predict", files=[photo],
                                  headers={"Authorization": f"Bearer {key}"}, timeout=120)
                assert warm.status_code == 200, warm.text
            yield Server(url, key, httpx.get(f"{url}/openapi.json", timeout=10).json())
        finally:
            uv.should_exit = True
            thread.join(30)


def test_the_schema_says_what_the_server_does(server):
    paths = server.spec["paths"]
    for path in ("/v1/models", "/v1/models/{model_id}"):
        assert paths[path]["get"]["security"] == [{"HTTPBearer": []}, {}]  # a key, or none at all
    predict = paths[PREDICT]["post"]
    assert predict["security"] == [{"HTTPBearer": []}, {}]
    content = predict["requestBody"]["content"]
    files = content["multipart/form-data"]["schema"]["properties"]["file"]
    urls = content["application/json"]["schema"]["properties"]["urls"]
    assert (files["minItems"], files["maxItems"]) == (urls["minItems"], urls["maxItems"]) == (1, 32)
    assert set(predict["responses"]) == {"200", "401", "403", "404", "413", "415", "422", "429", "503"}
    assert "Retry-After" in predict["responses"]["429"]["headers"]
    assert "malformed multipart" in predict["responses"]["422"]["description"]


@pytest.mark.parametrize("with_key", [False, True], ids=["anonymous", "with-key"])
def test_schemathesis_finds_nothing(server, with_key, tmp_path):
    har = tmp_path / "run.har"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json", "--checks", "all",
               "--max-examples", "10", "--seed", "1", "--generation-database", "none", "--no-color",
               "--report", "har", "--report-har-path", str(har)]
    if with_key:
        command += ["-H", f"Authorization: Bearer {server.key}"]
    # the hooks keep generated URLs off DNS (see there); everything else is the plain CLI, whose
    # Hypothesis keeps its caches in tmp_path rather than in the work tree
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py")),
           "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert f"Configuration:    {ROOT / 'schemathesis.toml'}" in run.stdout
    cases = re.search(r"^  (\d+) generated, (\d+) passed$", run.stdout, re.MULTILINE)  # no failure, no error
    assert cases and cases[1] == cases[2] and int(cases[1]) > 100, run.stdout[-8000:]
    # what it did: every operation, and predictions that really ran
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter((e["request"]["method"], e["request"]["url"].rsplit("/", 1)[-1], e["response"]["status"])
                       for e in entries)
    assert {"healthz", "models", PUBLIC} <= {name for _, name, _ in statuses}, statuses
    predict = Counter({status: n for (method, name, status), n in statuses.items()
                       if (method, name) == ("POST", "predict")})
    if with_key:
        assert predict[200] > 0, predict
    else:  # a burst reached the handler; the rest met the rate limit, as documented
        assert 0 < predict[429] < predict.total(), predict
