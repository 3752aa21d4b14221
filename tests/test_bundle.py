"""Model files are checked before anything is built from them: crafted ones cost a few MB and one line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanostream.engine.bundle import MAX_HEADER_BYTES, BundleError, read_bundle, read_header, save_bundle

REPO = Path(__file__).resolve().parent.parent
WIDTH = 1280  # efficientnet_lite0's features
# A bad file must be refused long before any network is built: the CLI's Python alone is ~30 MB,
# importing torch ~650 MB, so staying under this proves the refusal comes first.
MAX_RSS_BYTES = 500 * 2**20
SOUND = {"format": "nanostream-model/1", "model_id": "m-0123456789", "labels": ["ants", "bees"],
         "backbone": "efficientnet_lite0", "created_at": "2025-01-01T00:00:00+00:00", "metrics": {"accuracy": 0.9}}


def head(classes: int = 2, width: int = WIDTH) -> dict[str, tuple[str, list[int]]]:
    return {"head.mean": ("F32", [width]), "head.scale": ("F32", [width]),
            "head.linear.weight": ("F32", [classes, width]), "head.linear.bias": ("F32", [classes])}


def craft(path: Path, meta, tensors: dict[str, tuple[str, list[int]]] | None = None,
          metadata_text: str | None = None) -> Path:
    """A safetensors file written byte by byte, as an attacker would: any header, zeros for the data."""
    table, offset = {}, 0
    for name, (dtype, shape) in (head() if tensors is None else tensors).items():
        size = 4 * torch.Size(shape).numel()
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    table["__metadata__"] = {"nanostream": json.dumps(meta) if metadata_text is None else metadata_text}
    header = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(offset))
    return path


# A launcher of its own: a child's peak RSS counts the memory it was forked from, and this
# test process holds torch. The launcher is a few MB, so what it reports is the child's.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def run_measured(*args, cwd: Path) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of `python -m nanostream ARGS` in a fresh process."""
    peak = cwd / "peak-rss-kb"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, peak, sys.executable, "-m", "nanostream", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    return proc.returncode, proc.stderr, int(peak.read_text()) * 1024  # ru_maxrss is in KB on Linux


# ---------------------------------------------------------------- crafted files through the CLI

DAMAGED = "damaged model file: "
CRAFTED = {
    # name: (meta, or the header's raw text; tensors; the one line after "error: FILE: ")
    "three million labels": ({**SOUND, "labels": [f"l{i}" for i in range(3_000_000)]}, None,
                             "model header is 40.9 MB, more than any NanoStream model has (at most 8 MB)"),
    "100,000 labels": ({**SOUND, "labels": [f"l{i}" for i in range(100_000)]}, head(100_000, 1),
                       DAMAGED + "its header lists 100,000 labels (a model has 1 to 1,000)"),
    "no labels": ({k: v for k, v in SOUND.items() if k != "labels"}, None, DAMAGED + "its header has no 'labels'"),
    "a list where a dict belongs": ({**SOUND, "metrics": [0.9]}, None,
                                    DAMAGED + "'metrics' in its header is a list, not an object"),
    "a dict where a list belongs": ({**SOUND, "labels": {"ants": 0}}, None,
                                    DAMAGED + "'labels' in its header is an object, not a list of labels"),
    "deep nesting": ('{"format": "nanostream-model/1", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", None,
                     DAMAGED + "its NanoStream header is nested too deeply"),
    "more labels than the head has": ({**SOUND, "labels": ["a", "b", "c"]}, None,
                                      DAMAGED + "'head.linear.weight' is 2 x 1280 F32, but 3 labels on "
                                      "efficientnet_lite0's 1280 features need 3 x 1280 floats"),
    "a head for other features": (SOUND, head(2, 512),
                                  DAMAGED + "'head.mean' is 512 F32, but 2 labels on efficientnet_lite0's 1280 "
                                  "features need 1280 floats"),
    "a zero scale in the unknown check": ({**SOUND, "unknown": {"threshold": 1.0, "scales": [0.2, 0]}}, None,
                                          DAMAGED + "its unknown check's scales are not 2 positive numbers"),
    "a path for a model id": ({**SOUND, "model_id": "../../evil"}, None,
                              DAMAGED + "its model id '../../evil' is not one NanoStream makes "
                              "('m-' and 10 hex digits)"),
}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "img.jpg"
    Image.new("RGB", (64, 48), "orange").save(path)
    return path


