"""Energy profiler and firing statistics: hand-computed counts on known spike patterns, a cross-check
against torch.utils.flop_counter, and the command line on real CIFAR-10 images."""
import json
import logging

import open_clip
import pytest
import timm
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from open_clip_spiking.energy import FiringRateMonitor, OperationCounter
from open_clip_spiking.energy.__main__ import main
from open_clip_spiking.neurons import NeuronCfg
from open_clip_spiking.train.checkpoint import save_weights
from open_clip_spiking.vision import SpikingSelfAttention


def _passthrough_neuron(threshold: float = 1.0) -> neuron.IFNode:
    """IF neuron with hard reset to 0: a 0/1 input (or one just under 1, above ``threshold``) fires exactly
    where the input is non-zero, so the spike pattern equals the input pattern."""
    return neuron.IFNode(v_threshold=threshold, v_reset=0.0, step_mode="m")


class SpikeFed(nn.Module):
    """A layer fed by spikes: ``[T, B, ...]`` 0/1 input -> neuron -> layer on ``[T * B, ...]``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.neuron = _passthrough_neuron()
        self.layer = layer

    def forward(self, x_seq):
        functional.reset_net(self)
        return self.layer(self.neuron(x_seq).flatten(0, 1))


def _pattern(shape, density=0.4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) < density).float()


def _count(model, *inputs):
    counter = OperationCounter(model)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter


def _only(counter, name):
    entries = [layer for layer in counter.layers() if layer.name == name]
    assert len(entries) == 1, [layer.name for layer in counter.layers()]
    return entries[0]


# --- linear and convolution ------------------------------------------------------------------------

def test_linear_acs_are_nonzero_times_fan_out():
    T, B, in_features, out_features = 3, 2, 5, 4
    spikes = _pattern((T, B, in_features))
    entry = _only(_count(SpikeFed(nn.Linear(in_features, out_features)), spikes), "layer")

    nonzero = int(spikes.sum())
    assert 0 < nonzero < spikes.numel()
    assert entry.kind == "AC"
    assert entry.ops == nonzero * out_features
    assert entry.dense_macs == T * B * in_features * out_features
    assert entry.input_rates == [nonzero / spikes.numel()]
    # Per image: T x rate x MACs of one step.
    macs_per_step = in_features * out_features
    assert entry.ops / B == pytest.approx(T * entry.input_rates[0] * macs_per_step)


def test_conv_acs_count_border_fan_out():
    T, B, channels, out_channels, size = 2, 1, 2, 3, 4
    spikes = _pattern((T, B, channels, size, size), seed=1)
    conv = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
    entry = _only(_count(SpikeFed(conv), spikes), "layer")

    # Hand count: an input at row i meets the 3x3 windows of the output rows i-1, i, i+1 that exist.
    def fan_out(index):
        return len([out for out in (index - 1, index, index + 1) if 0 <= out < size])

    expected = sum(
        fan_out(i) * fan_out(j) * out_channels
        for t in range(T) for c in range(channels) for i in range(size) for j in range(size)
        if spikes[t, 0, c, i, j]
    )
    assert entry.kind == "AC"
    assert entry.ops == expected
    assert entry.dense_macs == T * B * out_channels * size * size * channels * 9
    # Border inputs have a smaller fan-out, so the exact count is below T x rate x MACs here.
    assert entry.ops < entry.input_rates[0] * entry.dense_macs


def test_grouped_strided_conv_acs():
    T, B, channels = 2, 2, 4
    spikes = _pattern((T, B, channels, 4, 4), seed=2)
    conv = nn.Conv2d(channels, channels, 2, stride=2, groups=2, bias=False)
    entry = _only(_count(SpikeFed(conv), spikes), "layer")

    # Non-overlapping 2x2 windows: every input meets one window in each of the 2 output channels of its group.
    assert entry.ops == int(spikes.sum()) * 2
    # Output [T*B, 4, 2, 2], each element 2 input channels x 2 x 2 kernel products.
    assert entry.dense_macs == T * B * channels * 2 * 2 * (2 * 2 * 2)
    assert entry.ops == pytest.approx(entry.input_rates[0] * entry.dense_macs)


def test_all_zero_spikes_give_zero_acs():
    model = SpikeFed(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 5)))
    counter = _count(model, torch.zeros(2, 3, 2, 4, 4))
    conv = _only(counter, "layer.0")
    assert conv.kind == "AC"
    assert conv.ops == 0
    assert conv.input_rates == [0.0]
    assert conv.dense_macs > 0
    # The convolution's output is real-valued (its bias), so the linear layer after it counts MACs.
    assert _only(counter, "layer.2").kind == "MAC"
    assert counter.total("AC") == 0


def test_real_valued_binary_input_counts_macs():
    # Spikes are recognised by their source, so 0/1 values that no neuron produced are real inputs.
    linear = nn.Linear(4, 3)
    entry = _only(_count(linear, torch.ones(2, 4)), "Linear")
    assert entry.kind == "MAC"
    assert entry.ops == 2 * 4 * 3


# --- the student's image tower -----------------------------------------------------------------------

def test_first_conv_counts_macs_once_per_image():
    model = timm.create_model("spikeclip_vit_t", num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    counter = _count(model, images)
    first = _only(counter, "patch_embed.convs.0")

    # 3 -> 8 channels (embed_dim 64 / 8), 3x3 kernel, 32x32 output, run once per image, not T times.
    assert first.kind == "MAC"
    assert first.ops == 2 * 8 * 32 * 32 * 3 * 9
    assert first.calls == 1
    spike_fed = [layer for layer in counter.layers() if layer.name != "patch_embed.convs.0"]
    assert spike_fed
    assert all(layer.kind == "AC" for layer in spike_fed)


def _attention_with_known_spikes(dim, num_heads, perm_k, perm_v):
    """A SpikingSelfAttention whose Q, K and V are the input spikes with channels permuted."""
    attn = SpikingSelfAttention(dim, num_heads, NeuronCfg()).eval()
    # BatchNorm in eval mode scales by 1 / sqrt(1 + eps), so the neurons fire at threshold 0.5.
    for name in ("in_lif", "q_lif", "k_lif", "v_lif", "attn_lif"):
        setattr(attn, name, _passthrough_neuron(threshold=0.5))
    identity = torch.eye(dim)
    with torch.no_grad():
        attn.q_proj.weight.copy_(identity)
        attn.k_proj.weight.copy_(identity[perm_k])
        attn.v_proj.weight.copy_(identity[perm_v])
    return attn


def _heads(x, num_heads):
    T, B, N, C = x.shape
    return x.reshape(T * B, N, num_heads, C // num_heads).transpose(1, 2)  # [T*B, H, N, d]


def test_attention_counts_for_q_times_kv():
    T, B, N, dim, num_heads = 2, 1, 3, 4, 2  # head_dim 2 < 3 tokens: Q (K^T V)
    perm_k, perm_v = [1, 2, 3, 0], [3, 0, 1, 2]
    spikes = _pattern((T, B, N, dim), density=0.5, seed=3)
    attn = _attention_with_known_spikes(dim, num_heads, perm_k, perm_v)
    counter = _count(attn, spikes)
    q, k, v = (_heads(spikes[..., perm], num_heads) for perm in (list(range(dim)), perm_k, perm_v))

    d = dim // num_heads
    kv_products = sum(
        int(k[g, h, n, i] * v[g, h, n, j])
        for g in range(T * B) for h in range(num_heads) for i in range(d) for j in range(d) for n in range(N)
    )
    assert kv_products > 0
    kv = _only(counter, "SpikingSelfAttention:matmul0")
    assert kv.kind == "AC"
    assert kv.ops == kv_products
    assert kv.dense_macs == T * B * num_heads * d * N * d
    assert kv.input_rates == pytest.approx([k.mean().item(), v.mean().item()])

    q_m = _only(counter, "SpikingSelfAttention:matmul1")
    assert q_m.kind == "AC"
    assert q_m.ops == int(q.sum()) * d
    assert q_m.dense_macs == T * B * num_heads * N * d * d
    assert q_m.input_rates == pytest.approx([q.mean().item()])


def test_attention_counts_for_qk_times_v():
    T, B, N, dim, num_heads = 2, 2, 3, 4, 1  # head_dim 4 >= 3 tokens: (Q K^T) V
    perm_k, perm_v = [2, 3, 0, 1], [1, 0, 3, 2]
    spikes = _pattern((T, B, N, dim), density=0.5, seed=4)
    counter = _count(_attention_with_known_spikes(dim, num_heads, perm_k, perm_v), spikes)
    q, k, v = (_heads(spikes[..., perm], num_heads) for perm in (list(range(dim)), perm_k, perm_v))

    d = dim // num_heads
    qk_products = sum(
        int(q[g, 0, n, i] * k[g, 0, m, i])
        for g in range(T * B) for n in range(N) for m in range(N) for i in range(d)
    )
    assert qk_products > 0
    qk = _only(counter, "SpikingSelfAttention:matmul0")
    assert qk.ops == qk_products
    assert qk.dense_macs == T * B * N * N * d
    # (Q K^T) is real-valued; V is the spike operand, and each V spike meets N rows.
    qk_v = _only(counter, "SpikingSelfAttention:matmul1")
    assert qk_v.ops == int(v.sum()) * N
    assert qk_v.input_rates == pytest.approx([v.mean().item()])


# --- ANN teachers against torch.utils.flop_counter ---------------------------------------------------

def _flop_counter_macs(model, images):
    # Neither the fused multi-head-attention fast path nor the fused CPU attention kernel is counted by
    # FlopCounterMode in torch 2.14, so the reference runs the math attention as matrix products.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops:
            model(images)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return flops.get_total_flops() / 2


def test_tiny_teacher_macs_match_flop_counter(tiny_teacher):
    name, weights = tiny_teacher
    model = open_clip.create_model(name, pretrained=str(weights)).eval()
    images = torch.randn(2, 3, 32, 32)
    counter = OperationCounter(model)
    with torch.no_grad(), counter:
        model.encode_image(images)

    reference = _flop_counter_macs(model.encode_image, images)
    assert counter.total("AC") == 0
    assert counter.total("MAC") == pytest.approx(reference, rel=0.01)
    assert any(layer.op == "attention_qk" for layer in counter.layers())
    assert counter.uncounted_ops == {}


def test_grouped_cnn_macs_match_flop_counter():
    # Depthwise (grouped) convolutions, stride 2 and TF "same" padding.
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    images = torch.randn(1, 3, 64, 64)
    counter = _count(model, images)
    assert counter.total("MAC") == pytest.approx(_flop_counter_macs(model, images), rel=0.01)


# --- firing statistics -------------------------------------------------------------------------------

def test_monitor_rates_of_known_pattern():
    T, B = 4, 3
    spikes = _pattern((T, B, 10), density=0.3, seed=5)
    model = SpikeFed(nn.Linear(10, 2))
    with FiringRateMonitor(model) as monitor:
        model(spikes)
        model(spikes)
    stats = monitor.stats()["neuron"]
    assert stats.calls == 2
    assert stats.rate == pytest.approx(spikes.mean().item())
    assert stats.step_rates == pytest.approx([spikes[t].mean().item() for t in range(T)])

    # Leaving the block removes the hooks and keeps the counts.
    model(torch.ones(T, B, 10))
    assert monitor.stats()["neuron"].calls == 2


def test_monitor_covers_image_and_text_towers():
    model = open_clip.create_model("spikeclip-vit-t").eval()
    tokens = open_clip.get_tokenizer("spikeclip-vit-t")(["a photo of a cat", "a dog"])
    with torch.no_grad(), FiringRateMonitor(model) as monitor:
        model.encode_image(torch.randn(2, 3, 32, 32))
        model.encode_text(tokens)
    rates = monitor.rates()
    assert "visual.trunk.blocks.0.attn.q_lif" in rates
    assert "text.in_lif" in rates
    assert "text.hidden_lif" in rates
    assert all(0.0 <= rate <= 1.0 for rate in rates.values())
    assert set(monitor.rates(prefix="text.")) == {"text.in_lif", "text.hidden_lif"}


def test_monitor_rejects_model_without_neurons():
    with pytest.raises(ValueError, match="no modules of type"):
        FiringRateMonitor(nn.Linear(2, 2))


# --- command line --------------------------------------------------------------------------------

@pytest.fixture
def tiny_student(tmp_path):
    model = open_clip.create_model("spikeclip-vit-t")
    path = tmp_path / "spikeclip-vit-t.safetensors"
    save_weights(path, model.state_dict(), "spikeclip-vit-t", open_clip.get_model_config("spikeclip-vit-t"))
    return path


def test_cli_writes_reports(tmp_path, wds_root, tiny_student, tiny_teacher):
    teacher_name, teacher_weights = tiny_teacher
    cifar = wds_root / "cifar10_jpeg"
    output = tmp_path / "energy"
    rc = main([
        "--model", "spikeclip-vit-t", "--pretrained", str(tiny_student),
        "--teacher", teacher_name, "--teacher-pretrained", str(teacher_weights),
        "--data", str(cifar / "test" / "0.tar"), "--output", str(output),
        "--num-images", "6", "--batch-size", "4",
        "--text-source", "prompts", "--classnames", str(cifar / "classnames.txt"),
        "--templates", str(cifar / "zeroshot_classification_templates.txt"), "--num-texts", "5",
    ])
    assert rc == 0
    report = json.loads((output / "energy.json").read_text())
    for key in ("student", "teacher", "ratio", "num_images", "settings", "command", "conventions", "text"):
        assert key in report
    assert report["num_images"] == 6
    student, teacher = report["student"], report["teacher"]
    assert student["time_steps"] == 2
    assert student["energy_mj"] == pytest.approx(sum(layer["energy_mj"] for layer in student["layers"]))
    assert report["ratio"] == pytest.approx(student["energy_mj"] / teacher["energy_mj"])
    assert student["layers"][0]["name"] == "visual.trunk.patch_embed.convs.0"
    assert student["layers"][0]["kind"] == "MAC"
    assert teacher["acs"] == 0
    assert teacher["macs"] > 0
    assert {entry["name"] for entry in student["neurons"]} >= {"visual.trunk.blocks.0.attn.q_lif"}
    assert report["text"]["num_texts"] == 5
    assert report["text"]["student"]["layers"][0]["name"] == "text.fc1"
    assert "--num-images 6" in report["command"]

    markdown = (output / "energy.md").read_text()
    assert "| student image |" in markdown
    assert "| teacher image |" in markdown
    assert (output / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_missing_data(tmp_path, caplog):
    missing = tmp_path / "no-such-folder" / "0.tar"
    with caplog.at_level(logging.ERROR):
        rc = main(["--model", "spikeclip-vit-t", "--data", str(missing), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert str(missing) in caplog.text
    assert "--data" in caplog.text
    assert "brace pattern" in caplog.text
