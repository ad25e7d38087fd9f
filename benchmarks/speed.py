#!/usr/bin/env python
"""Speed and memory of the spiking image tower and the align stage, measured on this machine.

    python benchmarks/speed.py --output benchmarks/SPEED.md

Every figure comes from this one run, so the ratios compare measurements taken side by side. Parts:

(a) images/s of ``--model`` (default ``spikeclip-vit-s``'s tower, 32 px, batch ``--batch-size``) for
    inference (``torch.no_grad``, eval mode) and for a training step (forward, cosine loss to random
    targets, backward, Adam with AMSGrad) at each of ``--time-steps``, eager and through
    ``torch.compile``, in fp32; plus bf16 autocast at T=4 where the device computes bf16 natively
    (emulated bf16 on other CPUs is left out);
(b) the same for the ANN twin: identical layers with every LIF neuron replaced by ReLU, at T=1;
(c) achieved GFLOP/s of each training step (FLOPs counted by ``torch.utils.flop_counter``) and of a
    plain fp32 ``torch.matmul`` of two 2048 x 2048 matrices, both measured in this run;
(d) peak resident memory (``ru_maxrss`` of a fresh process that runs two training steps, its data
    segment capped at ``--memory-limit-gib``) at T=4 and T=8, with and without activation checkpointing,
    under glibc's default allocator settings and under settings that return freed memory at once;
(e) epoch time of the align stage (``python -m open_clip_spiking.train --stage align``) with and
    without ``--teacher-cache``, for an open_clip ``ViT-B-16`` teacher with random weights, over
    ``--cache-images`` real Imagenette training images with their class prompts.

Outputs: the Markdown page (``--output``) and ``speed.json`` beside it with the same figures. Keys of
``speed.json``:

* ``command``, ``date``, ``wall_s``, ``hardware``, ``software``, ``settings``: how the figures were made;
* ``matmul_gflops``: plain fp32 matmul GFLOP/s (best of ``--repeats`` timings);
* ``towers``: one record per measured configuration: ``network`` (``spiking`` or ``ann``),
  ``time_steps``, ``mode`` (``eager`` or ``compiled``), ``precision``, ``grad_checkpointing`` (set for a
  T whose training step did not fit in part (d) without it), ``infer_img_s``, ``train_img_s``,
  ``train_gflop_per_image``, ``train_gflops``, ``train_matmul_share`` (``train_gflops`` over
  ``matmul_gflops``), ``compile_s`` (first-call time of the compiled training and inference steps),
  or ``error`` instead of the figures when the configuration failed;
* ``memory``: ``allocator`` (``glibc default`` or ``mmap``, see ``ALLOCATORS``), ``time_steps``,
  ``grad_checkpointing``, ``peak_rss_gib``, ``train_img_s``, or ``error`` when it did not fit;
* ``teacher_cache``: ``teacher``, ``images``, ``epoch_s`` (per epoch, without and with the cache),
  ``later_epoch_speedup`` (epoch 2 without over epoch 2 with the cache), ``teacher_forward_gflop_per_image``,
  ``student_train_gflop_per_image`` and ``flop_bound`` (their sum over the student's figure);
* ``targets``: name, measured value, target, whether it is met, and a note.

Timings take the median of ``--repeats`` calls after one warm-up call (which for the compiled path
also compiles). Other processes on the machine slow every column alike only if they run throughout;
run the script on an otherwise idle machine.
"""
import argparse
import json
import logging
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from open_clip_spiking.provenance import collect_hardware, collect_software, load_average, now

_logger = logging.getLogger("benchmarks.speed")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV_VAR = "OPEN_CLIP_SPIKING_DATA"
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "wds"

