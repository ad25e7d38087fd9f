"""Shared fixtures: the real data folder, a tiny open_clip teacher and registration."""
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "OPEN_CLIP_SPIKING_DATA"
REQUIRE_DATA_ENV = "OPEN_CLIP_SPIKING_REQUIRE_DATA"

TINY_TEACHER = "test-tiny-teacher"
TINY_TEACHER_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def data_root() -> Path:
    """Folder of the shared WebDataset shards; OPEN_CLIP_SPIKING_DATA overrides the default."""
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data" / "wds"))


@pytest.fixture(scope="session")
def wds_root() -> Path:
    """The real shards, or a skip (a failure when OPEN_CLIP_SPIKING_REQUIRE_DATA=1) when missing."""
    root = data_root()
    if not (root / "cifar10_jpeg" / "train").is_dir():
        message = f"real WebDataset shards not found under {root}; set {DATA_ENV} to the folder that holds cifar10_jpeg"
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session", autouse=True)
def registered():
    import open_clip_spiking

    open_clip_spiking.register()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A randomly initialised 64-wide open_clip CLIP saved as a checkpoint: (model name, weights path)."""
    import open_clip

    from open_clip_spiking.train.checkpoint import save_weights

    folder = tmp_path_factory.mktemp("teacher")
    (folder / f"{TINY_TEACHER}.json").write_text(json.dumps(TINY_TEACHER_CFG))
    open_clip.add_model_config(folder)
    model = open_clip.create_model(TINY_TEACHER)
    weights = folder / f"{TINY_TEACHER}.safetensors"
    save_weights(weights, model.state_dict(), TINY_TEACHER, TINY_TEACHER_CFG)
    return TINY_TEACHER, weights
