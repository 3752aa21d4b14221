import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nanostream.cli.main import main

REPO = Path(__file__).resolve().parent.parent


def run_process(*args, check=True):
    """The CLI as a user runs it: a fresh process, exit status and both streams."""
    proc = subprocess.run([sys.executable, "-m", "nanostream", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run(*args, check=True):
    """The CLI's main() in this process, with its exit status and both streams: what a fresh
    process gives (run_process shows it for one command below), without a torch start per call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # a command that ends with sys.exit(2)
            code = exc.code
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_hymenoptera, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "ants-bees.safetensors"
    proc = run("train", tiny_hymenoptera, "--backbone", "efficientnet_lite0", "--views", "1",
               "--out", out, "--json")
    return last_json(proc), out, proc


def test_train_json_contract(trained):
    summary, out, proc = trained
    for key in ("model_id", "path", "accuracy", "backbone", "mode", "augment", "classes", "n_train", "n_val",
                "seconds", "per_class", "confusion", "candidates", "skipped"):  # every key it ever printed
        assert key in summary
    assert summary["classes"] == ["ants", "bees"] and (summary["n_train"], summary["n_val"]) == (12, 8)
    assert 0.5 <= summary["accuracy"] <= 1 and out.is_file() and summary["path"] == str(out)
    assert (summary["augment"], summary["mode"], summary["skipped"]) == ("default", "fast", [])
    assert set(summary["per_class"]["ants"]) >= {"precision", "recall", "n"} and len(summary["confusion"]) == 2
    assert set(summary["candidates"][0]) == {"backbone", "cv_accuracy", "seconds", "gflops", "error", "photos"}
    assert summary["candidates"][0]["photos"] == 0  # one backbone asked for: nothing scored
    assert summary["project"] is None and summary["config"]["views"] == 1 and summary["policy"]["views"] == 1
    assert (summary["runner"], summary["node"]) == ("local", socket.gethostname())  # the default runner
    assert "features efficientnet_lite0" in proc.stderr  # progress on stderr, not stdout


def test_train_lists_unreadable_files_as_file_and_reason(tiny_hymenoptera, tmp_path):
    data = tmp_path / "data"
    for label in ("ants", "bees"):
        (data / label).mkdir(parents=True)
        for photo in sorted((tiny_hymenoptera / "train" / label).iterdir())[:3]:
            (data / label / photo.name).write_bytes(photo.read_bytes())
    (data / "bees" / "page.jpg").write_text("<!DOCTYPE html><html>gone</html>")
    summary = last_json(run("train", data, "--backbone", "efficientnet_lite0", "--augment", "none", "--json"))
    assert summary["skipped"] == [{"file": str(data / "bees" / "page.jpg"), "reason": "not an image (HTML)"}]


def test_models_json_lists_how_each_model_was_asked_for(trained):
    listed = {m["model_id"]: m for m in last_json(run("models", "--json"))}
    config = listed[trained[0]["model_id"]]["config"]
    assert config == trained[0]["config"] and (config["backbone"], config["views"]) == ("efficientnet_lite0", 1)


def test_predict_json_by_model_id_and_path(trained, tiny_hymenoptera, tmp_path):
    summary, out, _ = trained
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    photo = sorted((tiny_hymenoptera / "val" / "bees").iterdir())[0]
    by_id = last_json(run("predict", summary["model_id"], photo, bad, "--json"))
    assert [set(p) >= {"file", "label", "confidence", "probs"} for p in by_id] == [True, True]
    assert by_id[0]["label"] in ("ants", "bees") and set(by_id[0]["probs"]) == {"ants", "bees"}
    assert by_id[1]["label"] is None and by_id[1]["error"]
    by_path = last_json(run("predict", out, photo, "--json"))
    assert by_path[0]["probs"] == by_id[0]["probs"]


def test_evaluate_json_contract(trained, tiny_hymenoptera):
    report = last_json(run("evaluate", trained[0]["model_id"], tiny_hymenoptera, "--json"))
    assert report["n"] == 8 and set(report) >= {"accuracy", "per_class", "confusion", "n"}
    assert report["accuracy"] == pytest.approx(trained[0]["accuracy"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["train", "/nonexistent/data"], "data folder not found: /nonexistent/data"),
    (["train", "{data}", "--backbone", "resnet9000"], "valid: efficientnet_lite0"),
    (["train", "{data}", "--augment", "sideways"], "valid"),
    (["train", "{data}", "--out", "/proc/nope/model.safetensors"], "cannot write output"),
    (["predict", "m-0000000000", "x.jpg"], "no model file or model id"),
])
def test_bad_input_is_one_clear_line(args, message, tiny_hymenoptera):
    proc = run(*[a.replace("{data}", str(tiny_hymenoptera)) for a in args], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_a_file_that_is_not_an_image_is_one_clear_line(trained, tiny_hymenoptera, tmp_path):
    model_id = trained[0]["model_id"]
    page = tmp_path / "page.jpg"  # what a search result often is: the web page around the photo
    page.write_text("<!DOCTYPE html>\n<html><body>This image is no longer available</body></html>")
    alone = run_process("predict", model_id, page, check=False)  # the real entry point, once
    assert (alone.returncode, alone.stdout, alone.stderr) == (2, "", f"error: {page}: not an image (HTML)\n")
    said_at_once = subprocess.run(  # no model loaded for it: the process never imports torch
        [sys.executable, "-c", "import sys\nfrom nanostream.cli.main import main\ntry: main(sys.argv[1:])\n"
         "except SystemExit: print(sorted({'torch', 'timm'} & set(sys.modules)))", "predict", model_id, page],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert said_at_once.stdout == "[]\n", said_at_once.stderr
    photo = sorted((tiny_hymenoptera / "val" / "ants").iterdir())[0]
    mixed = run("predict", model_id, photo, page, check=False)  # one good input: the others are reported, exit 0
    assert (mixed.returncode, mixed.stderr) == (0, f"error: {page}: not an image (HTML)\n")
    assert mixed.stdout.startswith(f"{photo}: ") and mixed.stdout.count("\n") == 1