# Reference figures of the authors' encoder (spikingjelly 0.0.0.0.14, torch backend, fp32, T=4, batch
# 64, 32 px) on a 2-core machine with torch 2.14.1, and the targets set against them.
REFERENCE = {"train_img_s": 4.2, "infer_img_s": 10.2, "matmul_share": 0.52, "peak_rss_gib": 11.7}
TARGET_TRAIN_SPEEDUP = 2.0
TARGET_MATMUL_SHARE = 0.80
TARGET_TWIN_RATIO_PER_T = 1.25
TARGET_RSS_T4_CKPT_GIB = 4.0
TARGET_RSS_T8_CKPT_GIB = 8.0
TARGET_CACHE_SPEEDUP = 3.0
# glibc settings of the memory probes. With the defaults, glibc serves tensors of up to 32 MiB from its
# heap, where freed activations leave holes that stay resident, so peak RSS can exceed the live tensors
# several times over. "mmap" maps every allocation above 128 KiB on its own, so freed memory returns to
# the system at once, and backs the mappings with transparent huge pages to keep page faults few.
ALLOCATORS = {
    "glibc default": "",
    "mmap": "glibc.malloc.mmap_threshold=131072:glibc.malloc.hugetlb=1",
}


class ReLUNeuron(nn.Module):
    """Stands in for a multi-step LIF neuron in the ANN twin: ReLU of the input, any shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


def build_tower(time_steps: int, network: str, model: str) -> nn.Module:
    import timm
    from spikingjelly.activation_based import neuron

    import open_clip_spiking  # noqa: F401 - registers the timm entry points

    tower = timm.create_model(model, num_classes=0, time_steps=time_steps)
    if network == "ann":
        for parent in list(tower.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, neuron.BaseNode):
                    setattr(parent, name, ReLUNeuron())
    return tower


def real_images(data_root: Path, count: int, size: int) -> torch.Tensor:
    """``count`` CIFAR-10 training images (repeated when the shard has fewer), normalised like the student's input."""
    from open_clip_spiking.train.data import decode_image, iter_shard
    import torchvision.transforms.v2.functional as F

    shard = data_root / "cifar10_jpeg" / "train" / "0.tar"
    if not shard.is_file():
        raise FileNotFoundError(f"{shard} not found; pass --data-root, the folder that contains cifar10_jpeg, or set "
                                f"{DATA_ENV_VAR}")
    images = []
    for sample in iter_shard(str(shard)):
        image = F.to_dtype(F.to_image(decode_image(sample["jpg"])), torch.float32, scale=True)
        images.append(F.resize(image, [size, size], antialias=True))
        if len(images) == count:
            break
    batch = torch.stack([images[i % len(images)] for i in range(count)])
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (batch - mean) / std


