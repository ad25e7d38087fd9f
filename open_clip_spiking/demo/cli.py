"""Command line of the demo: the parser, logging set-up and the run that ``__main__`` starts."""
import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

from .._cli import HelpFormatter, non_negative_float, non_negative_int, positive_float, positive_int
from ..provenance import collect_hardware, collect_software, format_duration, load_average, now
from . import fashion_mnist, pipeline, report

_logger = logging.getLogger("open_clip_spiking.demo")

DEFAULT_STUDENT = "spikeclip-vit-t-28"
DEFAULT_OUTPUT_DIR = Path("runs") / "demo"
CACHE_ENV_VAR = "OPEN_CLIP_SPIKING_CACHE"
LOG_FILE = "demo.log"
# Stages announced on the terminal: data, teacher, align, align-text, finetune, three clip_benchmark runs, energy.
NUM_STAGES = 9


def default_cache_dir() -> Path:
    """``$OPEN_CLIP_SPIKING_CACHE``, else ``open_clip_spiking`` in ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "open_clip_spiking"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.demo",
        description="Distil a spiking CLIP student from an ANN CLIP teacher on Fashion-MNIST, score both with "
                    "clip_benchmark and estimate their energy per image: align -> align-text -> finetune, then "
                    "zero-shot and fine-tuned top-1 and the energy report. The defaults fit a 2-core CPU.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="folder for the checkpoints, results.json, the figures and demo.log; the demo's "
                             "stage folders in it are replaced")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"folder for the Fashion-MNIST shards and the built teacher, kept between runs "
                             f"(default: ${CACHE_ENV_VAR}, else open_clip_spiking in $XDG_CACHE_HOME or ~/.cache)")

    data = parser.add_argument_group("data")
    sources = data.add_mutually_exclusive_group()
    sources.add_argument("--data-dir", type=Path, default=None,
                         help="use these shards instead of Fashion-MNIST: a dataset folder in the clip_benchmark "
                              f"layout, with train/ and test/ WebDataset shards (test/ with nshards.txt), "
                              f"{fashion_mnist.CLASSNAMES_FILE} and {fashion_mnist.TEMPLATES_FILE}")
    sources.add_argument("--fashion-mnist-dir", type=Path, default=None,
                         help="folder with the four Fashion-MNIST idx files (train-images-idx3-ubyte.gz and the "
                              f"rest) (default: {fashion_mnist.DEBIAN_DIR}, where the Debian package "
                              f"{fashion_mnist.DEBIAN_PACKAGE} installs them)")
    data.add_argument("--no-download", action="store_true",
                      help="fail instead of downloading Fashion-MNIST with torchvision when the idx files are missing")

    models = parser.add_argument_group("models")
    models.add_argument("--student", default=DEFAULT_STUDENT,
                        help="open_clip config of the spiking student; it must embed into the teacher's width")
    models.add_argument("--teacher", default=pipeline.OFFLINE_TEACHER,
                        help="open_clip model of the ANN teacher, e.g. ViT-B-16 with --teacher-pretrained openai")
    models.add_argument("--teacher-pretrained", default=None,
                        help=f"teacher weights: an open_clip pretrained tag or a checkpoint path. Without it the "
                             f"demo builds {pipeline.OFFLINE_TEACHER}, or reuses the one in --cache-dir")

    budget = parser.add_argument_group("budget (raise these to scale the run up)")
    budget.add_argument("--teacher-samples", type=positive_int, default=4000,
                        help="first training images, in shard order, whose frozen features train the offline "
                             "teacher's projections. The build stores the teacher's embeddings of them for align: "
                             "while --align-samples fits in the shards that contain them (2,000 images a "
                             "Fashion-MNIST shard), align reads only those shards and skips the teacher's image "
                             "tower for these images")
    budget.add_argument("--teacher-epochs", type=positive_int, default=20,
                        help="passes of the offline teacher's projection training over those cached features")
    budget.add_argument("--align-samples", type=positive_int, default=4000,
                        help="training images of the align stage, one epoch")
    budget.add_argument("--align-text-samples", type=positive_int, default=32000,
                        help="texts of the align-text stage, drawn from the class x template prompts")
    budget.add_argument("--finetune-samples", type=positive_int, default=80000,
                        help="training images of the finetune stage, one epoch")
    budget.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per batch in align and finetune, texts per batch in align-text")
    budget.add_argument("--finetune-lr", type=positive_float, default=5e-3,
                        help="peak learning rate of finetune, cosine-annealed to a tenth of it")
    budget.add_argument("--logit-scale", type=positive_float, default=10.0,
                        help="factor on the cosine logits in finetune (the train command's --logit-scale)")
    budget.add_argument("--kd-weight", type=non_negative_float, default=0.0,
                        help="weight of the KL(teacher || student) term in finetune. 0 trains on the labels alone "
                             "and skips the teacher's image tower, which dominates the cost on a CPU; SpikeCLIP "
                             "uses 1")
    budget.add_argument("--eval-samples", type=positive_int, default=None,
                        help="test images that clip_benchmark scores the student on, the first in shard order "
                             "(default: the whole test split)")
    budget.add_argument("--teacher-eval-samples", type=positive_int, default=1000,
                        help="test images that clip_benchmark scores the teacher on, the first in shard order; "
                             "at most --eval-samples")
    budget.add_argument("--energy-images", type=positive_int, default=256,
                        help="test images of the energy profile")
    budget.add_argument("--eval-batch-size", type=positive_int, default=128,
                        help="images per batch in clip_benchmark and the energy profile")

    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=non_negative_int, default=1,
                     help="data-loader worker processes of the training stages (clip_benchmark uses at most one)")
    run.add_argument("--device", default=None, help="torch device; cuda when available, else cpu")
    run.add_argument("--seed", type=int, default=0, help="random seed of every stage")
    return parser


def _expected_warnings(record: logging.LogRecord) -> bool:
    """False for the warning open_clip logs when align creates the student without weights, as it must;
    demo.log keeps it."""
    return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def demo_logging(log_path: Path) -> Iterator[None]:
    """Send every log record to ``log_path`` and warnings and errors to the terminal, restoring the root
    logger afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    file_handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(_expected_warnings)
    root.handlers[:] = [file_handler, console]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        file_handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def run(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    """Run every stage, write results.json and the figures, print the table and return the results."""
    started = time.monotonic()
    output_dir = args.output_dir
    results: Dict[str, Any] = {
        "command": command,
        "working_directory": str(Path.cwd()),
        "date": now(),
        "hardware": collect_hardware(args.device),
        "software": collect_software(),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "output_dir": str(output_dir),
    }
    progress = pipeline.Progress(NUM_STAGES)
    dataset = pipeline.prepare_data(args, progress)
    teacher = pipeline.prepare_teacher(args, dataset, progress)
    checkpoints = pipeline.train_student(args, dataset, teacher, progress, output_dir)
    measurements = pipeline.evaluate(args, dataset, teacher, checkpoints, progress, output_dir)

    results.update(
        dataset={"name": dataset.name, "title": dataset.title, "folder": str(dataset.folder), "source": dataset.source,
                 "train_samples": dataset.train_samples, "test_samples": dataset.test_samples,
                 "classnames": dataset.classnames, "templates": dataset.templates},
        teacher={"model": teacher.model, "pretrained": teacher.pretrained, "source": teacher.source,
                 "sha256": teacher.sha256},
        student={"model": args.student, "checkpoints": {stage: str(path) for stage, path in checkpoints.items()}},
        accuracy=measurements["accuracy"],
        energy=measurements["energy"],
    )
    curves = {stage: pipeline.read_metrics(output_dir / stage) for stage in report.TRAINING_STAGES}
    results["training"] = {stage: records[-1] if records else None for stage, records in curves.items()}
    results["outputs"] = {
        "results": str(output_dir / "results.json"),
        "summary figure": str(report.write_summary_figure(results, output_dir / "summary.png")),
        "training curves": str(report.write_training_figure(curves, output_dir / "training.png")),
        "energy per layer": measurements["energy"]["figure"],
        "student checkpoint": str(checkpoints["finetune"]),
        "teacher weights": teacher.pretrained,
        "log": str(output_dir / LOG_FILE),
    }
    results["stages"] = pipeline.stage_records(progress)
    results["hardware"]["load_average_end"] = load_average()
    results["wall_s"] = round(time.monotonic() - started, 1)
    report.write_json(results, output_dir / "results.json")
    _logger.info("wrote %s after %s", output_dir / "results.json", format_duration(results["wall_s"]))
    print()
    print(report.summary_text(results))
    print(f"Total wall time {format_duration(results['wall_s'])}.")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo from the command line and return a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = pipeline.teacher_arguments_problem(args)
    if problem:
        parser.error(problem)
    # Before the first import of huggingface_hub, which reads these variables once.
    pipeline.environment_for_teacher(args.teacher)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.output_dir = args.output_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "open_clip_spiking.demo", *argv])

    from .. import register

    register()
    with demo_logging(args.output_dir / LOG_FILE):
        _logger.info("command: %s", command)
        try:
            run(args, command)
        except pipeline.StageFailed as error:
            _logger.error("%s; the full log is in %s", error, args.output_dir / LOG_FILE)
            return 2
    return 0
