"""Resume without loss: a run killed with SIGKILL mid-epoch continues to the same weights."""
import json
import os
import pickle
import re
import shutil
import signal
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp

from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.checkpoint import load_weights
from open_clip_spiking.train.data import Collate, SampleDecoder, build_loader

PACKAGE = Path(__file__).resolve().parent.parent / "open_clip_spiking"


def _align_args(wds_root, teacher, output_dir, *extra):
    source = wds_root / "cifar10_jpeg"
    return [
        "--stage", "align", "--model", "spikeclip-vit-t",
        "--teacher", teacher[0], "--teacher-pretrained", str(teacher[1]),
        "--train-data", str(source / "train" / "{0..1}.tar"), "--train-num-samples", "400",
        "--classnames", str(source),
        "--output-dir", str(output_dir), "--batch-size", "8", "--log-every-n-steps", "1",
        "--shuffle-buffer", "64",
        *extra,
    ]


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _log(output_dir):
    return (output_dir / "train.log").read_text()


def _train_until_step(argv, reached, stop_step: int) -> None:
    """Train, and once ``stop_step`` steps are done, signal ``reached`` and wait to be killed."""
    # GNU OpenMP's thread pool does not survive fork: a forked child that runs parallel regions hangs.
    torch.set_num_threads(1)
    from open_clip_spiking.train import trainer

    original = trainer.Trainer.train_step

    def train_step(self, batches):
        if self.step == stop_step:
            reached.set()
            time.sleep(600)
        return original(self, batches)

    trainer.Trainer.train_step = train_step
    main(argv)


def test_killed_run_resumes_to_same_weights(wds_root, tiny_teacher, tmp_path, single_thread):
    # Two data-loader workers and prompt templates drawn per sample: the resumed run must rebuild the
    # same batches, with the same template choices, from the middle of the epoch (50 steps long).
    extra = ("--workers", "2", "--max-steps", "8", "--save-every-n-steps", "2")
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert main(_align_args(wds_root, tiny_teacher, uninterrupted, *extra)) == 0

    context = mp.get_context("fork")
    reached = context.Event()
    process = context.Process(target=_train_until_step,
                              args=(_align_args(wds_root, tiny_teacher, killed, *extra), reached, 5))
    process.start()
    try:
        assert reached.wait(timeout=300), "the training process never reached step 5"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL

    # Step 5 was trained but not saved: latest contains step 4, previous step 2.
    assert torch.load(killed / "latest.state.pt", weights_only=True)["step"] == 4
    assert torch.load(killed / "previous.state.pt", weights_only=True)["step"] == 2
    assert [m["step"] for m in _metrics(killed)] == [1, 2, 3, 4, 5]

    assert main(_align_args(wds_root, tiny_teacher, killed, *extra, "--resume", "latest")) == 0
    assert "resumed from" in _log(killed)
    assert "at step 4 (epoch 0, 4 batches into it)" in _log(killed)

    expected, resumed = _metrics(uninterrupted), _metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for before, after in zip(expected, resumed):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6, abs=1e-7), before["step"]
    reference = load_weights(uninterrupted / "latest.safetensors")
    result = load_weights(killed / "latest.safetensors")
    assert reference.keys() == result.keys()
    for name in reference:
        torch.testing.assert_close(result[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_skipped_batches_match_uninterrupted_loader(wds_root):
    """With two workers, the batches after ``skip_batches`` equal those of a loader that skips none."""
    source = wds_root / "cifar10_jpeg"
    urls = [str(source / "train" / f"{index}.tar") for index in range(2)]
    classnames = (source / "classnames.txt").read_text().split()
    templates = [f"{prefix} {{c}}." for prefix in ("a photo of a", "a picture of a", "an image of the")]
    decoder = SampleDecoder(image_transforms={}, classnames=classnames, templates=templates)
    collate = Collate(image_fields=(), tokenizers={"texts": list})

    def batches(skip):
        loader = build_loader(urls, decoder, collate, batch_size=4, workers=2, shuffle=True, seed=3, epoch=1,
                              shuffle_buffer=16, repeat=True, skip_batches=skip)
        taken = []
        for index, batch in enumerate(loader):
            if index == 9:
                break
            if index < skip:
                assert batch["skipped"] == 4
                assert batch["size"] == 0
            else:
                taken.append((batch["keys"], batch["texts"], batch["skipped"]))
        return taken

    full, resumed = batches(0), batches(5)
    assert len(resumed) == 4
    assert resumed == full[5:]
    assert {url for keys, _, _ in full for url, _ in keys} == set(urls)


def test_templates_follow_sample_key(wds_root):
    """A sample's prompt depends on the seed, the epoch and its key, not on the worker that reads it."""
    source = wds_root / "cifar10_jpeg"
    url = str(source / "test" / "0.tar")
    classnames = (source / "classnames.txt").read_text().split()
    templates = [f"template {index} of {{c}}" for index in range(20)]
    seen = {}
    collate = Collate(image_fields=(), tokenizers={"texts": lambda texts: list(texts)})
    for workers, seed in ((0, 5), (1, 5), (0, 6)):
        decoder = SampleDecoder(image_transforms={}, classnames=classnames, templates=templates)
        loader = build_loader([url], decoder, collate, batch_size=16, workers=workers, shuffle=False, seed=seed)
        batch = next(iter(loader))
        seen[(workers, seed)] = dict(zip([key for _, key in batch["keys"]], batch["texts"]))
    assert seen[(0, 5)] == seen[(1, 5)]
    assert seen[(0, 5)] != seen[(0, 6)]


@pytest.fixture(scope="module")
def short_run(wds_root, tiny_teacher, tmp_path_factory):
    """A 4-step align run that saved latest (step 4) and previous (step 2)."""
    output_dir = tmp_path_factory.mktemp("short_run")
    args = _align_args(wds_root, tiny_teacher, output_dir, "--workers", "0", "--max-steps", "4",
                       "--save-every-n-steps", "2")
    assert main(args) == 0
    return output_dir


def test_state_holds_everything_to_resume(short_run):
    state = torch.load(short_run / "latest.state.pt", map_location="cpu", weights_only=True)
    assert state["format"] == 2
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (4, 0, 4)
    assert (state["world_size"], state["batch_size"], state["accum_freq"]) == (1, 8, 1)
    assert state["stage"] == "align"
    assert state["model_name"] == "spikeclip-vit-t"
    assert json.loads(state["model_cfg"]) == open_clip.get_model_config("spikeclip-vit-t")
    weights = load_weights(short_run / "latest.safetensors")
    assert all(torch.equal(state["model"][name], weights[name]) for name in weights)
    assert state["optimizer"]["state"]
    assert state["scheduler"]["last_epoch"] == 4
    assert len(state["rng"]) == 1
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])
    assert state["bad_samples"] == {"bad": 0, "seen": 32}