def bf16_is_native(device: torch.device) -> bool:
    """Return whether ``device`` computes bf16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], repeats: int, device: torch.device) -> Dict[str, float]:
    """First-call seconds and the median seconds of ``repeats`` further calls."""
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times)}


def matmul_gflops(device: torch.device, repeats: int, size: int = 2048) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * size ** 3 / best / 1e9


def train_flops_per_image(tower: nn.Module, images: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    sample = images[:2]
    with FlopCounterMode(display=False) as counter:
        tower(sample).square().sum().backward()
    tower.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(sample)


def train_step_fn(tower: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    targets = torch.nn.functional.normalize(torch.randn(images.shape[0], tower.num_features, device=images.device),
                                            dim=-1)
    optimizer = torch.optim.Adam(tower.parameters(), lr=1e-4, amsgrad=True)

    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            features = tower(images)
        loss = 1 - torch.nn.functional.cosine_similarity(features.float(), targets, dim=-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def infer_fn(tower: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    def infer():
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                             enabled=precision == "bf16"):
            tower(images)

    return infer


def measure_tower(args, images: torch.Tensor, device: torch.device, network: str, time_steps: int, mode: str,
                  precision: str, matmul: float, checkpointing: bool = False) -> Dict[str, Any]:
    """Time one configuration; an error (out of memory, a failing compiler) is recorded, not raised."""
    record: Dict[str, Any] = {"network": network, "time_steps": time_steps, "mode": mode, "precision": precision,
                              "grad_checkpointing": checkpointing}
    try:
        record.update(_measure_tower(args, images, device, network, time_steps, mode, precision, matmul,
                                     checkpointing))
    except (RuntimeError, MemoryError) as error:
        _logger.exception("%s T=%d %s %s failed", network, time_steps, mode, precision)
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return record


def _measure_tower(args, images: torch.Tensor, device: torch.device, network: str, time_steps: int, mode: str,
                   precision: str, matmul: float, checkpointing: bool) -> Dict[str, Any]:
    from open_clip_spiking.compiled import compile_model

    torch.manual_seed(0)
    tower = build_tower(time_steps, network, args.model).to(device)
    tower.set_grad_checkpointing(checkpointing)
    flops = train_flops_per_image(tower, images)
    record: Dict[str, Any] = {}
    if mode == "compiled" and not compile_model(tower, device):
        record["error"] = "torch.compile unavailable"
        return record
    batch = images.shape[0]
    tower.train()
    train = timed(train_step_fn(tower, images, precision), args.repeats, device)
    tower.eval()
    infer = timed(infer_fn(tower, images, precision), args.repeats, device)
    record.update(
        infer_img_s=batch / infer["median_s"],
        train_img_s=batch / train["median_s"],
        train_gflop_per_image=flops / 1e9,
    )
    record["train_gflops"] = record["train_img_s"] * record["train_gflop_per_image"]
    record["train_matmul_share"] = record["train_gflops"] / matmul
    if mode == "compiled":
        record["compile_s"] = train["first_s"] + infer["first_s"]
    _logger.info("%s", json.dumps(record))
    return record


def memory_probe(time_steps: int, checkpointing: bool, batch: int, model: str, data_root: Path,
                 limit_gib: float) -> None:
    """Run in a fresh process: two training steps, then print peak RSS and speed as JSON.

    The data segment is capped at ``limit_gib``, so a configuration that does not fit fails with an
    allocation error in this process instead of waking the kernel's out-of-memory killer.
    """
    limit = int(limit_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.manual_seed(0)
    images = real_images(data_root, batch, 32)
    tower = build_tower(time_steps, "spiking", model)
    tower.set_grad_checkpointing(checkpointing)
    tower.train()
    step = train_step_fn(tower, images, "fp32")
    step()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"time_steps": time_steps, "grad_checkpointing": checkpointing,
                      "peak_rss_gib": peak_kib / 2 ** 20, "train_img_s": batch / seconds}))


def measure_memory(args) -> List[Dict[str, Any]]:
    records = []
    for allocator, tunables in ALLOCATORS.items():
        env = dict(os.environ)
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        else:
            env.pop("GLIBC_TUNABLES", None)
        for time_steps in (4, 8):
            for checkpointing in (False, True):
                command = [sys.executable, __file__, "--memory-probe", str(time_steps), str(int(checkpointing)),
                           "--batch-size", str(args.batch_size), "--model", args.model,
                           "--data-root", str(args.data_root), "--memory-limit-gib", str(args.memory_limit_gib)]
                result = subprocess.run(command, capture_output=True, text=True, env=env)
                record: Dict[str, Any] = {"allocator": allocator}
                if result.returncode != 0:
                    # Out of memory is a result too: the configuration does not fit under the cap.
                    lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
                    record.update(time_steps=time_steps, grad_checkpointing=checkpointing, peak_rss_gib=None,
                                  error=lines[-1])
                else:
                    record.update(json.loads(result.stdout.strip().splitlines()[-1]))
                records.append(record)
                _logger.info("memory: %s", json.dumps(record))
    return records


def measure_teacher_cache(args) -> Dict[str, Any]:
    """Align-stage epoch times with and without --teacher-cache for a random-weight ViT-B-16 teacher."""
    import open_clip

    from open_clip_spiking.train.checkpoint import save_weights
    from open_clip_spiking.train.data import copy_shard_head

    work = Path(args.work_dir)
    source = args.data_root / "imagenette"
    shard = work / "cache_data" / "0.tar"
    images = copy_shard_head(str(source / "train" / "0.tar"), str(shard), args.cache_images)
    teacher_file = work / "vit-b-16-random.safetensors"
    if not teacher_file.is_file():
        torch.manual_seed(0)
        teacher = open_clip.create_model("ViT-B-16")  # random weights: only the cost matters here
        save_weights(teacher_file, teacher.state_dict(), "ViT-B-16", open_clip.get_model_config("ViT-B-16"))
    epoch_s: Dict[str, List[float]] = {}
    for label, extra in (("without_cache", []), ("with_cache", ["--teacher-cache", str(work / "teacher_cache")])):
        output = work / f"align_{label}"
        shutil.rmtree(output, ignore_errors=True)
        if label == "with_cache":
            shutil.rmtree(work / "teacher_cache", ignore_errors=True)
        steps = -(-images // args.cache_batch_size)
        command = [sys.executable, "-m", "open_clip_spiking.train", "--stage", "align", "--model", "spikeclip-vit-s",
                   "--teacher", "ViT-B-16", "--teacher-pretrained", str(teacher_file), "--train-data", str(shard),
                   "--classnames", str(source), "--output-dir", str(output), "--epochs", "2",
                   "--batch-size", str(args.cache_batch_size), "--workers", "1", "--compile", "off",
                   # In shard order, so that each epoch reads each image once, as an epoch over a dataset
                   # much larger than the shuffle buffer does. A shuffle buffer that spans this small shard's
                   # restart would repeat some images within an epoch and leave others out.
                   "--shuffle-buffer", "1", "--log-every-n-steps", str(steps), *extra]
        _logger.info("running %s", shlex.join(command))
        subprocess.run(command, check=True, capture_output=True, text=True)
        metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        by_epoch = {m["epoch"]: m for m in metrics if "samples_per_s" in m}
        epoch_s[label] = [images / by_epoch[epoch]["samples_per_s"] for epoch in sorted(by_epoch)]
    teacher_flops = teacher_forward_flops()
    student_flops = train_flops_per_image(build_tower(4, "spiking", "spikeclip_vit_s"), real_images(args.data_root, 2, 32))
    return {
        "teacher": "ViT-B-16 (open_clip config, random weights), 224 px",
        "student": "spikeclip-vit-s",
        "images": images,
        "batch_size": args.cache_batch_size,
        "epoch_s": epoch_s,
        "later_epoch_speedup": epoch_s["without_cache"][-1] / epoch_s["with_cache"][-1],
        "teacher_forward_gflop_per_image": teacher_flops / 1e9,
        "student_train_gflop_per_image": student_flops / 1e9,
        "flop_bound": (teacher_flops + student_flops) / student_flops,
    }


def teacher_forward_flops() -> float:
    """FLOPs of one image through the teacher's image tower."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    teacher = open_clip.create_model("ViT-B-16").eval()  # the count does not depend on the weights
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher.encode_image(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops()


def _find(records, **match) -> Optional[Dict[str, Any]]:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items()) and "train_img_s" in r), None)


