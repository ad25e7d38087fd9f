import io
import tarfile

import pytest
import torch
from PIL import Image

from open_clip_spiking.train.data import (
    Collate,
    SampleDecoder,
    build_loader,
    count_samples,
    expand_urls,
    load_classnames,
    load_templates,
)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as archive:
        for key, fields in samples.items():
            for ext, payload in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return str(path)


def _real_samples(wds_root, count):
    """The first ``count`` (jpg bytes, cls bytes) pairs of the real CIFAR-10 test shard."""
    samples = {}
    with tarfile.open(wds_root / "cifar10_jpeg" / "test" / "0.tar") as archive:
        for member in archive:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
            if len(samples) > count:
                break
    return dict(list(samples.items())[:count])


def _to_tensor(image):
    return torch.from_numpy(__import__("numpy").asarray(image.resize((32, 32)), dtype="float32")).permute(2, 0, 1)


def test_expand_brace_pattern(wds_root):
    urls = expand_urls(str(wds_root / "cifar10_jpeg" / "train" / "{0..2}.tar"))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["0.tar", "1.tar", "2.tar"]


def test_expand_folder_and_list(wds_root):
    folder = wds_root / "cifar10_jpeg" / "test"
    assert len(expand_urls(str(folder))) == 5
    assert len(expand_urls(f"{folder}/0.tar::{folder}/1.tar")) == 2


def test_missing_shard_named(wds_root):
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*/cifar10_jpeg/train/99.tar"):
        expand_urls(str(wds_root / "cifar10_jpeg" / "train" / "{0..1}.tar::") + str(wds_root / "cifar10_jpeg/train/99.tar"))


@pytest.mark.parametrize("spec", ["", "  ", []])
def test_empty_spec_rejected(spec):
    with pytest.raises(ValueError, match="no training shards given"):
        expand_urls(spec)


def test_folder_shards_in_numeric_order(tmp_path):
    for index in (10, 2, 1):
        (tmp_path / f"{index}.tar").write_bytes(b"")
    names = [url.rsplit("/", 1)[1] for url in expand_urls(str(tmp_path))]
    assert names == ["1.tar", "2.tar", "10.tar"]


def test_glob_without_match_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        expand_urls(str(tmp_path / "*.tar"))


def test_count_samples_real_shards(wds_root):
    urls = expand_urls(str(wds_root / "cifar10_jpeg" / "test"))
    assert count_samples(urls) == 10_000


def test_classnames_duplicate_rejected(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"lists \['cat'\] more than once"):
        load_classnames(str(path))


def test_classnames_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        load_classnames(str(tmp_path / "nope.txt"))


def test_template_without_placeholder_rejected(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {c}.\na photo.\n")
    with pytest.raises(ValueError, match="lack the '{c}' placeholder"):
        load_templates(str(path))


def test_bad_samples_reported_with_key(tmp_path, wds_root):
    samples = _real_samples(wds_root, 6)
    keys = list(samples)
    samples[keys[1]] = {"cls": b"3"}  # no image
    samples[keys[2]]["jpg"] = samples[keys[2]]["jpg"][:40]  # truncated JPEG
    url = _write_shard(tmp_path / "mixed.tar", samples)
    decoder = SampleDecoder(image_transforms={"image": _to_tensor})
    loader = build_loader([url], decoder, Collate(image_fields=("image",)), batch_size=6, workers=0,
                          shuffle=False, seed=0)
    batch = next(iter(loader))
    assert batch["size"] == 4
    assert batch["image"].shape == (4, 3, 32, 32)
    bad = {key: reason for _url, key, reason in batch["bad"]}
    assert set(bad) == {keys[1], keys[2]}
    assert "no image (expected one of jpg, jpeg, png, webp; found cls)" in bad[keys[1]]


def test_prompts_from_class_labels(tmp_path, wds_root):
    url = _write_shard(tmp_path / "s.tar", _real_samples(wds_root, 4))
    classnames = (wds_root / "cifar10_jpeg" / "classnames.txt").read_text().split("\n")
    decoder = SampleDecoder(image_transforms={"image": _to_tensor}, classnames=[c for c in classnames if c],
                            templates=["a photo of a {c}."])
    tokenized = []
    collate = Collate(image_fields=("image",), tokenizers={"tokens": lambda texts: tokenized.extend(texts) or len(texts)})
    batch = next(iter(build_loader([url], decoder, collate, batch_size=4, workers=0, shuffle=False, seed=0)))
    labels = batch["label"].tolist()
    assert tokenized == [f"a photo of a {classnames[label]}." for label in labels]
    assert batch["tokens"] == 4
