import copy

import pytest
import timm
import torch

import open_clip
from open_clip_spiking.vision import SpikingVisionTransformer

# Parameter counts of the SpikeCLIP image encoder (authors' code) at 32x32, 4 blocks of 384, T=4.
REFERENCE_PARAMS_NO_PROJ = 9_316_276
REFERENCE_PARAMS_WITH_PROJ = 9_513_396


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def _lif_outputs(model, x):
    from spikingjelly.activation_based import neuron

    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
             for m in model.modules() if isinstance(m, neuron.LIFNode)]
    model(x)
    for hook in hooks:
        hook.remove()
    return outputs


def test_reference_param_count_without_projection():
    model = timm.create_model("spikeclip_vit_s", num_classes=0)
    assert abs(_num_params(model) - REFERENCE_PARAMS_NO_PROJ) / REFERENCE_PARAMS_NO_PROJ < 0.02


def test_reference_param_count_with_projection():
    model = open_clip.create_model("spikeclip-vit-s")
    assert abs(_num_params(model.visual) - REFERENCE_PARAMS_WITH_PROJ) / REFERENCE_PARAMS_WITH_PROJ < 0.02


@pytest.mark.parametrize("time_steps", [1, 3, 5])
def test_any_time_steps(time_steps):
    model = timm.create_model("spikeclip_vit_t", num_classes=0, time_steps=time_steps)
    assert model.time_weight.weight.shape == (time_steps,)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 64)
    assert torch.isfinite(out).all()


def test_output_independent_of_previous_batch():
    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0).eval()
    batch = torch.randn(4, 3, 32, 32) * 3
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 3)
        first = model(batch)
        second = model(batch)
    assert torch.equal(first, second)


def test_short_batch_after_full_batch():
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    with torch.no_grad():
        assert model(torch.randn(8, 3, 32, 32)).shape == (8, 64)
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 64)


def test_neurons_emit_binary_spikes():
    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    outputs = _lif_outputs(model, torch.randn(2, 3, 32, 32) * 3)
    assert len(outputs) == 4 + 7  # tokenizer neurons + (attention 5, MLP 2) per block
    for spikes in outputs:
        assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    assert any(spikes.sum() > 0 for spikes in outputs)


def test_first_layer_sees_analog_image_every_step():
    model = timm.create_model("spikeclip_vit_t", num_classes=0, time_steps=3)
    captured = {}
    model.patch_embed.lifs[0].register_forward_hook(lambda _m, inputs, _o: captured.update(x=inputs[0]))
    model(torch.randn(2, 3, 32, 32))
    x_seq = captured["x"]
    assert x_seq.shape[0] == 3
    assert torch.equal(x_seq[0], x_seq[2])


def test_timm_classifier_interface():
    model = timm.create_model("spikeclip_vit_t", num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model.reset_classifier(0, global_pool="")
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 64)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64, 64)
    assert model.num_features == 64


def test_pretrained_without_weights_names_fix():
    with pytest.raises(ValueError, match="no pretrained weights are published for 'spikeclip_vit_t'"):
        timm.create_model("spikeclip_vit_t", pretrained=True)


def test_pretrained_overlay_file_loads(tmp_path):
    source = timm.create_model("spikeclip_vit_t", num_classes=0)
    path = tmp_path / "tower.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model("spikeclip_vit_t", num_classes=0, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_grad_checkpointing_same_gradients_and_statistics():
    torch.manual_seed(0)
    eager = timm.create_model("spikeclip_vit_t", num_classes=8)
    checkpointed = copy.deepcopy(eager)
    # open_clip's switch reaches the timm tower's tokenizer and blocks.
    clip = open_clip.create_model("spikeclip-vit-t")
    clip.set_grad_checkpointing(True)
    assert clip.visual.trunk.grad_checkpointing and clip.visual.trunk.patch_embed.grad_checkpointing
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32) * 3
    for model in (eager, checkpointed):
        model(x).square().sum().backward()
    for (name, param), other in zip(eager.named_parameters(), checkpointed.parameters()):
        assert param.grad is not None, name
        assert torch.equal(param.grad, other.grad), name
    # The recomputation in the backward pass leaves the BatchNorm running statistics alone.
    for (name, value), other in zip(eager.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(value, other), name


def _saved_activation_bytes(model, x):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    out.square().sum().backward()
    return total


def test_grad_checkpointing_stores_fewer_activations():
    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0, depth=2)
    x = torch.randn(4, 3, 32, 32)
    stored = _saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    checkpointed = _saved_activation_bytes(model, x)
    # Only the segment inputs stay stored; everything inside a segment is recomputed.
    assert checkpointed < stored / 4, (checkpointed, stored)


def test_grad_checkpointing_frees_recomputed_segments():
    from spikingjelly.activation_based import neuron

    torch.manual_seed(0)
    model = timm.create_model("spikeclip_vit_t", num_classes=0)
    model.set_grad_checkpointing(True)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    # A membrane state left over from a recomputation would keep that segment's activations alive.
    states = [module.v for module in model.modules() if isinstance(module, neuron.BaseNode)]
    assert states
    assert not any(isinstance(v, torch.Tensor) for v in states)


def test_open_clip_config_passes_timm_kwargs(tmp_path):
    import json

    cfg = open_clip.get_model_config("spikeclip-vit-t")
    cfg["vision_cfg"]["timm_model_kwargs"] = {"time_steps": 3}
    (tmp_path / "spikeclip-vit-t-t3.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    model = open_clip.create_model("spikeclip-vit-t-t3")
    assert model.visual.trunk.time_steps == 3
    assert open_clip.create_model("spikeclip-vit-t").visual.trunk.time_steps == 2


@pytest.mark.parametrize("patch_size", [3, 32])
def test_invalid_patch_size_rejected(patch_size):
    with pytest.raises(ValueError, match="patch_size must be one of"):
        SpikingVisionTransformer(img_size=32, patch_size=patch_size, embed_dim=64, num_heads=2)


def test_224_variant_token_grid():
    model = timm.create_model("spikeclip_vit_s_224", num_classes=0, embed_dim=64, num_heads=2, depth=1,
                              time_steps=1)
    assert model.patch_embed.grid_size == (14, 14)
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 196, 64)