def test_truncated_latest_falls_back_to_previous(short_run, wds_root, tiny_teacher, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(short_run, output_dir)
    latest = output_dir / "latest.state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    args = _align_args(wds_root, tiny_teacher, output_dir, "--workers", "0", "--max-steps", "5", "--resume", "latest")
    assert main(args) == 0
    log = _log(output_dir)
    assert re.search(r"resume state .*latest\.state\.pt is unreadable \(truncated or corrupt\?\)", log)
    assert re.search(r"resuming from the previous checkpoint .*previous\.state\.pt \(step 2\)", log)
    assert "dropped 2 records" in log
    assert [m["step"] for m in _metrics(output_dir)] == [1, 2, 3, 4, 5]
    assert torch.load(output_dir / "latest.state.pt", weights_only=True)["step"] == 5


def test_state_without_weights_reads_weights_file(short_run, wds_root, tiny_teacher, tmp_path):
    # States of format 1 contain rank 0's RNG states only and no weights.
    output_dir = tmp_path / "run"
    shutil.copytree(short_run, output_dir)
    state = torch.load(output_dir / "latest.state.pt", weights_only=True)
    for key in ("format", "stage", "model_name", "model_cfg", "model", "world_size", "batch_size", "accum_freq",
                "bad_samples", "nonfinite"):
        del state[key]
    state["rng"] = {"torch": state["rng"][0]["torch"], "python": state["rng"][0]["python"]}
    torch.save(state, output_dir / "latest.state.pt")
    args = _align_args(wds_root, tiny_teacher, output_dir, "--workers", "0", "--max-steps", "5", "--resume", "latest")
    assert main(args) == 0
    assert "at step 4 (epoch 0, 4 batches into it)" in _log(output_dir)
    assert [m["step"] for m in _metrics(output_dir)] == [1, 2, 3, 4, 5]


def test_resume_with_other_model_names_both(short_run, wds_root, tiny_teacher, tmp_path):
    config = open_clip.get_model_config("spikeclip-vit-t")
    config["text_cfg"] = {**config["text_cfg"], "snn_hidden_dim": 96}
    (tmp_path / "test-spikeclip-vit-t-narrow.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)

    output_dir = tmp_path / "run"
    shutil.copytree(short_run, output_dir)
    args = _align_args(wds_root, tiny_teacher, output_dir, "--workers", "0", "--max-steps", "5", "--resume", "latest")
    args[args.index("--model") + 1] = "test-spikeclip-vit-t-narrow"
    assert main(args) == 2
    log = _log(output_dir)
    assert "was trained as 'spikeclip-vit-t' (config {" in log
    assert "but this align run trains 'test-spikeclip-vit-t-narrow' (config {" in log
    assert '"snn_hidden_dim": 128' in log
    assert '"snn_hidden_dim": 96' in log


def test_resume_in_other_stage_rejected(short_run, wds_root, tiny_teacher, tmp_path):
    args = ["--stage", "align-text", "--model", "spikeclip-vit-t", "--teacher", tiny_teacher[0],
            "--teacher-pretrained", str(tiny_teacher[1]), "--classnames", str(wds_root / "cifar10_jpeg"),
            "--output-dir", str(tmp_path), "--max-steps", "5", "--resume", str(short_run / "latest.state.pt")]
    assert main(args) == 2
    assert "was written by the align stage, but this run is the align-text stage" in _log(tmp_path)


class _NotATensor:
    """A class that a weights-only load must reject."""


def test_state_with_arbitrary_object_rejected(short_run, wds_root, tiny_teacher, tmp_path):
    state = torch.load(short_run / "latest.state.pt", weights_only=True)
    state["extra"] = _NotATensor()
    path = tmp_path / "crafted.state.pt"
    torch.save(state, path)
    args = _align_args(wds_root, tiny_teacher, tmp_path / "run", "--workers", "0", "--max-steps", "5",
                       "--resume", str(path))
    assert main(args) == 2
    assert "crafted.state.pt is unreadable" in _log(tmp_path / "run")
    assert "UnpicklingError" in _log(tmp_path / "run")


def _calls(text: str, name: str):
    """The full text of every ``name(...)`` call in ``text``, with nested brackets."""
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        yield text[match.start():end]


def test_every_torch_load_is_weights_only():
    calls = [(path.name, call) for path in PACKAGE.rglob("*.py")
             for call in _calls(path.read_text(encoding="utf-8"), "torch.load")]
    assert calls
    assert [(name, call) for name, call in calls if "weights_only=True" not in call] == []
