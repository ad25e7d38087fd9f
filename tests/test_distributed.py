"""DDP on CPU: two gloo ranks on 127.0.0.1, forked from the test process so they skip the imports."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from open_clip_spiking.train.__main__ import main
from open_clip_spiking.train.data import check_shard_count


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _join_group(rank: int, world_size: int, port: int) -> None:
    """Set the variables torchrun sets, on the loopback interface only.

    It also limits the forked rank to one thread: GNU OpenMP's thread pool does not survive fork, so
    a child of a process that has run parallel regions hangs in its first one.
    """
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")


def _train_rank(rank: int, world_size: int, port: int, argv) -> None:
    """One rank of a DDP run; it also saves its own parameters, which rank 0's checkpoint does not show."""
    _join_group(rank, world_size, port)
    from open_clip_spiking.train import trainer

    original_fit = trainer.Trainer.fit

    def fit(self):
        result = original_fit(self)
        params = {name: p.detach().clone() for name, p in self.trainable.named_parameters()}
        torch.save(params, self.output_dir / f"params_rank{rank}.pt")
        return result

    trainer.Trainer.fit = fit
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"rank {rank} exited with code {code}")


def _align_args(wds_root, teacher, output_dir, *extra):
    # One shard with captions and one without: the rank that reads CIFAR-10 has no texts, so its
    # text tower gets no gradient while the other rank's does.
    shards = f"{wds_root / 'flickr8k_1k' / 'test' / '0.tar'}::{wds_root / 'cifar10_jpeg' / 'train' / '0.tar'}"
    return [
        "--stage", "align", "--model", "spikeclip-vit-t",
        "--teacher", teacher[0], "--teacher-pretrained", str(teacher[1]),
        "--train-data", shards, "--train-num-samples", "256",
        "--output-dir", str(output_dir), "--batch-size", "8", "--max-steps", "3", "--log-every-n-steps", "1",
        "--shuffle-buffer", "32", "--lr", "0.005",
        *extra,
    ]


def _records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(output_dir):
    return [(record["step"], record["loss"]) for record in _records(output_dir)]


