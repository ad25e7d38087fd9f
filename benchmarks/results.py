#!/usr/bin/env python
"""Regenerate ``benchmarks/RESULTS.md``: zero-shot accuracy, energy per image and size of a spiking
student and its ANN teacher on CIFAR-10 (JPEG) and Imagenette.

    python benchmarks/results.py --output benchmarks/RESULTS.md

Each step runs the ``main`` function of one of the package's command lines in this process, with the
argument list that the page then records as that step's command:

1. ``python -m open_clip_spiking.offline_teacher`` builds the teacher ``lit-effnetlite0-minilm``
   unless ``--teacher-pretrained`` names an existing file. A build in ``--work-dir`` is reused by later
   runs.
2. ``python -m open_clip_spiking.train --stage align`` trains a short student run unless
   ``--student-pretrained`` is given. A run in ``--work-dir`` with the same arguments and teacher is
   reused.
3. Per dataset, ``python -m open_clip_spiking.eval`` scores teacher and student on the first
   ``--num-images`` test images, and ``python -m open_clip_spiking.energy`` profiles both on the first
   ``--energy-images``.

The page goes to ``--output``. ``results/results.json`` (the same figures), the energy figures and the
per-layer energy tables go to the ``results`` folder next to it. Hugging Face downloads are switched
off (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``), so every model must come from local files.
"""
import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from open_clip_spiking.provenance import (
    collect_hardware,
    collect_software,
    format_duration,
    load_average,
    now,
    run_text,
    sha256,
)

_logger = logging.getLogger("benchmarks.results")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV_VAR = "OPEN_CLIP_SPIKING_DATA"
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data" / "wds"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "results"

OFFLINE_TEACHER = "lit-effnetlite0-minilm"
DATASET_TITLES = {"cifar10_jpeg": "CIFAR-10 (JPEG)", "imagenette": "Imagenette"}
# The student's align run reads the Imagenette training split with its class prompts, as `make align` does.
ALIGN_SET = "imagenette"
# The offline teacher's build reads these folders under --data-root (its --caption-set and --label-set defaults).
TEACHER_BUILD_SETS = ("flickr8k_1k/test", "imagenette/train")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
CACHE_RECORD = "results-step.json"
# Arguments of the training run that a checkpoint's metadata records, shown on the page.
TRAINING_KEYS = ("stage", "train_data", "train_num_samples", "epochs", "max_steps", "batch_size", "teacher",
                 "pretrained", "caption_set", "label_set", "label_split", "caption_images", "label_images")
SOFTWARE = ("torch", "torchvision", "open_clip_torch", "timm", "spikingjelly", "webdataset", "transformers",
            "open_clip_spiking")


class StepFailed(RuntimeError):
    """A step's command line returned a non-zero exit code."""


@dataclass
class Step:
    """One command behind the page: what ran, whether it ran now, and its wall time in seconds."""

    name: str
    command: str
    status: str  # "ran", "reused" (from an earlier run, with that run's wall time) or "given"
    wall_s: Optional[float]
    date: Optional[str] = None


# --- command line ----------------------------------------------------------------------------------

