"""Shared fixtures: the real data folder, a tiny open_clip teacher and registration."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

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
    # Seeded, so every run of the suite distils from the same teacher.
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_TEACHER)
    torch.set_rng_state(generator_state)
    weights = folder / f"{TINY_TEACHER}.safetensors"
    save_weights(weights, model.state_dict(), TINY_TEACHER, TINY_TEACHER_CFG)
    return TINY_TEACHER, weights


def _copy_subset(source: Path, target: Path, count: int) -> Path:
    """Write the first ``count`` samples of a real shard to ``target`` unchanged."""
    from open_clip_spiking.train.data import copy_shard_head

    copy_shard_head(str(source), str(target), count)
    return target


@pytest.fixture(scope="session")
def cifar_subset(wds_root, tmp_path_factory):
    """A clip_benchmark dataset folder holding 96 real CIFAR-10 test images."""
    folder = tmp_path_factory.mktemp("cifar_subset")
    source = wds_root / "cifar10_jpeg"
    _copy_subset(source / "test" / "0.tar", folder / "test" / "0.tar", 96)
    (folder / "test" / "nshards.txt").write_text("1")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture
def single_thread():
    """Run the test with one torch thread, restoring the previous count afterwards.

    Tests that compare a forked process, which runs single-threaded, with a run in the test process
    need the same thread count on both sides. Sums over a different number of threads round
    differently, and a spike at its threshold can flip.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def isolated_logging_and_env(monkeypatch):
    """Undo the logging set-up and the hub variables of a command's main() after the test.

    main() points the root logger at the captured stderr of one test, and sets HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE. They are set here first, so that monkeypatch removes them afterwards.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
