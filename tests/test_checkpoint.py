import json
import os

import open_clip
import pytest
import torch

from open_clip_spiking.train.checkpoint import (
    load_training_state,
    load_weights,
    read_checkpoint_metadata,
    save_training_state,
    save_weights,
)


def _encode(model):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32) * 2
    tokens = open_clip.get_tokenizer("spikeclip-vit-t")(["a cat", "a dog", "a photo of a ship"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_through_open_clip(tmp_path, suffix):
    model = open_clip.create_model("spikeclip-vit-t").eval()
    path = save_weights(tmp_path / f"student{suffix}", model.state_dict(), "spikeclip-vit-t",
                        open_clip.get_model_config("spikeclip-vit-t"), {"lr": 0.1})
    reloaded, _, preprocess = open_clip.create_model_and_transforms("spikeclip-vit-t", pretrained=str(path))
    reloaded.eval()
    for before, after in zip(_encode(model), _encode(reloaded)):
        assert torch.equal(before, after)
    assert preprocess.transforms[0].size == 32


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_metadata_rebuilds_model(tmp_path, suffix):
    cfg = open_clip.get_model_config("spikeclip-vit-t")
    path = save_weights(tmp_path / f"w{suffix}", {"x": torch.ones(2)}, "spikeclip-vit-t", cfg, {"epochs": 3})
    metadata = read_checkpoint_metadata(path)
    assert metadata["model_name"] == "spikeclip-vit-t"
    assert metadata["model_cfg"] == json.loads(json.dumps(cfg))
    assert metadata["args"] == {"epochs": 3}
    assert torch.equal(load_weights(path)["x"], torch.ones(2))


def test_checkpoint_for_other_config_names_both(tmp_path):
    model = open_clip.create_model("spikeclip-vit-t")
    path = save_weights(tmp_path / "tiny.safetensors", model.state_dict(), "spikeclip-vit-t",
                        open_clip.get_model_config("spikeclip-vit-t"))
    with pytest.raises(ValueError) as error:
        open_clip.create_model("spikeclip-vit-s", pretrained=str(path))
    message = str(error.value)
    assert "written for model 'spikeclip-vit-t'" in message
    assert "image tower 'spikeclip_vit_s'" in message
    assert "create the model as 'spikeclip-vit-t'" in message


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"x": torch.zeros(2)}, "m", {})
    with pytest.raises(Exception):
        save_weights(path, {"x": "not a tensor"}, "m", {})
    assert torch.equal(load_weights(path)["x"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_bad_suffix_rejected(tmp_path):
    with pytest.raises(ValueError, match="must end in .safetensors or .pt"):
        save_weights(tmp_path / "w.bin", {}, "m", {})


def test_training_state_round_trip(tmp_path):
    state = {"step": 3, "optimizer": {"state": {}, "param_groups": []}, "rng": {"torch": torch.get_rng_state()}}
    path = save_training_state(tmp_path / "latest.state.pt", state)
    loaded = load_training_state(path)
    assert loaded["step"] == 3
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])


def test_foreign_file_has_no_metadata(tmp_path):
    path = tmp_path / "other.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert read_checkpoint_metadata(path) is None