def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/results.py",
        description="Regenerate the results page: zero-shot top-1/top-5, energy per image and parameters of a "
                    "spiking student and its ANN teacher on real test images, with the command and hardware "
                    "behind every number.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="Markdown page to write. results/results.json and the figures go to a 'results' "
                             "folder next to it")
    parser.add_argument("--data-root", type=Path, default=Path(os.environ.get(DATA_ENV_VAR, DEFAULT_DATA_ROOT)),
                        help=f"folder that contains the WebDataset datasets (clip_benchmark layout); "
                             f"${DATA_ENV_VAR} overrides the default")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="folder for the built teacher, the student run, and the eval and energy outputs")
    parser.add_argument("--datasets", nargs="+", default=list(DATASET_TITLES), metavar="NAME",
                        help="dataset folders under --data-root to score, each with test shards, classnames.txt "
                             "and zeroshot_classification_templates.txt")

    models = parser.add_argument_group("models")
    models.add_argument("--teacher", default=OFFLINE_TEACHER, metavar="NAME",
                        help="open_clip model config of the ANN teacher")
    models.add_argument("--teacher-pretrained", type=Path, default=None, metavar="PATH",
                        help=f"teacher checkpoint. When omitted, or when the file is missing and --teacher is "
                             f"{OFFLINE_TEACHER}, the script builds it (into --work-dir when omitted)")
    models.add_argument("--student", default="spikeclip-vit-s", metavar="NAME",
                        help="open_clip model config of the spiking student")
    models.add_argument("--student-pretrained", type=Path, default=None, metavar="PATH",
                        help="student checkpoint. When omitted, the script trains a short align run against the "
                             "teacher, and the page marks the student as a short run")
    models.add_argument("--align-samples", type=_positive_int, default=128,
                        help=f"training images of that short align run, one epoch over {ALIGN_SET}/train")
    models.add_argument("--align-batch-size", type=_positive_int, default=32, help="batch size of the align run")
    models.add_argument("--workers", type=_non_negative_int, default=1,
                        help="data-loader worker processes of the align run. Eval uses at most one, so that it "
                             "reads the first test images in shard order")
    models.add_argument("--rebuild", action="store_true",
                        help="build the teacher and train the student again even when --work-dir contains them "
                             "from an earlier run")

    measure = parser.add_argument_group("measurements")
    measure.add_argument("--num-images", type=_positive_int, default=300,
                         help="test images per dataset for top-1/top-5, the first ones in shard order")
    measure.add_argument("--energy-images", type=_positive_int, default=256,
                         help="test images per dataset for the energy profile, the first ones in shard order")
    measure.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch in eval and energy")
    measure.add_argument("--device", default="cpu", help="torch device of every step")
    return parser


# --- environment and provenance ----------------------------------------------------------------------

def _configure_logging() -> None:
    # The package's entry points reconfigure the root logger, so every step is followed by this call.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _git_commit() -> Optional[str]:
    commit = run_text(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if not commit:
        return None
    changes = run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT)
    return commit.strip() + (" with uncommitted changes" if changes else "")


# --- data checks -----------------------------------------------------------------------------------

def check_data(data_root: Path, datasets: Sequence[str], need_align: bool, need_teacher_build: bool) -> None:
    """Raise FileNotFoundError naming the first missing dataset folder or file under ``data_root``."""
    if not data_root.is_dir():
        raise FileNotFoundError(
            f"data root {data_root} not found; pass --data-root with the folder that contains "
            f"{', '.join(datasets)} (WebDataset shards in the clip_benchmark layout), or set ${DATA_ENV_VAR}"
        )
    required = [data_root / name / part for name in datasets for part in ("test", CLASSNAMES_FILE, TEMPLATES_FILE)]
    if need_align:
        required += [data_root / ALIGN_SET / part for part in ("train", CLASSNAMES_FILE, TEMPLATES_FILE)]
    if need_teacher_build:
        required += [data_root / folder for folder in TEACHER_BUILD_SETS]
    for path in required:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: --data-root {data_root} must contain every dataset that the run reads "
                f"({', '.join(sorted({str(p.relative_to(data_root)) for p in required}))})"
            )


def class_counts(urls: Sequence[str], count: int) -> List[int]:
    """Count the labels (``cls`` field) of the first ``count`` samples in shard order, one entry per label."""
    labels: List[int] = []
    for url in urls:
        with tarfile.open(url) as shard:
            for member in shard:
                if member.name.endswith(".cls"):
                    labels.append(int(shard.extractfile(member).read().decode("utf-8").strip()))
                    if len(labels) == count:
                        break
        if len(labels) == count:
            break
    counts = [0] * (max(labels) + 1 if labels else 0)
    for label in labels:
        counts[label] += 1
    return counts


# --- steps -----------------------------------------------------------------------------------------

def _module_main(module: str) -> Callable[[List[str]], int]:
    if module == "open_clip_spiking.offline_teacher":
        from open_clip_spiking.offline_teacher import main
    elif module == "open_clip_spiking.train":
        from open_clip_spiking.train.__main__ import main
    elif module == "open_clip_spiking.eval":
        from open_clip_spiking.eval import main
    elif module == "open_clip_spiking.energy":
        from open_clip_spiking.energy.__main__ import main
    else:
        raise ValueError(f"no entry point for module {module!r}")
    return main


