"""Bad data: every unusable sample is skipped and logged with its shard and key, never fatal by itself."""
import io
import json
import logging
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from open_clip_spiking.train import align
from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.data import (
    Collate,
    SampleDecoder,
    build_loader,
    count_samples,
    decode_image,
    iter_shard,
)
from open_clip_spiking.train.trainer import BadDataError, BadSampleCounter


def _real_samples(wds_root, count):
    """The first ``count`` samples of the real CIFAR-10 test shard as {key: {field: bytes}}."""
    samples = {}
    with tarfile.open(wds_root / "cifar10_jpeg" / "test" / "0.tar") as archive:
        for member in archive:
            key, field = member.name.split(".", 1)
            if key not in samples and len(samples) == count:
                break
            samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    return samples


def _write_shard(path, samples):
    """Write samples in order; a list of (key, field, payload) allows repeated fields."""
    members = samples if isinstance(samples, list) else [
        (key, field, payload) for key, fields in samples.items() for field, payload in fields.items()
    ]
    with tarfile.open(path, "w") as archive:
        for key, field, payload in members:
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return str(path)


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) uint16 array; PIL writes neither."""
    height, width = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source_image(wds_root):
    jpg = next(iter(_real_samples(wds_root, 1).values()))["jpg"]
    return Image.open(io.BytesIO(jpg)).convert("RGB")


def _image_variants(image: Image.Image):
    """(name, encoded bytes, expected RGB array, tolerance in mean absolute 8-bit levels)."""
    rgb = np.asarray(image)
    gray = np.asarray(image.convert("L"))
    gray_rgb = np.repeat(gray[..., None], 3, axis=2)
    return [
        ("grayscale jpeg", _encode(image.convert("L"), "JPEG"), gray_rgb, 3.0),
        ("cmyk jpeg", _encode(image.convert("CMYK"), "JPEG"), rgb, 3.0),
        ("16-bit grayscale png", _png16(gray.astype(np.uint16) * 257), gray_rgb, 0.0),
        ("16-bit rgb png", _png16(rgb.astype(np.uint16) * 257), rgb, 0.0),
        ("palette png", _encode(image.quantize(256), "PNG"), rgb, 8.0),
        ("rgba png", _encode(image.convert("RGBA"), "PNG"), rgb, 0.0),
        ("grayscale alpha png", _encode(image.convert("LA"), "PNG"), gray_rgb, 0.0),
    ]


def test_image_modes_decode_to_rgb(source_image):
    for name, data, expected, tolerance in _image_variants(source_image):
        decoded = decode_image(data)
        assert decoded.mode == "RGB", name
        assert decoded.size == source_image.size, name
        error = np.abs(np.asarray(decoded).astype(float) - expected.astype(float)).mean()
        assert error <= tolerance, f"{name}: mean error {error:.2f} levels"


def _mixed_shard(wds_root, path, source_image):
    """24 real samples, 8 of them made bad in different ways, and 4 good ones in unusual image modes."""
    samples = _real_samples(wds_root, 24)
    keys = list(samples)
    bad = {
        keys[1]: "truncated image",
        keys[4]: "no image",
        keys[7]: "empty caption",
        keys[10]: "overlong caption",
        keys[13]: "label not a number",
        keys[16]: "label outside the class names",
        keys[19]: "not an image",
        keys[22]: "duplicate field",
    }
    samples[keys[1]]["jpg"] = samples[keys[1]]["jpg"][:60]
    del samples[keys[4]]["jpg"]
    samples[keys[7]]["txt"] = b"  \n \n"
    samples[keys[10]]["txt"] = b"a caption\n" + b"x" * 300
    samples[keys[13]]["cls"] = b"cat"
    samples[keys[16]]["cls"] = b"12"
    samples[keys[19]]["jpg"] = b"<html>not found</html>"
    variants = _image_variants(source_image)
    for index, (name, data, _, _) in zip((2, 5, 8, 11), variants[:4]):
        del samples[keys[index]]["jpg"]
        samples[keys[index]]["png" if "png" in name else "jpeg"] = data
    members = [(key, field, payload) for key, fields in samples.items() for field, payload in fields.items()]
    duplicate_at = next(i for i, (key, _, _) in enumerate(members) if key == keys[22]) + 1
    members.insert(duplicate_at, (keys[22], "cls", b"3"))
    return _write_shard(path, members), keys, bad


def test_bad_samples_reported_with_reason(wds_root, tmp_path, source_image):
    url, keys, bad = _mixed_shard(wds_root, tmp_path / "mixed.tar", source_image)
    classnames = (wds_root / "cifar10_jpeg" / "classnames.txt").read_text().split()
    decoder = SampleDecoder(image_transforms={"image": lambda image: torch.from_numpy(np.asarray(image).copy())},
                            classnames=classnames, templates=["a photo of a {c}."], max_caption_chars=100)
    loader = build_loader([url], decoder, Collate(image_fields=("image",)), batch_size=24, workers=0,
                          shuffle=False, seed=0)
    batch = next(iter(loader))
    reasons = {key: reason for shard, key, reason in batch["bad"] if shard == url}
    assert set(reasons) == set(bad)
    assert batch["size"] == 16
    assert batch["image"].shape == (16, 32, 32, 3)
    expected = {
        "truncated image": "OSError",
        "no image": "no image (expected one of jpg, jpeg, png, webp; found cls)",
        "empty caption": "empty caption ('txt' field without text)",
        "overlong caption": "caption of 300 characters is longer than --max-caption-chars 100",
        "label not a number": "ValueError: invalid literal for int()",
        "label outside the class names": "label 12 is outside the 10 class names",
        "not an image": "UnidentifiedImageError",
        "duplicate field": "field 'cls' appears twice in the shard",
    }
    for key, case in bad.items():
        assert expected[case] in reasons[key], case


def test_label_required_and_captions_ignored(wds_root, tmp_path, source_image):
    samples = _real_samples(wds_root, 4)
    keys = list(samples)
    del samples[keys[0]]["cls"]
    samples[keys[1]]["txt"] = b""  # a finetune stage reads no captions, so this sample stays good
    url = _write_shard(tmp_path / "labels.tar", samples)
    decoder = SampleDecoder(image_transforms={}, require_label=True, read_text=False)
    batch = next(iter(build_loader([url], decoder, Collate(image_fields=()), batch_size=4, workers=0,
                                   shuffle=False, seed=0)))
    assert [(key, reason) for _, key, reason in batch["bad"]] == [(keys[0], "no label ('cls' field)")]
    assert batch["size"] == 3


def test_truncated_tar_reports_shard_and_key(wds_root, tmp_path):
    source = wds_root / "cifar10_jpeg" / "test" / "0.tar"
    data = source.read_bytes()
    samples = list(iter_shard(str(source)))[:12]
    with tarfile.open(source) as archive:
        image = next(m for m in archive if m.name == f"{samples[8]['__key__']}.jpg")
    middle = tmp_path / "middle.tar"
    middle.write_bytes(data[:image.offset_data + image.size // 2])  # inside the 9th sample's image
    records = list(iter_shard(str(middle)))
    assert [r["__key__"] for r in records[:-1]] == [s["__key__"] for s in samples[:8]]
    assert records[-1]["__key__"] == samples[8]["__key__"]
    assert records[-1]["__url__"] == str(middle)
    assert "shard is truncated or corrupt at this sample" in records[-1]["bad"]
    assert count_samples([str(middle)]) == 9

    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[:512 * 40])  # after a whole member, where tarfile itself reports no error
    records = list(iter_shard(str(boundary)))
    assert "without its end-of-archive blocks" in records[-1]["bad"]

    empty = tmp_path / "empty.tar"
    _write_shard(empty, {})
    assert [r["bad"] for r in iter_shard(str(empty))] == ["shard contains no samples"]

    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="is not a readable tar file"):
        count_samples([str(not_tar)])


def test_bad_share_counted_over_batches(caplog):
    counter = BadSampleCounter(max_fraction=0.2, min_samples=8)
    batch = {"bad": [("a.tar", "k1", "no image")], "size": 7}
    with caplog.at_level(logging.WARNING):
        counter.update(batch)
    assert "skipped bad sample k1 in a.tar (1 so far): no image" in caplog.text
    counter.add(2, 8)
    assert (counter.bad, counter.seen) == (3, 16)
    with pytest.raises(BadDataError, match=r"5 of 20 samples could not be used, more than --max-bad-fraction 0.2"):
        counter.add(2, 4)


def _align_args(wds_root, teacher, output_dir, train_data, *extra):
    return ["--stage", "align", "--model", "spikeclip-vit-t", "--teacher", teacher[0],
            "--teacher-pretrained", str(teacher[1]), "--train-data", str(train_data),
            "--output-dir", str(output_dir), "--batch-size", "8", "--workers", "0", "--log-every-n-steps", "1",
            "--shuffle-buffer", "1", *extra]


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_skips_and_logs_bad_samples(wds_root, tiny_teacher, tmp_path, source_image):
    url, keys, bad = _mixed_shard(wds_root, tmp_path / "mixed.tar", source_image)
    source = wds_root / "cifar10_jpeg"
    output_dir = tmp_path / "run"
    args = _align_args(wds_root, tiny_teacher, output_dir, url, "--classnames", str(source), "--max-steps", "3",
                       "--max-bad-fraction", "0.4", "--max-caption-chars", "100")
    assert main(args) == 0
    log = (output_dir / "train.log").read_text()
    for key in bad:
        assert f"skipped bad sample {key} in {url}" in log
    assert _metrics(output_dir)[-1]["bad_samples"] == len(bad)

    # With the default share of 1%, the first batch (three bad samples in eight) stops the run.
    output_dir = tmp_path / "strict"
    args = _align_args(wds_root, tiny_teacher, output_dir, url, "--classnames", str(source), "--max-steps", "3",
                       "--max-caption-chars", "100")
    assert main(args) == 2
    assert (f"3 of 8 samples could not be used, more than --max-bad-fraction 0.01; last one here: {keys[7]} in {url}"
            in (output_dir / "train.log").read_text())


def test_captionless_shards_stop_at_first_batch(wds_root, tiny_teacher, tmp_path):
    shard = wds_root / "cifar10_jpeg" / "train" / "0.tar"
    assert main(_align_args(wds_root, tiny_teacher, tmp_path, shard, "--max-steps", "2")) == 2
    log = (tmp_path / "train.log").read_text()
    assert "no sample of the first 8 in --train-data" in log
    assert "or set --text-loss-weight 0 to align the image tower alone" in log
    assert not (tmp_path / "metrics.jsonl").exists()


def _poison(monkeypatch, steps):
    """Make the align loss NaN at the given (1-based) steps."""
    original = align.AlignTrainer.compute_loss

    def compute_loss(self, batch, model):
        losses = original(self, batch, model)
        if self.step + 1 in steps:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(align.AlignTrainer, "compute_loss", compute_loss)


def test_nonfinite_loss_skips_update(wds_root, tiny_teacher, tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    source = wds_root / "cifar10_jpeg"
    args = _align_args(wds_root, tiny_teacher, tmp_path, source / "train" / "0.tar", "--classnames", str(source),
                       "--max-steps", "3")
    assert main(args) == 0
    assert "step 2: non-finite loss or gradient (loss nan" in (tmp_path / "train.log").read_text()
    assert [m["nonfinite_steps"] for m in _metrics(tmp_path)] == [0, 1, 1]
    state = torch.load(tmp_path / "latest.state.pt", weights_only=True)
    assert state["step"] == 3
    assert state["scheduler"]["last_epoch"] == 3
    # Adam counts its own updates: two, since step 2 did not update.
    assert {int(p["step"]) for p in state["optimizer"]["state"].values()} == {2}


def test_nonfinite_losses_in_a_row_abort(wds_root, tiny_teacher, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4, 5})
    source = wds_root / "cifar10_jpeg"
    args = _align_args(wds_root, tiny_teacher, tmp_path, source / "train" / "0.tar", "--classnames", str(source),
                       "--max-steps", "8", "--max-nonfinite-steps", "3")
    assert main(args) == 2
    log = (tmp_path / "train.log").read_text()
    assert ("the loss or gradient was not finite in 3 consecutive steps (steps 2 to 4; --max-nonfinite-steps 3); "
            "lower --lr (now 0.005), set --grad-clip-norm, or check the data of these steps") in log