def evaluate_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    towers, memory = results["towers"], results["memory"]
    targets = []

    def add(name, value, target, met, note):
        targets.append({"name": name, "value": value, "target": target, "met": bool(met) if value is not None else None,
                        "note": note})

    fp32 = [r for r in towers if r["network"] == "spiking" and r["time_steps"] == 4 and r["precision"] == "fp32"
            and "train_img_s" in r]
    best = max(fp32 + [r for r in towers if r["network"] == "spiking" and r["time_steps"] == 4 and "train_img_s" in r],
               key=lambda r: r["train_img_s"], default=None)
    if best:
        add("training step images/s at T=4 over the reference 4.2", best["train_img_s"] / REFERENCE["train_img_s"],
            f">= {TARGET_TRAIN_SPEEDUP}", best["train_img_s"] / REFERENCE["train_img_s"] >= TARGET_TRAIN_SPEEDUP,
            f"best path: {best['mode']} {best['precision']}; the reference machine's matmul reached 180 GFLOP/s, "
            f"this one's {results['matmul_gflops']:.0f}")
        scaled = best["train_img_s"] * 180.0 / results["matmul_gflops"]
        add("same, scaled to the reference machine's matmul speed", scaled / REFERENCE["train_img_s"],
            f">= {TARGET_TRAIN_SPEEDUP}", scaled / REFERENCE["train_img_s"] >= TARGET_TRAIN_SPEEDUP,
            "images/s x 180 / this machine's matmul GFLOP/s")
    if fp32:
        share = max(r["train_matmul_share"] for r in fp32)
        add("fp32 training GFLOP/s over plain matmul GFLOP/s at T=4", share, f">= {TARGET_MATMUL_SHARE}",
            share >= TARGET_MATMUL_SHARE, f"reference: {REFERENCE['matmul_share']}")
    for mode in ("eager", "compiled"):
        spiking = _find(towers, network="spiking", time_steps=4, mode=mode, precision="fp32")
        twin = _find(towers, network="ann", time_steps=1, mode=mode, precision="fp32")
        if spiking and twin:
            ratio = twin["infer_img_s"] / spiking["infer_img_s"]
            add(f"inference time spiking T=4 over ANN twin ({mode})", ratio,
                f"<= {TARGET_TWIN_RATIO_PER_T} x 4 = {TARGET_TWIN_RATIO_PER_T * 4}", ratio <= TARGET_TWIN_RATIO_PER_T * 4,
                "reference: 7.5 with a FLOP ratio of 4.0")
    for time_steps, limit in ((4, TARGET_RSS_T4_CKPT_GIB), (8, TARGET_RSS_T8_CKPT_GIB)):
        fitted = [m for m in memory if m["time_steps"] == time_steps and m["grad_checkpointing"]
                  and m.get("peak_rss_gib") is not None]
        if fitted:
            record = min(fitted, key=lambda m: m["peak_rss_gib"])
            value = record["peak_rss_gib"]
            add(f"peak training memory at T={time_steps} with checkpointing (GiB)", value, f"<= {limit}",
                value <= limit, f"ru_maxrss of the whole process, allocator {record['allocator']}")
        elif any(m["time_steps"] == time_steps and m["grad_checkpointing"] for m in memory):
            add(f"peak training memory at T={time_steps} with checkpointing (GiB)", None, f"<= {limit}", False,
                "did not fit under --memory-limit-gib with any allocator")
    cache = results.get("teacher_cache")
    if cache:
        add("align epoch after the first: without over with --teacher-cache", cache["later_epoch_speedup"],
            f">= {TARGET_CACHE_SPEEDUP}", cache["later_epoch_speedup"] >= TARGET_CACHE_SPEEDUP,
            f"{cache['images']} images, {cache['teacher']}; FLOP bound {cache['flop_bound']:.2f}x")
    return targets