def run_step(steps: List[Step], name: str, module: str, argv: List[str]) -> Step:
    """Run ``python -m module argv`` through its main function in this process and record it in ``steps``."""
    command = shlex.join(["python", "-m", module, *argv])
    _logger.info("step %d, %s: %s", len(steps) + 1, name, command)
    started = time.monotonic()
    code = _module_main(module)(argv)
    wall_s = round(time.monotonic() - started, 1)
    _configure_logging()
    if code != 0:
        raise StepFailed(f"step {name!r} failed with exit code {code} (its error is logged above): {command}")
    _logger.info("step %s finished in %.1f s", name, wall_s)
    step = Step(name=name, command=command, status="ran", wall_s=wall_s, date=now())
    steps.append(step)
    return step


def _read_cache_record(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_cache_record(path: Path, key: Dict[str, Any], step: Step) -> None:
    path.write_text(json.dumps({"key": key, "step": asdict(step)}, indent=2) + "\n", encoding="utf-8")


def _reuse(steps: List[Step], record: Dict[str, Any], artifact: Path) -> None:
    step = Step(**record["step"])
    step.status = "reused"
    steps.append(step)
    _logger.info("reusing %s from an earlier run of: %s", artifact, step.command)


def prepare_teacher(args: argparse.Namespace, steps: List[Step]) -> Dict[str, Any]:
    """Return the teacher's checkpoint path and origin, building the offline teacher when needed."""
    given_path = args.teacher_pretrained
    if given_path is not None and given_path.is_file():
        steps.append(Step(name="teacher checkpoint", command=f"--teacher-pretrained {shlex.quote(str(given_path))}",
                          status="given", wall_s=None))
        return {"checkpoint": given_path, "source": "given"}
    if args.teacher != OFFLINE_TEACHER:
        detail = f"{given_path} not found" if given_path is not None else "no --teacher-pretrained given"
        raise FileNotFoundError(
            f"--teacher {args.teacher}: {detail}. Pass --teacher-pretrained with its checkpoint; only "
            f"{OFFLINE_TEACHER} can be built by this script"
        )

    path = given_path if given_path is not None else args.work_dir / "teacher" / f"{OFFLINE_TEACHER}.safetensors"
    record_path = path.with_name(f"{path.name}.{CACHE_RECORD}")
    argv = ["--output", str(path), "--data-root", str(args.data_root)]
    record = _read_cache_record(record_path)
    if given_path is None and not args.rebuild and path.is_file() and record and record.get("key") == {"argv": argv}:
        _reuse(steps, record, path)
        return {"checkpoint": path, "source": "reused"}

    path.parent.mkdir(parents=True, exist_ok=True)
    step = run_step(steps, "build the offline teacher", "open_clip_spiking.offline_teacher", argv)
    _write_cache_record(record_path, {"argv": argv}, step)
    return {"checkpoint": path, "source": "built"}


def prepare_student(args: argparse.Namespace, teacher: Dict[str, Any], steps: List[Step]) -> Dict[str, Any]:
    """Return the student's checkpoint path and origin, training a short align run when none is given."""
    if args.student_pretrained is not None:
        if not args.student_pretrained.is_file():
            raise FileNotFoundError(
                f"--student-pretrained {args.student_pretrained} not found; pass a .safetensors or .pt checkpoint "
                f"of {args.student!r}, or omit the flag to train a short align run"
            )
        steps.append(Step(name="student checkpoint",
                          command=f"--student-pretrained {shlex.quote(str(args.student_pretrained))}",
                          status="given", wall_s=None))
        return {"checkpoint": args.student_pretrained, "source": "given", "short_run": None}

    run_dir = args.work_dir / f"align-{args.student}"
    align_set = args.data_root / ALIGN_SET
    argv = [
        "--stage", "align", "--model", args.student,
        "--teacher", args.teacher, "--teacher-pretrained", str(teacher["checkpoint"]),
        "--train-data", str(align_set / "train"), "--classnames", str(align_set),
        "--output-dir", str(run_dir), "--epochs", "1", "--train-num-samples", str(args.align_samples),
        "--batch-size", str(args.align_batch_size), "--workers", str(args.workers),
        "--log-every-n-steps", "4", "--device", args.device,
    ]
    short_run = {
        "train_data": str(align_set / "train"),
        "samples": args.align_samples,
        "batch_size": args.align_batch_size,
        "steps": math.ceil(args.align_samples / args.align_batch_size),
    }
    checkpoint = run_dir / "latest.safetensors"
    key = {"argv": argv, "teacher_sha256": teacher["sha256"]}
    record = _read_cache_record(run_dir / CACHE_RECORD)
    if not args.rebuild and checkpoint.is_file() and record and record.get("key") == key:
        _reuse(steps, record, checkpoint)
        return {"checkpoint": checkpoint, "source": "reused", "short_run": short_run}

    # The folder belongs to this script. The trainer would append to an older run's metrics.jsonl otherwise.
    if run_dir.exists():
        shutil.rmtree(run_dir)
    step = run_step(steps, "train a short align run of the student", "open_clip_spiking.train", argv)
    if not checkpoint.is_file():
        raise StepFailed(f"the align run finished without writing {checkpoint}; see its log in {run_dir}")
    _write_cache_record(run_dir / CACHE_RECORD, key, step)
    return {"checkpoint": checkpoint, "source": "trained", "short_run": short_run}


def evaluate_model(args: argparse.Namespace, steps: List[Step], dataset: str, role: str, model: str,
                   checkpoint: Path) -> Dict[str, Any]:
    """Score one model on the first ``--num-images`` test images of ``dataset`` with the eval command."""
    folder = args.data_root / dataset
    output = args.work_dir / "eval" / f"{dataset}-{role}.json"
    argv = [
        "--model", model, "--pretrained", str(checkpoint), "--data", str(folder / "test"),
        "--classnames", str(folder), "--max-samples", str(args.num_images), "--batch-size", str(args.batch_size),
        "--workers", str(min(args.workers, 1)), "--device", args.device, "--output", str(output),
    ]
    step = run_step(steps, f"{role} zero-shot accuracy on {dataset}", "open_clip_spiking.eval", argv)
    report = json.loads(output.read_text(encoding="utf-8"))
    original = report["label_sets"]["original"]
    return {
        "top1": original["top1"],
        "top5": original["top5"],
        "num_classes": original["num_classes"],
        "num_images": report["samples"],
        "bad_samples": report["bad_samples"],
        "templates": report["templates"],
        "step": len(steps),
        "wall_s": step.wall_s,
    }


def profile_energy(args: argparse.Namespace, steps: List[Step], dataset: str, teacher: Dict[str, Any],
                   student: Dict[str, Any]) -> Dict[str, Any]:
    """Profile student and teacher on the first ``--energy-images`` test images of ``dataset``."""
    output = args.work_dir / "energy" / dataset
    argv = [
        "--model", args.student, "--pretrained", str(student["checkpoint"]),
        "--teacher", args.teacher, "--teacher-pretrained", str(teacher["checkpoint"]),
        "--data", str(args.data_root / dataset / "test"), "--output", str(output),
        "--num-images", str(args.energy_images), "--batch-size", str(args.batch_size), "--device", args.device,
    ]
    run_step(steps, f"energy profile on {dataset}", "open_clip_spiking.energy", argv)
    report = json.loads((output / "energy.json").read_text(encoding="utf-8"))

    def tower(section: Dict[str, Any]) -> Dict[str, Any]:
        summary = {key: section[key] for key in ("model", "time_steps", "acs", "macs", "dense_macs", "energy_mj")}
        if "mean_firing_rate" in section:
            summary["mean_firing_rate"] = section["mean_firing_rate"]
        return summary

    return {
        "num_images": report["num_images"],
        "student": tower(report["student"]),
        "teacher": tower(report["teacher"]),
        "ratio": report["ratio"],
        "mac_pj": report["settings"]["mac_pj"],
        "ac_pj": report["settings"]["ac_pj"],
        "technology": report["settings"]["technology"],
        "step": len(steps),
        "source_dir": str(output),
    }


def model_summary(name: str, checkpoint: Path) -> Dict[str, Any]:
    """Count the parameters of a model (image tower and whole model), read its input size and the training
    arguments that its checkpoint records."""
    import open_clip

    from open_clip_spiking.train.checkpoint import read_checkpoint_metadata

    model = open_clip.create_model(name, pretrained=str(checkpoint))
    image_size = open_clip.get_model_config(name)["vision_cfg"].get("image_size")
    metadata = read_checkpoint_metadata(checkpoint)
    training = None
    if metadata is not None:
        training = {key: metadata["args"][key] for key in TRAINING_KEYS if metadata["args"].get(key) is not None}
    return {
        "image_tower_parameters": sum(parameter.numel() for parameter in model.visual.parameters()),
        "total_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "image_size": image_size,
        "training": training,
    }


# --- outputs ---------------------------------------------------------------------------------------

def copy_energy_outputs(energy: Dict[str, Any], dataset: str, results_dir: Path, page_dir: Path) -> None:
    """Copy a dataset's energy figure and per-layer page next to the results page under stable names."""
    source = Path(energy["source_dir"])
    figure = results_dir / f"energy_{dataset}.png"
    details = results_dir / f"energy_{dataset}.md"
    shutil.copyfile(source / "energy.png", figure)
    shutil.copyfile(source / "energy.md", details)
    energy["figure"] = os.path.relpath(figure, page_dir)
    energy["details"] = os.path.relpath(details, page_dir)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _standard_error(value: float, count: int) -> str:
    return f"±{100 * math.sqrt(value * (1 - value) / count):.1f}"


def _count(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3e}" if value >= 1e4 else f"{value:,.0f}"


def _short_run_note(results: Dict[str, Any]) -> List[str]:
    student = results["student"]
    short_run = student.get("short_run")
    if student["source"] == "given" or not short_run:
        return []
    return [
        f"> **Short student run.** The student checkpoint comes from a short align run made by this script "
        f"({'reused from an earlier run, ' if student['source'] == 'reused' else ''}step "
        f"{student['step']}): one epoch of {short_run['samples']:,} {DATASET_TITLES.get(ALIGN_SET, ALIGN_SET)} "
        f"training images, batch {short_run['batch_size']}, {short_run['steps']} optimiser "
        f"step{'s' if short_run['steps'] != 1 else ''}. SpikeCLIP trains for 50 epochs on ImageNet, so the "
        f"student's accuracy here shows that the pipeline runs, not what the method reaches. Training also "
        f"changes the student's firing rates, and with them its energy. Pass `--student-pretrained` with a "
        f"trained checkpoint for meaningful student numbers.",
        "",
    ]


def _setup_lines(results: Dict[str, Any]) -> List[str]:
    hardware = results["hardware"]
    software = results["software"]
    gpu = hardware["gpu"] or "none"
    threads = f"Threads: torch {hardware['torch_threads']}"
    if hardware["omp_num_threads"]:
        threads += f", `OMP_NUM_THREADS={hardware['omp_num_threads']}`"
    memory = f", {hardware['memory_gib']} GiB RAM" if hardware["memory_gib"] else ""
    versions = ", ".join(f"{name} {version}" for name, version in software.items() if version)
    return [
        "## Hardware and software",
        "",
        f"- CPU: `lscpu` model name `{hardware['cpu_model']}`, {hardware['logical_cores']} logical cores "
        f"({hardware['usable_cores']} usable by the process){memory}. {threads}. GPU: {gpu}. Device of every "
        f"step: `{hardware['device']}`.",
        f"- Load average (1, 5, 15 min) at the start: {hardware['load_average_start']}, at the end: "
        f"{hardware['load_average_end']}. Other processes on the machine change the wall times, not the "
        f"accuracies or energy figures.",
        f"- Software: {versions}.",
        f"- Commit: `{results['git_commit']}`. Date (UTC): {results['date']}. Total wall time: "
        f"{format_duration(results['wall_s'])}.",
        f"- Data: `{results['settings']['data_root']}`.",
        "",
    ]


def _model_lines(results: Dict[str, Any]) -> List[str]:
    lines = [
        "## Models",
        "",
        "| role | model | checkpoint | input size | image tower parameters | total parameters | time steps T |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for role in ("teacher", "student"):
        model = results[role]
        size = f"{model['image_size']}x{model['image_size']}" if model["image_size"] else "-"
        lines.append(
            f"| {role} | `{model['model']}` | `{model['checkpoint']}` ({model['source']}, step {model['step']}) | "
            f"{size} | {model['image_tower_parameters']:,} | {model['total_parameters']:,} | "
            f"{model['time_steps'] or '-'} |"
        )
    lines += ["", "Training run recorded in each checkpoint's metadata:", ""]
    for role in ("teacher", "student"):
        training = results[role]["training"]
        recorded = ", ".join(f"{key} `{value}`" for key, value in training.items()) if training else "none recorded"
        lines.append(f"- {role}: {recorded}.")
    lines += ["", "SHA-256 of the checkpoints: " + ", ".join(
        f"{role} `{results[role]['sha256']}`" for role in ("teacher", "student")) + ".", ""]
    return lines


def _accuracy_lines(results: Dict[str, Any]) -> List[str]:
    settings = results["settings"]
    lines = [
        "## Zero-shot accuracy",
        "",
        f"The first {settings['num_images']:,} test images of each dataset in shard order, the same images for "
        f"both models. Each class's classifier is the mean of its prompt embeddings over the dataset's "
        f"`{TEMPLATES_FILE}`, as clip_benchmark builds it. The ± column is one binomial standard error of "
        f"top-1, sqrt(p(1-p)/n).",
        "",
        "| dataset | images | images per class | model | top-1 | ± | top-5 | step |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for dataset, entry in results["datasets"].items():
        counts = entry["class_counts"]
        per_class = f"{min(counts)}-{max(counts)} ({len(counts)} classes)" if counts else "-"
        for role in ("teacher", "student"):
            scores = entry["accuracy"][role]
            lines.append(
                f"| {entry['title']} | {scores['num_images']:,} | {per_class} | {role} `{results[role]['model']}` | "
                f"{_percent(scores['top1'])} | {_standard_error(scores['top1'], scores['num_images'])} | "
                f"{_percent(scores['top5'])} | {scores['step']} |"
            )
    return lines + [""]


def _energy_lines(results: Dict[str, Any]) -> List[str]:
    settings = results["settings"]
    lines = [
        "## Energy per image",
        "",
        f"The first {settings['energy_images']:,} test images of each dataset, both models on the same images, "
        f"image towers only. ACs are accumulates, MACs multiply-accumulates, both per image.",
        "",
        "| dataset | images | model | T | mean firing rate | ACs | MACs | energy (mJ) | student / teacher | step |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["datasets"].values():
        energy = entry["energy"]
        for role in ("teacher", "student"):
            tower = energy[role]
            rate = f"{tower['mean_firing_rate']:.4f}" if "mean_firing_rate" in tower else "-"
            ratio = f"{energy['ratio']:.4g}" if role == "student" and energy["ratio"] is not None else ""
            lines.append(
                f"| {entry['title']} | {energy['num_images']:,} | {role} `{tower['model']}` | "
                f"{tower['time_steps'] or '-'} | {rate} | {_count(tower['acs'])} | {_count(tower['macs'])} | "
                f"{tower['energy_mj']:.4g} | {ratio} | {energy['step']} |"
            )
    lines.append("")
    for entry in results["datasets"].values():
        energy = entry["energy"]
        lines += [
            f"{entry['title']}: per-layer firing rates and energy, student next to teacher "
            f"(per-layer tables and the full counting conventions: [{energy['details']}]({energy['details']})).",
            "",
            f"![Energy per layer on {entry['title']}]({energy['figure']})",
            "",
        ]
    return lines


def _energy_model_lines(results: Dict[str, Any]) -> List[str]:
    energy = next(iter(results["datasets"].values()))["energy"]
    details = energy["details"]
    return [
        "## Energy model",
        "",
        f"The profiler (`python -m open_clip_spiking.energy`) counts the arithmetic operations of each image "
        f"tower on real images and prices each operation at a fixed cost: {energy['mac_pj']} pJ per "
        f"multiply-accumulate (MAC) and {energy['ac_pj']} pJ per accumulate (AC). These are 45 nm CMOS estimates "
        f"for 32-bit floating point ({energy['technology']}), the figures that SNN papers commonly use to compare "
        f"an SNN with an ANN.",
        "",
        f"- Energy per image = ACs x {energy['ac_pj']} pJ + MACs x {energy['mac_pj']} pJ.",
        "- A student layer fed by spikes does accumulates only: ACs = T x firing rate x FLOPs, where FLOPs are "
        "the layer's MACs for one time step and the rate is that of its spike input. The profiler counts the "
        "products with non-zero spikes exactly, layer by layer, which equals this product for a linear layer.",
        "- The student's first convolution reads the analog image, so it counts MACs, once per image. The "
        "projection into the embedding space, fed by real values, counts MACs too.",
        "- Every convolution, linear layer and attention product of the ANN teacher counts MACs.",
        "- Memory access, data movement, neuron membrane updates and elementwise operations are not counted.",
        "",
        f"The counting conventions in full close each per-layer page, e.g. [{details}]({details}).",
        "",
    ]


def _caveat_lines(results: Dict[str, Any]) -> List[str]:
    teacher, student = results["teacher"], results["student"]
    lines = ["## Caveats", ""]
    if "cifar10_jpeg" in results["datasets"]:
        lines.append("- CIFAR-10 here is `cifar10_jpeg`, a copy of the test set re-encoded as JPEG. JPEG is lossy, "
                     "so accuracies can differ from those on the original CIFAR-10 images.")
    if "imagenette" in results["datasets"]:
        imagenette = ("- Imagenette is a 10-class subset of ImageNet, so its images may overlap the ImageNet-1k "
                      "training set of an image tower pretrained on ImageNet")
        if teacher["model"] == OFFLINE_TEACHER:
            imagenette += (", such as EfficientNet-Lite0 in the offline teacher. The offline teacher's projections "
                           "were also trained on Imagenette training images with prompts of the same 10 classes "
                           "and templates, so its Imagenette accuracy is not zero-shot in the strict sense")
        if student.get("short_run"):
            imagenette += ". The short student run reads the same Imagenette training images"
        lines.append(imagenette + ".")
    lines += [
        "- A model's accuracy on a dataset is zero-shot only if none of the dataset's images or class prompts "
        "entered its training. The training data that each checkpoint records is listed under Models.",
        f"- The student reads {student['image_size']}x{student['image_size']} images and the teacher "
        f"{teacher['image_size']}x{teacher['image_size']}, each through its own preprocessing. The energy ratio "
        f"compares the two models at their own input sizes.",
        "- The energy figures are estimates from operation counts, not measurements. They assume hardware that "
        "skips the work of zero spikes. On this CPU the student computes dense products, so its wall time says "
        "nothing about its energy.",
        "- Accuracy comes from the first test images only. See the ± column for its sampling error.",
        "",
    ]
    return lines


def _step_lines(results: Dict[str, Any]) -> List[str]:
    lines = [
        "## Steps",
        "",
        "Each step ran the `main` function of the command shown, inside the process of `benchmarks/results.py`. "
        "A reused step is an earlier run's, with that run's date and wall time.",
        "",
        "| step | what | status | date (UTC) | wall time | command |",
        "|---:|---|---|---|---:|---|",
    ]
    for number, step in enumerate(results["steps"], start=1):
        command = step["command"].replace("|", "\\|")
        lines.append(f"| {number} | {step['name']} | {step['status']} | {step['date'] or '-'} | "
                     f"{format_duration(step['wall_s'])} | `{command}` |")
    return lines + [""]


def render_page(results: Dict[str, Any]) -> str:
    """Render the results page from the same dictionary that results.json stores."""
    titles = ", ".join(entry["title"] for entry in results["datasets"].values())
    lines = [
        f"# Results: spiking student vs ANN teacher on {titles}",
        "",
        "Generated by `benchmarks/results.py`, so do not edit it by hand. The command below regenerates this page, "
        f"[{results['json']}]({results['json']}) and the figures. Every number below comes from one of the steps "
        "listed at the end, on the hardware described next.",
        "",
        f"Command, run from `{results['working_directory']}`:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
    ]
    lines += _short_run_note(results)
    lines += _setup_lines(results)
    lines += _model_lines(results)
    lines += _accuracy_lines(results)
    lines += _energy_lines(results)
    lines += _energy_model_lines(results)
    lines += _caveat_lines(results)
    lines += _step_lines(results)
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    # Through a temporary file, so a reader never sees half a page.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- main ------------------------------------------------------------------------------------------

def _command_line(argv: Sequence[str]) -> str:
    script = os.path.relpath(Path(__file__).resolve(), Path.cwd())
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return prefix + shlex.join(["python", script, *argv])


def generate(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    """Run every step, write the page, results.json and the figures, and return the results."""
    started = time.monotonic()
    datasets = list(dict.fromkeys(args.datasets))
    need_teacher_build = args.teacher_pretrained is None or not args.teacher_pretrained.is_file()
    check_data(args.data_root, datasets, need_align=args.student_pretrained is None,
               need_teacher_build=need_teacher_build and args.teacher == OFFLINE_TEACHER)

    results: Dict[str, Any] = {
        "command": command,
        "working_directory": str(Path.cwd()),
        "date": now(),
        "git_commit": _git_commit(),
        "hardware": collect_hardware(args.device),
        "software": collect_software(SOFTWARE),
        "settings": {
            "data_root": str(args.data_root),
            "work_dir": str(args.work_dir),
            "datasets": datasets,
            "num_images": args.num_images,
            "energy_images": args.energy_images,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": args.device,
            "align_samples": args.align_samples,
            "align_batch_size": args.align_batch_size,
        },
    }
    steps: List[Step] = []
    args.work_dir.mkdir(parents=True, exist_ok=True)

    teacher = prepare_teacher(args, steps)
    teacher.update(model=args.teacher, sha256=sha256(teacher["checkpoint"]), step=len(steps))
    student = prepare_student(args, teacher, steps)
    student.update(model=args.student, sha256=sha256(student["checkpoint"]), step=len(steps))

    from open_clip_spiking.train.data import expand_urls

    results["datasets"] = {}
    for dataset in datasets:
        test_urls = expand_urls(str(args.data_root / dataset / "test"))
        accuracy = {
            role: evaluate_model(args, steps, dataset, role, model["model"], model["checkpoint"])
            for role, model in (("teacher", teacher), ("student", student))
        }
        if accuracy["teacher"]["num_images"] != accuracy["student"]["num_images"]:
            raise ValueError(
                f"teacher and student were scored on different numbers of {dataset} images "
                f"({accuracy['teacher']['num_images']} and {accuracy['student']['num_images']}); check the eval logs "
                f"for skipped samples"
            )
        results["datasets"][dataset] = {
            "title": DATASET_TITLES.get(dataset, dataset),
            "test_data": str(args.data_root / dataset / "test"),
            "class_counts": class_counts(test_urls, accuracy["teacher"]["num_images"]),
            "accuracy": accuracy,
            "energy": profile_energy(args, steps, dataset, teacher, student),
        }

    first_energy = next(iter(results["datasets"].values()))["energy"]
    for role, model in (("teacher", teacher), ("student", student)):
        model.update(model_summary(model["model"], model["checkpoint"]))
        model["time_steps"] = first_energy[role]["time_steps"]
        model["checkpoint"] = str(model["checkpoint"])
        results[role] = model

    output = args.output.resolve()
    results_dir = output.parent / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for dataset, entry in results["datasets"].items():
        copy_energy_outputs(entry["energy"], dataset, results_dir, output.parent)
    json_path = results_dir / "results.json"
    results["json"] = os.path.relpath(json_path, output.parent)
    results["steps"] = [asdict(step) for step in steps]
    results["hardware"]["load_average_end"] = load_average()
    results["wall_s"] = round(time.monotonic() - started, 1)

    _write_text(json_path, json.dumps(results, indent=2) + "\n")
    _write_text(output, render_page(results) + "\n")
    _logger.info("wrote %s and %s after %s", output, json_path, format_duration(results["wall_s"]))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Regenerate the results page from the command line and return a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _configure_logging()
    # Every model comes from local files. Without these, transformers may contact the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from open_clip_spiking import register

    register()
    try:
        generate(args, _command_line(argv))
    except (FileNotFoundError, ValueError, StepFailed) as error:
        _logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
