import open_clip
import pytest
import torch

from open_clip_spiking.text import SpikingTextCfg, SpikingTextMlp


def _tower(**overrides):
    cfg = SpikingTextCfg.from_dict({"context_length": 20, "vocab_size": 49408, "width": 16,
                                    "snn_hidden_dim": 32, "snn_time_steps": 3, **overrides})
    return SpikingTextMlp(24, cfg)


def test_reference_text_tower_shape():
    model = open_clip.create_model("spikeclip-vit-s")
    text = model.text
    assert text.fc1.in_features == 20 * 512
    assert text.fc1.out_features == 2048
    assert text.fc2.out_features == 512
    assert text.time_weight.weight.shape == (4,)


def test_encodes_tokenizer_output():
    tokenizer = open_clip.get_tokenizer("spikeclip-vit-t")
    model = open_clip.create_model("spikeclip-vit-t")
    features = model.encode_text(tokenizer(["a photo of a dog", "a photo of a cat"]), normalize=True)
    assert features.shape == (2, 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))


def test_long_tokens_rejected():
    tower = _tower()
    with pytest.raises(ValueError, match="longer than the spiking text tower's context of 20"):
        tower(torch.ones(1, 77, dtype=torch.long))


def test_short_tokens_padded():
    tower = _tower().eval()
    tokens = torch.randint(1, 1000, (2, 7))
    padded = torch.nn.functional.pad(tokens, (0, 13))
    torch.testing.assert_close(tower(tokens), tower(padded))


def test_output_independent_of_previous_batch():
    torch.manual_seed(0)
    tower = _tower()
    tokens = torch.randint(1, 1000, (3, 20))
    with torch.no_grad():
        tower(torch.randint(1, 1000, (5, 20)))
        first = tower(tokens)
        second = tower(tokens)
    assert torch.equal(first, second)


def test_unknown_key_rejected():
    with pytest.raises(ValueError, match=r"unknown keys \['snn_taus'\]"):
        _tower(snn_taus=3.0)


def test_lock_freezes_all_then_unlocks_last():
    tower = _tower()
    tower.lock()
    assert not any(p.requires_grad for p in tower.parameters())
    tower = _tower()
    tower.lock(unlocked_layers=1)
    assert tower.fc2.weight.requires_grad
    assert not tower.fc1.weight.requires_grad
    assert not tower.token_embedding.weight.requires_grad


def _spike_rates(tower, tokens):
    rates = {}
    hooks = [
        lif.register_forward_hook(lambda module, inputs, output, name=name: rates.__setitem__(name, output.mean().item()))
        for name, lif in (("in_lif", tower.in_lif), ("hidden_lif", tower.hidden_lif))
    ]
    with torch.no_grad():
        features = tower(tokens)
    for hook in hooks:
        hook.remove()
    return rates, features


def test_reference_tower_fires_at_init():
    torch.manual_seed(0)
    model = open_clip.create_model("spikeclip-vit-s").eval()
    tokenizer = open_clip.get_tokenizer("spikeclip-vit-s")
    prompts = [f"a photo of a {name}." for name in ("airplane", "cat", "ship", "truck")]
    rates, features = _spike_rates(model.text, tokenizer(prompts))
    for name in ("in_lif", "hidden_lif"):
        assert 0.01 < rates[name] < 0.5, (name, rates[name])
    features = torch.nn.functional.normalize(features, dim=-1)
    similarity = features @ features.T
    assert similarity[~torch.eye(4, dtype=torch.bool)].max() < 0.99  # prompts embed apart


def test_copied_teacher_embeddings_reach_unit_scale():
    from open_clip_spiking.train.models import init_text_embeddings_from_teacher

    student = open_clip.create_model("spikeclip-vit-s")
    teacher = open_clip.create_model("ViT-B-16")  # random weights: token embeddings of std 0.02
    assert init_text_embeddings_from_teacher(student, teacher)
    scale = 1.0 / teacher.token_embedding.weight.std()
    torch.testing.assert_close(student.text.token_embedding.weight, teacher.token_embedding.weight * scale)
    torch.testing.assert_close(student.text.positional_embedding, teacher.positional_embedding[:20] * scale)