def test_ddp_matches_single_process(wds_root, tiny_teacher, tmp_path, single_thread):
    # Two ranks with one data-loader worker each read the same two shard streams as one process with two
    # workers. The DataLoader alternates between its workers, so with --accum-freq 2 the single process
    # takes the two ranks' batches as its two batches of each step. Each forward pass then sees the
    # same 8 images, which keeps BatchNorm's batch statistics equal too.
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    argv = _align_args(wds_root, tiny_teacher, ddp_dir, "--workers", "1")
    mp.start_processes(_train_rank, args=(2, _free_port(), argv), nprocs=2, join=True, start_method="fork")
    assert main(_align_args(wds_root, tiny_teacher, single_dir, "--workers", "2", "--accum-freq", "2")) == 0

    assert "global batch 16 (8 per device x 2 devices x 1 accumulation steps)" in (ddp_dir / "train.log").read_text()
    assert all("loss_text" in record for record in _records(ddp_dir))
    assert "global batch 16 (8 per device x 1 devices x 2 accumulation steps)" in (single_dir / "train.log").read_text()

    rank0 = torch.load(ddp_dir / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_dir / "params_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    differing = [name for name in rank0 if not torch.equal(rank0[name], rank1[name])]
    assert differing == []

    ddp_losses, single_losses = _losses(ddp_dir), _losses(single_dir)
    assert [step for step, _ in ddp_losses] == [1, 2, 3]
    assert [step for step, _ in single_losses] == [1, 2, 3]
    # Step 1 runs the same forward passes on the same weights. DDP averages the two gradients in
    # another order than accumulation does, so later weights differ in the last bits, which a
    # spiking neuron at its threshold can turn into a slightly different loss.
    assert ddp_losses[0][1] == pytest.approx(single_losses[0][1], rel=1e-6)
    for (_, ddp_loss), (_, single_loss) in zip(ddp_losses[1:], single_losses[1:]):
        assert ddp_loss == pytest.approx(single_loss, rel=1e-3)

    single = dict(open_clip_params(single_dir / "latest.safetensors"))
    for name, value in rank0.items():
        torch.testing.assert_close(value, single[name], rtol=1e-3, atol=1e-4, msg=name)


def open_clip_params(path):
    from open_clip_spiking.train.checkpoint import load_weights

    return load_weights(path).items()


def _sync_bn_rank(rank: int, world_size: int, port: int) -> None:
    _join_group(rank, world_size, port)
    import torch.distributed as dist

    from open_clip_spiking.train.distributed import CpuSyncBatchNorm, convert_sync_batchnorm

    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        reference = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
        images = torch.randn(8, 3, 5, 5) * 3 + 2
        target = torch.randn(8, 3, 5, 5)

        model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
        model[0].load_state_dict(reference.state_dict())
        assert convert_sync_batchnorm(model, torch.device("cpu")) == 1
        assert isinstance(model[0], CpuSyncBatchNorm)

        local = images[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        output = model(local)
        (output * target[rank * 4:(rank + 1) * 4]).sum().backward()

        full = images.clone().requires_grad_(True)
        expected = reference(full)
        (expected * target).sum().backward()

        torch.testing.assert_close(output, expected[rank * 4:(rank + 1) * 4], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(local.grad, full.grad[rank * 4:(rank + 1) * 4], rtol=1e-4, atol=1e-5)
        weight_grad = model[0].weight.grad.clone()
        dist.all_reduce(weight_grad)
        torch.testing.assert_close(weight_grad, reference.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[0].running_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[0].running_var, reference.running_var, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_on_cpu_matches_global_batch():
    mp.start_processes(_sync_bn_rank, args=(2, _free_port()), nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize("shards, world_size, workers, hint", [
    (1, 1, 2, "lower --workers to 1"),
    (3, 2, 2, "lower --workers to 1"),
    (1, 2, 0, "pass more shards or add --dataset-resampled"),
])
def test_too_few_shards_rejected(shards, world_size, workers, hint):
    with pytest.raises(ValueError) as error:
        check_shard_count(shards, world_size, workers)
    message = str(error.value)
    assert f"need at least {world_size * max(1, workers)}" in message
    assert hint in message
    assert "--dataset-resampled" in message


def test_too_few_shards_stop_the_run(wds_root, tiny_teacher, tmp_path):
    argv = _align_args(wds_root, tiny_teacher, tmp_path, "--workers", "2")
    argv[argv.index("--train-data") + 1] = str(wds_root / "flickr8k_1k" / "test" / "0.tar")
    assert main(argv) == 2
    log = (tmp_path / "train.log").read_text()
    assert "--train-data has 1 shard, but 1 rank(s) x 2 data-loader worker(s) need at least 2" in log


def test_resampled_shards_lift_the_minimum(wds_root, tiny_teacher, tmp_path):
    argv = _align_args(wds_root, tiny_teacher, tmp_path, "--workers", "2", "--dataset-resampled")
    argv[argv.index("--train-data") + 1] = str(wds_root / "flickr8k_1k" / "test" / "0.tar")
    argv[argv.index("--max-steps") + 1] = "1"
    assert main(argv) == 0
    assert [step for step, _ in _losses(tmp_path)] == [1]


def _train_rank_with_buffers(rank: int, world_size: int, port: int, argv) -> None:
    """Like ``_train_rank``, and it saves the BatchNorm statistics too."""
    _join_group(rank, world_size, port)
    from open_clip_spiking.train import trainer

    original_fit = trainer.Trainer.fit

    def fit(self):
        result = original_fit(self)
        state = {name: value.detach().clone() for name, value in self.trainable.state_dict().items()}
        torch.save(state, self.output_dir / f"state_rank{rank}.pt")
        return result

    trainer.Trainer.fit = fit
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"rank {rank} exited with code {code}")


def test_ddp_finetune_sync_bn_and_angle_rule(wds_root, tiny_teacher, tmp_path):
    # The angle rule averages its two gradients over the ranks by hand, outside DDP, and --sync-bn
    # computes BatchNorm statistics over both ranks. Afterwards weights and statistics must agree.
    source = wds_root / "cifar10_jpeg"
    argv = ["--stage", "finetune", "--model", "spikeclip-vit-t", "--teacher", tiny_teacher[0],
            "--teacher-pretrained", str(tiny_teacher[1]), "--train-data", str(source / "train" / "{0..1}.tar"),
            "--train-num-samples", "64", "--classnames", str(source), "--output-dir", str(tmp_path),
            "--batch-size", "8", "--workers", "1", "--max-steps", "2", "--log-every-n-steps", "1",
            "--shuffle-buffer", "16", "--sync-bn", "--grad-angle-bound", "90", "--accum-freq", "2"]
    mp.start_processes(_train_rank_with_buffers, args=(2, _free_port(), argv), nprocs=2, join=True,
                       start_method="fork")
    assert "BatchNorm layers synchronised over 2 ranks" in (tmp_path / "train.log").read_text()
    rank0 = torch.load(tmp_path / "state_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "state_rank1.pt", weights_only=True)
    assert any(name.endswith("running_mean") for name in rank0)
    differing = [name for name in rank0 if not torch.allclose(rank0[name].float(), rank1[name].float(),
                                                              rtol=1e-6, atol=1e-6)]
    assert differing == []
    records = _records(tmp_path)
    assert [record["step"] for record in records if "grad_angle" in record] == [1, 2]