def _fmt(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(results: Dict[str, Any]) -> str:
    hardware = results["hardware"]
    lines = [
        "# Speed and memory",
        "",
        f"Generated by `{results['command']}` on {results['date']} in {results['wall_s'] / 60:.1f} min.",
        "",
        f"Machine: {hardware['cpu_model']}, {hardware['usable_cores']} usable cores, {hardware['memory_gib']} GiB, "
        f"torch threads {hardware['torch_threads']}, device {hardware['device']}, load average "
        f"{hardware.get('load_average_start')} at the start and {hardware.get('load_average_end')} at the end"
        f"{', GPU ' + hardware['gpu'] if hardware.get('gpu') else ''}. "
        + ", ".join(f"{k} {v}" for k, v in results["software"].items() if v) + ".",
        "",
        f"Plain fp32 `torch.matmul` (2048 x 2048): **{results['matmul_gflops']:.1f} GFLOP/s**.",
        "",
        "## Image tower",
        "",
        f"`{results['settings']['model']}`, batch {results['settings']['batch_size']}, 32 px, median of "
        f"{results['settings']['repeats']} calls after a warm-up call. The ANN twin has the same layers with ReLU "
        "in place of every LIF neuron.",
        "",
        "| network | T | path | precision | inference img/s | training img/s | training GFLOP/img | "
        "training GFLOP/s | share of matmul | compile s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["towers"]:
        if "train_img_s" not in r:
            lines.append(f"| {r['network']} | {r['time_steps']} | {r['mode']} | {r['precision']} | "
                         f"{r.get('error', 'failed').replace('|', '/')} | | | | | |")
            continue
        path = r["mode"] + (" + checkpointing" if r.get("grad_checkpointing") else "")
        lines.append(
            f"| {r['network']} | {r['time_steps']} | {path} | {r['precision']} | {r['infer_img_s']:.2f} | "
            f"{r['train_img_s']:.2f} | {r['train_gflop_per_image']:.2f} | {r['train_gflops']:.1f} | "
            f"{100 * r['train_matmul_share']:.0f}% | {_fmt(r.get('compile_s'), 0) if 'compile_s' in r else ''} |")
    lines += ["", "## Spiking over ANN twin", "",
              "| T | path | inference time ratio | training time ratio | FLOP ratio | ideal (T) |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in results["towers"]:
        if r["network"] != "spiking" or r["precision"] != "fp32" or "train_img_s" not in r:
            continue
        twin = _find(results["towers"], network="ann", time_steps=1, mode=r["mode"], precision="fp32")
        if twin:
            lines.append(f"| {r['time_steps']} | {r['mode']} | {twin['infer_img_s'] / r['infer_img_s']:.2f} | "
                         f"{twin['train_img_s'] / r['train_img_s']:.2f} | "
                         f"{r['train_gflop_per_image'] / twin['train_gflop_per_image']:.2f} | {r['time_steps']} |")
    lines += ["", "## Training memory", "",
              f"Peak resident memory of a fresh process that runs two training steps at batch "
              f"{results['settings']['batch_size']} (eager, fp32), its data segment capped at "
              f"{results['settings']['memory_limit_gib']:g} GiB. Allocator `mmap` is "
              f"`GLIBC_TUNABLES={ALLOCATORS['mmap']}`: every allocation above 128 KiB gets its own mapping, "
              "backed by transparent huge pages, so freed activations return to the system at once.", "",
              "| allocator | T | activation checkpointing | peak RSS GiB | training img/s |", "|---|---:|---|---:|---:|"]
    for m in results["memory"]:
        error = f" ({m['error'].replace('|', '/')})" if m.get("error") else ""
        lines.append(f"| {m['allocator']} | {m['time_steps']} | {'yes' if m['grad_checkpointing'] else 'no'} | "
                     f"{_fmt(m.get('peak_rss_gib'))} | {_fmt(m.get('train_img_s'))}{error} |")
    cache = results.get("teacher_cache")
    if cache:
        lines += ["", "## Teacher cache", "",
                  f"Align stage, student `{cache['student']}`, teacher {cache['teacher']}, {cache['images']} Imagenette "
                  f"training images with class prompts, batch {cache['batch_size']}, two epochs, eager.", "",
                  "| run | epoch 1 s | epoch 2 s |", "|---|---:|---:|"]
        for label, times in cache["epoch_s"].items():
            lines.append(f"| {label.replace('_', ' ')} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
        lines.append("")
        lines.append(f"Epoch 2 without the cache over epoch 2 with it: **{cache['later_epoch_speedup']:.2f}x**. "
                     f"The cache can at most remove the teacher's image tower: a training step of the student's "
                     f"image tower costs {cache['student_train_gflop_per_image']:.1f} GFLOP per image and the "
                     f"teacher's forward pass {cache['teacher_forward_gflop_per_image']:.1f}, which bounds the "
                     f"speedup at {cache['flop_bound']:.2f}x, before data loading and the text towers.")
    lines += ["", "## Targets", "", "| target | measured | goal | met | note |", "|---|---:|---|---|---|"]
    for t in results["targets"]:
        if t["met"] is None:
            met = "n/a"
        else:
            met = "yes" if t["met"] else "**no**"
        lines.append(f"| {t['name']} | {_fmt(t['value'])} | {t['target']} | {met} | {t['note']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "SPEED.md",
                        help="Markdown page; speed.json goes beside it")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get(DATA_ENV_VAR, DEFAULT_DATA_ROOT)),
                        help="folder that contains cifar10_jpeg and imagenette")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "speed",
                        help="scratch folder for the align runs")
    parser.add_argument("--model", default="spikeclip_vit_s", help="timm name of the spiking tower")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--time-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up call")
    parser.add_argument("--cache-images", type=int, default=256, help="images of the teacher-cache align runs")
    parser.add_argument("--cache-batch-size", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["towers", "memory", "cache"],
                        help="parts to leave out")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0,
                        help="cap on each memory probe's data segment; a configuration above it is reported as not fitting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("T", "CHECKPOINTING"), help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe[0], bool(args.memory_probe[1]), args.batch_size, args.model, args.data_root,
                     args.memory_limit_gib)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.perf_counter()
    device = torch.device(args.device)
    # A fresh inductor cache, so that "compile s" is the cost of a first compilation on this machine.
    inductor_cache = args.work_dir / "inductor-cache"
    shutil.rmtree(inductor_cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
    results: Dict[str, Any] = {
        "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": now(),
        "hardware": collect_hardware(str(device)),
        "software": collect_software(),
        "settings": {"model": args.model, "batch_size": args.batch_size, "time_steps": args.time_steps,
                     "repeats": args.repeats, "memory_limit_gib": args.memory_limit_gib},
        "matmul_gflops": matmul_gflops(device, args.repeats + 1),
        "towers": [],
        "memory": [],
    }
    _logger.info("plain matmul: %.1f GFLOP/s", results["matmul_gflops"])

    # Memory first: a time step count whose training step does not fit without checkpointing is timed
    # with checkpointing in the tower part, instead of exhausting this process's memory.
    if "memory" not in args.skip and device.type == "cpu":
        results["memory"] = measure_memory(args)
    needs_checkpointing = {m["time_steps"] for m in results["memory"] if m["allocator"] == "glibc default"
                           and not m["grad_checkpointing"] and m.get("peak_rss_gib") is None}
    if "towers" not in args.skip:
        images = real_images(args.data_root, args.batch_size, 32).to(device)
        configs = [("spiking", t, mode, "fp32") for mode in args.modes for t in args.time_steps]
        configs += [("ann", 1, mode, "fp32") for mode in args.modes]
        if 4 in args.time_steps and bf16_is_native(device):
            configs += [("spiking", 4, mode, "bf16") for mode in args.modes]
        else:
            _logger.info("bf16 left out: %s has no native bf16 arithmetic", device)
        for network, time_steps, mode, precision in configs:
            checkpointing = network == "spiking" and time_steps in needs_checkpointing
            results["towers"].append(measure_tower(args, images, device, network, time_steps, mode, precision,
                                                   results["matmul_gflops"], checkpointing))
    if "cache" not in args.skip:
        results["teacher_cache"] = measure_teacher_cache(args)

    results["targets"] = evaluate_targets(results)
    results["hardware"]["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results), encoding="utf-8")
    (args.output.parent / "speed.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
