import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

from nanostream.engine import backbones, device, inference
from nanostream.engine.backbones import Backbone, get_spec, load_backbone, prepare_image, weights_fingerprint
from nanostream.engine.device import CpuInfo, cpu_info, precision
from nanostream.engine.images import load_image
from nanostream.engine.inference import (ConvClamp, describe, fold_batchnorm, for_inference, from_description, fuse_clamps,
                                         inference_backbone, prepared_path, same_padding_plan, unpad_same_convs)


CPU = torch.device("cpu")
# What the product runs on this machine: bf16 on AVX512-BF16/AMX, fp32 elsewhere (AVX2 laptops and
# VMs, where torch's bf16 convolution refuses to run). The tests below check whichever path it is.
CHOSEN = precision(CPU)
CHOSEN_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[CHOSEN]


def photos(datasets, spec, n=3):
    files = [p for folder in ("ants", "bees") for p in sorted((datasets / "hymenoptera/val" / folder).iterdir())[:n]]
    return torch.stack([prepare_image(load_image(p, draft_size=spec.resize_size), spec) for p in files])


def test_rewritten_backbone_gives_the_original_features_on_real_photos(datasets):
    original = load_backbone("efficientnet_lite0")
    x = photos(datasets, original.spec)
    fast = for_inference(original, "cpu", "fp32")
    modules = list(fast.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules), "every BatchNorm folded"
    assert sum(isinstance(m, ConvClamp) for m in modules) >= 20, "conv + ReLU6 pairs fused"
    assert not any(isinstance(m, Conv2dSame) for m in modules), "TF 'SAME' layers made plain"
    with torch.inference_mode():
        reference, features = original(x), fast(x)
    torch.testing.assert_close(features, reference, rtol=1e-3, atol=1e-3)
    chosen = for_inference(original, "cpu", CHOSEN)
    with torch.inference_mode():
        rounded = chosen(x).float()
    assert next(chosen.body.parameters()).dtype == CHOSEN_DTYPE
    if CHOSEN == "bf16":  # bf16 weights round the features, but not what they say
        assert nn.functional.cosine_similarity(rounded, reference).min() > 0.99
    else:
        torch.testing.assert_close(rounded, reference, rtol=1e-3, atol=1e-3)


def test_precision_is_bf16_exactly_where_the_cpu_runs_it_natively(monkeypatch):
    monkeypatch.delenv("NANOSTREAM_PRECISION", raising=False)
    here = cpu_info()
    assert precision(CPU) == ("bf16" if here.native_bf16 else "fp32")
    assert here.native_bf16 <= here.bf16_kernels  # never bf16 where torch cannot run it
    assert here.model in here.describe() and ("bf16 kernels yes" in here.describe()) == here.bf16_kernels


