"""The torch.compile path, its eager fallback, and bf16 autocast of the spiking towers."""
import logging

import pytest
import timm
import torch
from spikingjelly.activation_based import neuron

import open_clip
from open_clip_spiking import compiled
from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.data import decode_image, iter_shard


def _cifar_images(cifar_subset, count):
    """The first ``count`` real CIFAR-10 test images, preprocessed for ``spikeclip-vit-t``."""
    _, _, preprocess = open_clip.create_model_and_transforms("spikeclip-vit-t")
    images = []
    for sample in iter_shard(str(cifar_subset / "test" / "0.tar")):
        images.append(preprocess(decode_image(sample["jpg"])))
        if len(images) == count:
            break
    return torch.stack(images)


def _record_spikes(model):
    records = []
    for module in model.modules():
        if isinstance(module, neuron.LIFNode):
            module.register_forward_hook(lambda _module, _inputs, output: records.append(output.detach().clone()))
    return records


def _tower_with_statistics(images):
    """A spikeclip_vit_t tower in eval mode whose BatchNorm statistics are those of ``images``."""
    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # running statistics = the statistics of the one batch below
    with torch.no_grad():
        model.train()(images)
    return model.eval()


def test_compiled_tower_fires_the_same_spikes_as_eager(cifar_subset, single_thread):
    images = _cifar_images(cifar_subset, 16)
    model = _tower_with_statistics(images)
    records = _record_spikes(model)
    with torch.no_grad():
        expected = model(images)
    eager_spikes = list(records)
    records.clear()

    assert compiled.compile_model(model, torch.device("cpu"))
    assert compiled.is_compiled(model)
    with torch.no_grad():
        output = model(images)

    assert len(records) == len(eager_spikes) == 11
    for index, (eager, compiled_spikes) in enumerate(zip(eager_spikes, records)):
        assert torch.equal(eager, compiled_spikes), f"neuron layer {index}"
    # Every layer fires, so the comparison is not between silent layers.
    assert all(spikes.mean() > 0 for spikes in eager_spikes)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("code generation failed on purpose")


def test_compiler_failure_falls_back_to_eager(caplog):
    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert compiled.compile_model(model, torch.device("cpu"), backend=_failing_backend)
    retried = []
    with caplog.at_level(logging.WARNING, logger="open_clip_spiking.compiled"):
        output = compiled.run_with_fallback(model, lambda: model(x), before_retry=lambda: retried.append(True))
    assert not compiled.is_compiled(model)
    assert retried == [True]
    assert "torch.compile failed (RuntimeError: code generation failed on purpose)" in caplog.text
    assert torch.equal(output, expected)


def test_errors_outside_the_compiler_propagate():
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    assert compiled.compile_model(model, torch.device("cpu"), backend="eager")

    def call():
        raise ValueError("a bad batch")

    with pytest.raises(ValueError, match="a bad batch"):
        compiled.run_with_fallback(model, call)
    assert compiled.is_compiled(model)


def test_missing_cxx_compiler_keeps_the_model_eager(monkeypatch, caplog):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    with caplog.at_level(logging.WARNING, logger="open_clip_spiking.compiled"):
        assert not compiled.compile_model(model, torch.device("cpu"))
    assert not compiled.is_compiled(model)
    assert "needs a C++ compiler" in caplog.text


def test_trainer_falls_back_when_compilation_fails(tiny_teacher, cifar_subset, tmp_path, capfd):
    import torch._dynamo

    torch._dynamo.register_backend(name="failing_for_test")(_failing_backend)
    name, weights = tiny_teacher
    args = [
        "--stage", "align", "--model", "spikeclip-vit-t", "--teacher", name, "--teacher-pretrained", str(weights),
        "--train-data", str(cifar_subset / "test" / "0.tar"), "--classnames", str(cifar_subset),
        "--output-dir", str(tmp_path / "run"), "--batch-size", "16", "--workers", "0", "--max-steps", "2",
        "--compile", "on", "--compile-backend", "failing_for_test",
    ]
    assert main(args) == 0
    log = capfd.readouterr().err
    assert "compiled TimmModel and SpikingTextMlp with torch.compile" in log
    assert "torch.compile failed (RuntimeError: code generation failed on purpose); continuing with eager" in log
    assert (tmp_path / "run" / "latest.safetensors").is_file()


def test_bf16_autocast_keeps_spikes_binary(cifar_subset):
    images = _cifar_images(cifar_subset, 8)
    model = _tower_with_statistics(images)
    records = _record_spikes(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(images)
    assert torch.isfinite(output).all()
    assert len(records) == 11
    # Neurons fed by a convolution or linear layer receive bf16 and emit bf16 spikes.
    assert sum(spikes.dtype == torch.bfloat16 for spikes in records) >= 6
    for index, spikes in enumerate(records):
        assert torch.isin(spikes.float().unique(), torch.tensor([0.0, 1.0])).all(), f"neuron layer {index}"
    assert all(spikes.float().mean() > 0 for spikes in records)