@pytest.mark.parametrize("kind", CRAFTED)
def test_a_crafted_bundle_is_one_line_in_a_few_mb(kind, photo, tmp_path):
    meta, tensors, message = CRAFTED[kind]
    crafted = craft(tmp_path / "crafted.safetensors", meta, tensors, meta if isinstance(meta, str) else None)
    status, stderr, peak = run_measured("predict", crafted, photo, cwd=tmp_path)
    assert (status, stderr) == (2, f"error: {crafted}: {message}\n")  # one line, no traceback
    assert peak < MAX_RSS_BYTES, f"peak RSS {peak / 2**20:.0f} MB"


@pytest.mark.parametrize("command", [["predict", "{model}", "{photo}"], ["evaluate", "{model}", "{data}"],
                                     ["export", "{model}", "--out", "{out}"], ["publish", "{model}"]])
def test_every_command_that_loads_a_model_refuses_the_16_gb_one(command, photo, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    crafted = craft(tmp_path / "crafted.safetensors", {**SOUND, "labels": [f"l{i}" for i in range(3_000_000)]})
    (tmp_path / "data" / "ants").mkdir(parents=True)
    args = [a.format(model=crafted, photo=photo, data=tmp_path / "data", out=tmp_path / "m.onnx") for a in command]
    status, stderr, peak = run_measured(*args, cwd=tmp_path)
    assert (status, stderr) == (2, f"error: {crafted}: model header is 40.9 MB, more than any NanoStream model "
                                   f"has (at most 8 MB)\n")
    assert peak < MAX_RSS_BYTES, f"peak RSS {peak / 2**20:.0f} MB"
    assert not (tmp_path / "m.onnx").exists() and not list((tmp_path / "home").glob("models/*"))


# ---------------------------------------------------------------- the checks, in process

def sound_tensors(classes: int = 2) -> dict[str, torch.Tensor]:
    return {"head.mean": torch.zeros(WIDTH), "head.scale": torch.ones(WIDTH),
            "head.linear.weight": torch.zeros(classes, WIDTH), "head.linear.bias": torch.zeros(classes)}


def test_a_sound_bundle_reads_back_whole(tmp_path):
    path = save_bundle(tmp_path / "m.safetensors", SOUND, sound_tensors())
    header = read_header(path)
    assert header.model_id == "m-0123456789" and header.meta["labels"] == ["ants", "bees"]
    assert header.tensors["head.linear.weight"].shape == (2, WIDTH)
    assert header.tensors["head.linear.weight"].dtype == "F32"
    meta, tensors = read_bundle(path)
    assert meta == {**SOUND} and set(tensors) == set(sound_tensors())
    assert torch.equal(tensors["head.scale"], torch.ones(WIDTH))
    assert read_bundle(path, with_tensors=False) == (meta, {})


@pytest.mark.parametrize("change, message", [
    ({"format": "nanostream-model/9"}, "unsupported model format 'nanostream-model/9'"),
    ({"model_id": 7}, "'model_id' in its header is a number, not a model id"),
    ({"model_id": "m-0123456789/../x"}, "is not one NanoStream makes"),
    ({"labels": []}, "its header lists 0 labels"),
    ({"labels": ["ants", "ants"]}, "its header lists a label twice"),
    ({"labels": ["ants", 3]}, "a label in its header is a number"),
    ({"labels": ["ants", "b" * 300]}, "a label in its header is 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb…'"),
    ({"backbone": "resnet9000"}, "model needs backbone 'resnet9000', which this NanoStream does not have"),
    ({"backbone": ["efficientnet_lite0"]}, "'backbone' in its header is a list, not a backbone name"),
    ({"created_at": "yesterday"}, "its date 'yesterday' is not an ISO date"),
    ({"metrics": {"accuracy": True}}, "'accuracy' in its header is true or false, not a number"),
    ({"metrics": {}}, "its header has no 'accuracy'"),
    ({"project": {"name": "x"}}, "'project' in its header is an object, not a string"),
    ({"preprocessing": [224]}, "'preprocessing' in its header is a list, not an object"),
])
def test_each_key_a_reader_relies_on_is_checked(change, message, tmp_path):
    path = save_bundle(tmp_path / "m.safetensors", {**SOUND, **change}, sound_tensors())
    with pytest.raises(BundleError) as caught:
        read_header(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("tensors, message", [
    ({k: v for k, v in head().items() if k != "head.linear.bias"}, "it has no tensor 'head.linear.bias'"),
    ({**head(), "head.linear.bias": ("I32", [2])}, "'head.linear.bias' is 2 I32"),
    ({**head(), "optimizer.state": ("F32", [1])}, "tensor 'optimizer.state' is neither the head's nor one of"),
    ({**head(), "backbone.body.blocks.0.conv.weight": ("F32", [1])}, "neither the head's nor one of "
                                                                      "efficientnet_lite0's fine-tuned stages"),
    ({**head(), "x": ("C64", [1])}, "tensor 'x' has an unsupported type 'C64'"),
])
def test_the_tensors_must_be_the_head_and_fine_tuned_stages(tensors, message, tmp_path):
    with pytest.raises(BundleError) as caught:
        read_header(craft(tmp_path / "m.safetensors", SOUND, tensors))
    assert message in str(caught.value)


def test_a_fine_tuned_stage_is_accepted(tmp_path):
    tensors = {**head(), "backbone.body.blocks.6.0.conv_pw.weight": ("F32", [1152, 192, 1, 1])}
    header = read_header(craft(tmp_path / "m.safetensors", SOUND, tensors))
    assert header.tensors["backbone.body.blocks.6.0.conv_pw.weight"].shape == (1152, 192, 1, 1)


def test_structural_damage_is_one_sentence(tmp_path):
    cases = {
        "short": b"\x01\x02",
        "not safetensors": b"\xff" * 64,
        "truncated header": struct.pack("<Q", 1000) + b"{}",
        "not json": struct.pack("<Q", 4) + b"{{{{",
        "a list": struct.pack("<Q", 2) + b"[]",
        "no metadata": struct.pack("<Q", 2) + b"{}",
    }
    messages = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BundleError) as caught:
            read_header(tmp_path / name)
        messages[name] = str(caught.value)
    assert messages == {
        "short": "not a NanoStream model file (too short to be a safetensors file)",
        "not safetensors": "not a NanoStream model file (not a safetensors file)",
        "truncated header": "not a NanoStream model file (not a safetensors file, or a truncated one)",
        "not json": "not a NanoStream model file (its safetensors header is not JSON)",
        "a list": "not a NanoStream model file (its safetensors header is not a JSON object)",
        "no metadata": "not a NanoStream model file (no header)",
    }
    with pytest.raises(BundleError, match="^model file not found$"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(BundleError, match="^not a model file but a folder$"):
        read_header(tmp_path)


def test_tensor_bytes_must_lie_inside_the_file(tmp_path):
    path = craft(tmp_path / "m.safetensors", SOUND)
    path.write_bytes(path.read_bytes()[:-4])  # the last float of head.linear.bias cut off
    with pytest.raises(BundleError, match="tensor 'head.linear.bias' does not match the bytes in the file"):
        read_header(path)


def test_the_header_limit_leaves_room_for_a_1000_class_model():
    """Two 1000 x 1000 confusion matrices (metrics and finetune_metrics) are the bulk of such a header."""
    labels = [f"class-{i:04d}" for i in range(1000)]
    confusion = [[0] * 1000 for _ in range(1000)]
    per_class = {label: {"precision": 0.123456789, "recall": 0.123456789, "n": 10} for label in labels}
    metrics = {"accuracy": 0.5, "n": 10_000, "per_class": per_class, "confusion": confusion}
    text = json.dumps({**SOUND, "labels": labels, "metrics": metrics, "finetune_metrics": metrics}, sort_keys=True)
    assert len(json.dumps({"__metadata__": {"nanostream": text}})) < MAX_HEADER_BYTES


ENSEMBLE = {**SOUND, "backbone": "efficientnet_lite0+efficientnet_lite2"}


def test_an_ensemble_bundle_has_a_head_layer_per_member_on_their_features_side_by_side(tmp_path):
    header = read_header(craft(tmp_path / "m.safetensors", ENSEMBLE, head(classes=4, width=2 * WIDTH)))
    assert header.tensors["head.linear.weight"].shape == (4, 2 * WIDTH)  # 2 labels x 2 members


@pytest.mark.parametrize("backbone", ["efficientnet_lite2+efficientnet_lite0", "efficientnet_lite0+efficientnet_lite0",
                                      "efficientnet_lite0+resnet9000", "efficientnet_lite0+",
                                      "+".join(["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                                "resnet50"])])
def test_an_ensemble_of_other_members_or_order_is_refused(backbone, tmp_path):
    with pytest.raises(BundleError) as caught:
        read_header(craft(tmp_path / "m.safetensors", {**ENSEMBLE, "backbone": backbone}, head(4, 2 * WIDTH)))
    assert "which this NanoStream does not have" in str(caught.value) and "\n" not in str(caught.value)


def test_an_ensemble_with_one_head_layer_is_refused(tmp_path):
    with pytest.raises(BundleError) as caught:
        read_header(craft(tmp_path / "m.safetensors", ENSEMBLE, head(classes=2, width=2 * WIDTH)))
    assert "'head.linear.weight' is 2 x 2560 F32" in str(caught.value) and "need 4 x 2560 floats" in str(caught.value)