def test_a_cpu_without_bf16_kernels_gets_fp32_even_when_bf16_is_asked_for(monkeypatch, caplog):
    avx2 = CpuInfo("AMD EPYC 7B13", frozenset({"avx", "avx2", "fma"}), bf16_kernels=False)
    monkeypatch.setattr(device, "cpu_info", lambda: avx2)
    monkeypatch.delenv("NANOSTREAM_PRECISION", raising=False)
    assert precision(CPU) == "fp32"
    assert avx2.describe() == "AMD EPYC 7B13; AVX2; AVX512-BF16 no, AMX no; bf16 kernels no"
    monkeypatch.setenv("NANOSTREAM_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="nanostream.engine.device"):
        assert precision(CPU) == "fp32"
    assert "NANOSTREAM_PRECISION=bf16 ignored" in caplog.text and "AMD EPYC 7B13" in caplog.text
    # AVX-512 without BF16 (Skylake-X, Cascade Lake): bf16 runs there, emulated and slower, so fp32
    emulated = CpuInfo("Intel Xeon Gold 6148", frozenset({"avx2", "avx512f"}), bf16_kernels=True)
    monkeypatch.setattr(device, "cpu_info", lambda: emulated)
    monkeypatch.delenv("NANOSTREAM_PRECISION")
    assert precision(CPU) == "fp32"


def test_rewrites_leave_the_original_untouched():
    original = load_backbone("efficientnet_lite0")
    before = {k: v.clone() for k, v in original.state_dict().items()}
    for_inference(original, "cpu", CHOSEN)
    after = original.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class BatchNormFirst(nn.Module):
    """Registers conv before bn but runs bn first: folding by registration order would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU6()
        self.classifier = nn.Linear(3, 10)

    def forward(self, x):
        return self.act(self.conv(self.bn(x))).mean((2, 3))


def test_a_network_that_does_not_run_in_registration_order_is_served_unrewritten():
    network = BatchNormFirst().eval()
    with torch.no_grad():  # BatchNorm statistics far from identity, so a misfold shows
        network.bn.running_mean.uniform_(-1, 1)
        network.bn.running_var.uniform_(0.2, 3)
    spec = dataclasses.replace(get_spec("efficientnet_lite0"), head="classifier", feature_dim=3)
    original = Backbone(spec, network).eval()
    assert fold_batchnorm(BatchNormFirst()) == 1  # the rewrite itself does apply...
    fast = for_inference(original, "cpu", "fp32")
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # ...but was refused
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), original(x))


@pytest.mark.parametrize("kernel,size", [(3, 16), (3, 15), (5, 16), (5, 17)])
def test_same_padding_conv_made_plain_computes_the_same(kernel, size):
    """Stride 2: even sizes pad unevenly (one more after), odd ones evenly."""
    network = nn.Sequential(Conv2dSame(3, 6, kernel, stride=2, groups=3))  # depthwise, as in the Lite stages
    plan = same_padding_plan(network, size)
    assert unpad_same_convs(network, plan) == 1 and type(network[0]) is nn.Conv2d
    assert plan["0"][2:] == ((1, 1) if size % 2 == 0 else (0, 0))  # the extra zero taps
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        expected = Conv2dSame(3, 6, kernel, stride=2, groups=3)
        expected.load_state_dict({"weight": network[0].weight[..., -kernel:, -kernel:], "bias": network[0].bias})
        torch.testing.assert_close(network(x), expected(x), rtol=1e-5, atol=1e-5)


def test_a_rewritten_copy_refuses_other_input_sizes():
    fast = for_inference(load_backbone("efficientnet_lite0"), "cpu", "fp32")
    with pytest.raises(ValueError, match="takes 224x224 images"), torch.inference_mode():
        fast(torch.rand(1, 3, 256, 256))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_clamp_equals_the_convolution_then_relu6(dtype):
    holder = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU6())
    assert fuse_clamps(holder) == 1 and isinstance(holder[0], ConvClamp) and isinstance(holder[1], nn.Identity)
    conv = holder[0].conv
    x = (torch.randn(2, 8, 15, 15) * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    holder.to(dtype)
    if dtype == torch.bfloat16 and not cpu_info().bf16_kernels:
        # Why the product never runs bf16 here: torch refuses it on CPUs without AVX-512 (or AVX-NE-CONVERT)
        assert CHOSEN == "fp32"
        with pytest.raises(RuntimeError, match="bf16"), torch.inference_mode():
            holder(x)
        return
    with torch.inference_mode():
        expected = nn.functional.relu6(conv(x))
        torch.testing.assert_close(holder(x), expected)
    assert expected.max() == 6 and expected.min() == 0  # both ends of the clamp were exercised


@pytest.fixture()
def fresh_home(tmp_path, monkeypatch):
    """An empty NANOSTREAM_HOME and nothing loaded, as a new process on a new machine."""
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOSTREAM_BACKBONES")  # the default: NANOSTREAM_HOME/backbones
    for cached in (inference_backbone, weights_fingerprint):
        cached.cache_clear()
    yield tmp_path / "home"
    for cached in (inference_backbone, weights_fingerprint):
        cached.cache_clear()


def test_prepared_copy_is_kept_on_disk_and_read_back_without_the_original(fresh_home, monkeypatch):
    name = "efficientnet_lite0"
    first = inference_backbone(name, "cpu", CHOSEN)
    kept = prepared_path(name, CHOSEN)
    assert next(first.body.parameters()).dtype == CHOSEN_DTYPE and first.body_dtype == CHOSEN_DTYPE
    assert kept.is_file() and first.rewrites == ("fold_batchnorm", "unpad_same_convs", "fuse_clamps")
    assert len(first.same_padding) == 5  # the stem and four stride-2 depthwise layers
    inference_backbone.cache_clear()

    def no_original(*_):
        raise AssertionError("the original network was loaded again")
    monkeypatch.setattr(inference, "load_backbone", no_original)
    again = inference_backbone(name, "cpu", CHOSEN)
    assert next(again.body.parameters()).dtype == CHOSEN_DTYPE
    assert again is not first and again.rewrites == first.rewrites
    assert sum(isinstance(m, ConvClamp) for m in again.modules()) == sum(isinstance(m, ConvClamp) for m in first.modules())
    assert all(not p.requires_grad for p in again.parameters())
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(again(x), first(x))


def test_a_prepared_copy_is_read_in_a_new_process_without_timm(fresh_home, tmp_path):
    name = "efficientnet_lite1"
    x = torch.rand(2, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp_path / "x.pt")
    with torch.inference_mode():
        expected = inference_backbone(name, "cpu", CHOSEN)(x)  # prepared here, from timm's network
    code = ("import sys, torch; from nanostream.engine.inference import inference_backbone; "
            f"x = torch.load(sys.argv[1]); network = inference_backbone({name!r}, 'cpu', {CHOSEN!r}); "
            "torch.save(network(x).detach(), sys.argv[2]); "
            "print(sorted({'timm', 'torchvision', 'torch._dynamo'} & set(sys.modules)), type(network.body).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.split() == ["[]", "GraphModule"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_a_structure_is_described_only_when_every_step_can_be():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
    network = nn.Sequential(ConvClamp(conv, 0.0, 6.0), nn.Identity(), nn.Conv2d(4, 4, 1, bias=False),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    description = json.loads(json.dumps(describe(network)))  # plain data, as kept in the file
    assert [layer for _, layer, _ in description["steps"]] == ["0", "2", "3", "4"]  # the identity left out
    rebuilt = from_description(description)
    rebuilt.load_state_dict(network.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), network(x))
    assert describe(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2))) is None  # a kind it does not cover
    assert describe(nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"))) is None


def prepared_again_after(change) -> tuple[Backbone, Backbone, Path]:
    """Lite0's prepared copy, its file's metadata changed by change(metadata), and the copy read
    back from that file in a process with nothing loaded: (first, again, the file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = inference_backbone("efficientnet_lite0", "cpu", "fp32")
    kept = prepared_path("efficientnet_lite0", "fp32")
    with safe_open(kept, framework="pt") as f:
        metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, kept, metadata=change(metadata))
    inference_backbone.cache_clear()
    again = inference_backbone("efficientnet_lite0", "cpu", "fp32")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(again(x), first(x))
    return first, again, kept


def test_a_prepared_copy_without_a_structure_is_read_through_the_registry_network(fresh_home):
    """As a torchvision backbone's copy is: its structure is the registry's network, rewritten again."""
    def without_structure(metadata):
        assert "structure" in metadata
        return {key: value for key, value in metadata.items() if key != "structure"}

    first, again, _ = prepared_again_after(without_structure)
    assert type(again.body).__name__ == "EfficientNet" and again.rewrites == first.rewrites


def test_a_structure_naming_anything_but_layers_is_refused_and_prepared_afresh(fresh_home):
    """torch.fx writes layer names into the forward's source: a tampered file must not get there."""
    from safetensors import safe_open

    hostile = 'conv_stem"); __import__("os").system("touch owned'

    def tampered(metadata):
        structure = json.loads(metadata["structure"])
        structure["layers"][hostile] = structure["layers"].pop("conv_stem")
        structure["steps"][0][1] = hostile
        with pytest.raises(ValueError, match="not a module path"):
            from_description(structure)
        return {**metadata, "structure": json.dumps(structure)}

    _, _, kept = prepared_again_after(tampered)
    with safe_open(kept, framework="pt") as f:
        assert "conv_stem" in json.loads(f.metadata()["structure"])["layers"]  # prepared and written afresh


def test_a_damaged_prepared_copy_is_prepared_afresh(fresh_home):
    name = "efficientnet_lite0"
    first = inference_backbone(name, "cpu", "fp32")
    kept = prepared_path(name, "fp32")
    kept.write_bytes(kept.read_bytes()[:5000])  # truncated
    inference_backbone.cache_clear()
    again = inference_backbone(name, "cpu", "fp32")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(again(x), first(x))
    assert kept.stat().st_size > 1_000_000  # rewritten whole


def test_weights_fingerprint_is_kept_per_weights_file(fresh_home, monkeypatch):
    name = "efficientnet_lite0"
    digest = hashlib.sha256()
    for key, tensor in sorted(load_backbone(name).state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    assert weights_fingerprint(name) == digest.hexdigest()[:16]
    records = list((fresh_home / "backbones").glob(f"{name}-*.fingerprint"))
    assert [r.read_text() for r in records] == [digest.hexdigest()[:16]]
    weights_fingerprint.cache_clear()
    monkeypatch.setattr(backbones, "weights_key", lambda _: "another-install")  # e.g. a new package release
    assert weights_fingerprint(name) == digest.hexdigest()[:16]
    assert (fresh_home / "backbones" / f"{name}-another-install.fingerprint").is_file()
