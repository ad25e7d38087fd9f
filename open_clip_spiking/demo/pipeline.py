"""The demo's stages: data, teacher, align, align-text, finetune, clip_benchmark and energy.

Every stage runs the package's own entry point in this process, from the argument list of the
equivalent command line, which ``results.json`` records. The parsers are the command lines' own, so a
recorded command reruns the stage by hand. Only logging differs: the demo sends the stages' log
records to ``demo.log`` in the output folder and keeps the terminal for progress bars and warnings.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import sys
import tarfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from ..provenance import format_duration, now, sha256
from . import fashion_mnist

_logger = logging.getLogger(__name__)

OFFLINE_TEACHER = "lit-effnetlite0-minilm"
CLASSNAMES_FILE = fashion_mnist.CLASSNAMES_FILE
TEMPLATES_FILE = fashion_mnist.TEMPLATES_FILE
TEACHER_RECORD = "build.json"
STAGE_NAMES = ("data", "teacher", "align", "align-text", "finetune", "clip_benchmark", "energy")


class StageFailed(RuntimeError):
    """A stage stopped with an error. The message names the stage and its command."""


@dataclass
class StageRecord:
    """One stage of the demo: its equivalent command, whether it ran now, and its wall time in seconds."""

    name: str
    command: str
    status: str  # "ran", "reused" (an earlier run's output) or "given" (passed on the command line)
    wall_s: Optional[float] = None
    date: Optional[str] = None


@dataclass
class Dataset:
    """A labelled dataset folder in the clip_benchmark layout."""

    folder: Path
    name: str
    title: str
    train_samples: int
    test_samples: int
    classnames: List[str]
    templates: List[str]
    source: str
    manifest: Optional[Dict[str, Any]] = None


@dataclass
class Teacher:
    """The teacher's open_clip model name and weights (a checkpoint path or a pretrained tag)."""

    model: str
    pretrained: str
    source: str  # "built", "reused" or "given"
    sha256: Optional[str] = None
    build: Dict[str, Any] = field(default_factory=dict)
    # Align-stage teacher cache with the image embeddings of the build's training images, and the shards
    # that contain those images (a built offline teacher only).
    cache: Optional[Path] = None
    cached_shards: List[str] = field(default_factory=list)


def say(text: str) -> None:
    """Print a line of the demo's terminal output at once, also when stdout is a file or a pipe."""
    print(text, flush=True)


def shell_command(module: str, argv: Sequence[str]) -> str:
    """Return ``python -m module argv`` as one shell-quoted line."""
    return shlex.join(["python", "-m", module, *argv])


class Progress:
    """Number the stages on the terminal and record their commands and wall times."""

    def __init__(self, total: int):
        self.total = total
        self.records: List[StageRecord] = []

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[StageRecord]:
        """Announce a stage, time it, and turn the errors of its entry point into StageFailed."""
        number = len(self.records) + 1
        say(f"[{number}/{self.total}] {name}: {description}")
        record = StageRecord(name=name, command="", status="ran", date=now())
        self.records.append(record)
        _logger.info("stage %d/%d %s: %s", number, self.total, name, description)
        started = time.monotonic()
        try:
            yield record
        except StageFailed:
            # The traceback goes to demo.log only: the terminal handler shows warnings and errors.
            _logger.info("stage %s raised", name, exc_info=True)
            raise
        except (ValueError, KeyError, FileNotFoundError, ImportError, RuntimeError, OSError, tarfile.TarError) as error:
            _logger.info("stage %s raised", name, exc_info=True)
            command = f" (command: {record.command})" if record.command else ""
            raise StageFailed(f"stage {name} failed: {type(error).__name__}: {error}{command}") from error
        if record.status == "ran":
            record.wall_s = round(time.monotonic() - started, 1)
            say(f"      {name} done in {format_duration(record.wall_s)}")
            _logger.info("stage %s finished in %.1f s", name, record.wall_s)


# --- data ------------------------------------------------------------------------------------------

def _count_samples(folder: Path) -> int:
    from ..train.data import count_samples, expand_urls

    return count_samples(expand_urls(str(folder)))


def check_dataset_folder(folder: Path) -> None:
    """Raise FileNotFoundError naming the first part of the clip_benchmark layout that ``folder`` lacks."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--data-dir {folder} not found; pass a folder with train/ and test/ WebDataset "
                                f"shards, {CLASSNAMES_FILE} and {TEMPLATES_FILE}")
    required = [folder / "train", folder / "test" / "nshards.txt", folder / CLASSNAMES_FILE, folder / TEMPLATES_FILE]
    for path in required:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: --data-dir {folder} must be a dataset folder in the clip_benchmark layout, with "
                f"train/ shards, test/ shards with nshards.txt (clip_benchmark reads test/0.tar to test/N-1.tar), "
                f"{CLASSNAMES_FILE} (one class a line, in label order) and {TEMPLATES_FILE} (prompts with {{c}})"
            )


def prepare_data(args: argparse.Namespace, progress: Progress) -> Dataset:
    """Return the dataset: ``--data-dir`` as given, or Fashion-MNIST written once into ``--cache-dir``."""
    if args.data_dir is not None:
        with progress.stage("data", f"reading the shards in {args.data_dir}") as record:
            record.command = f"--data-dir {shlex.quote(str(args.data_dir))}"
            record.status = "given"
            folder = args.data_dir.resolve()
            check_dataset_folder(folder)
            return _describe_dataset(folder, folder.name, folder.name, source=str(folder))

    cache_dir = args.cache_dir.resolve()
    with progress.stage("data", f"Fashion-MNIST as WebDataset shards in {cache_dir / fashion_mnist.DATASET_NAME}") \
            as record:
        record.command = shell_command("open_clip_spiking.demo.fashion_mnist", fashion_mnist_argv(args, cache_dir))
        existing = fashion_mnist.read_manifest(cache_dir / fashion_mnist.DATASET_NAME)
        folder = fashion_mnist.prepare_dataset(cache_dir, args.fashion_mnist_dir, allow_download=not args.no_download)
        manifest = fashion_mnist.read_manifest(folder)
        if existing is not None and manifest == existing:
            record.status = "reused"
            say(f"      reusing the shards written from {manifest['source']}")
        return _describe_dataset(folder, fashion_mnist.DATASET_NAME, "Fashion-MNIST", source=manifest["source"],
                                 manifest=manifest)


def fashion_mnist_argv(args: argparse.Namespace, cache_dir: Path) -> List[str]:
    """Arguments of ``python -m open_clip_spiking.demo.fashion_mnist`` that write the demo's shards."""
    argv = ["--cache-dir", str(cache_dir)]
    if args.fashion_mnist_dir is not None:
        argv += ["--source-dir", str(args.fashion_mnist_dir)]
    if args.no_download:
        argv.append("--no-download")
    return argv


def _describe_dataset(folder: Path, name: str, title: str, source: str,
                      manifest: Optional[Dict[str, Any]] = None) -> Dataset:
    from ..train.data import load_classnames, load_templates

    if manifest is not None:
        train_samples, test_samples = manifest["samples"]["train"], manifest["samples"]["test"]
    else:
        train_samples, test_samples = _count_samples(folder / "train"), _count_samples(folder / "test")
    return Dataset(
        folder=folder,
        name=name,
        title=title,
        train_samples=train_samples,
        test_samples=test_samples,
        classnames=load_classnames(str(folder / CLASSNAMES_FILE)),
        templates=load_templates(str(folder / TEMPLATES_FILE)),
        source=source,
        manifest=manifest,
    )


def subset_dataset(dataset: Dataset, count: int, target: Path) -> Path:
    """Return a clip_benchmark dataset folder with the first ``count`` test samples of ``dataset``.

    The dataset folder itself when ``count`` covers its test split. Otherwise the samples are copied
    unchanged, in shard order, into ``target/test/0.tar``, next to copies of the class and template files.
    """
    if count >= dataset.test_samples:
        return dataset.folder
    from ..train.data import _split_member_name

    shutil.rmtree(target, ignore_errors=True)
    (target / "test").mkdir(parents=True)
    # The shards that clip_benchmark reads: test/0.tar to test/N-1.tar for N in nshards.txt.
    num_shards = int((dataset.folder / "test" / "nshards.txt").read_text(encoding="utf-8").strip())
    urls = [dataset.folder / "test" / f"{index}.tar" for index in range(num_shards)]
    keys: List[str] = []
    with tarfile.open(target / "test" / "0.tar", "w", format=tarfile.GNU_FORMAT) as writer:
        for url in urls:
            with tarfile.open(url) as reader:
                for member in reader:
                    parts = _split_member_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key = parts[0]
                    if not keys or keys[-1] != key:
                        if len(keys) == count:
                            break
                        keys.append(key)
                    writer.addfile(member, reader.extractfile(member))
            if len(keys) == count:
                break
    (target / "test" / "nshards.txt").write_text("1\n", encoding="utf-8")
    for name in (CLASSNAMES_FILE, TEMPLATES_FILE):
        shutil.copyfile(dataset.folder / name, target / name)
    return target


# --- teacher ---------------------------------------------------------------------------------------

def _teacher_build_argv(args: argparse.Namespace, dataset: Dataset, output: Path, cache: Path) -> List[str]:
    return [
        "--output", str(output),
        "--teacher-cache", str(cache),
        "--data-root", str(dataset.folder.parent),
        "--no-caption-set",
        "--label-set", dataset.folder.name,
        "--label-split", "train",
        "--max-samples", str(args.teacher_samples),
        "--epochs", str(args.teacher_epochs),
        "--seed", str(args.seed),
        "--device", args.device or "cpu",
        "--log-level", "INFO",
    ]


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def teacher_arguments_problem(args: argparse.Namespace) -> Optional[str]:
    """Return why ``--teacher`` and ``--teacher-pretrained`` cannot work together, or None when they can."""
    if args.teacher == OFFLINE_TEACHER or args.teacher_pretrained is not None:
        return None
    return (f"--teacher {args.teacher} needs --teacher-pretrained: an open_clip pretrained tag (for example "
            f"--teacher ViT-B-16 --teacher-pretrained openai) or a checkpoint path; only {OFFLINE_TEACHER} can be "
            f"built by the demo")


def prepare_teacher(args: argparse.Namespace, dataset: Dataset, progress: Progress) -> Teacher:
    """Return the teacher: ``--teacher-pretrained`` as given, or the offline teacher, built when not cached.

    The offline teacher's projections are trained on the training split of ``dataset`` with prompts
    built from its class names, because a fresh machine has no caption set. The build is cached under
    ``--cache-dir`` and rebuilt when its command or the dataset's source files change.
    """
    if args.teacher_pretrained is not None:
        with progress.stage("teacher", f"{args.teacher} with weights {args.teacher_pretrained}") as record:
            record.command = f"--teacher {args.teacher} --teacher-pretrained {shlex.quote(args.teacher_pretrained)}"
            record.status = "given"
            path = Path(args.teacher_pretrained)
            return Teacher(args.teacher, args.teacher_pretrained, "given",
                           sha256=sha256(path) if path.is_file() else None)
    problem = teacher_arguments_problem(args)
    if problem:
        raise StageFailed(problem)

    from .. import offline_teacher

    folder = args.cache_dir.resolve() / "teacher" / dataset.name
    output = folder / f"{OFFLINE_TEACHER}.safetensors"
    cache = folder / "embeddings"
    argv = _teacher_build_argv(args, dataset, output, cache)
    key = {"argv": argv, "data": dataset.manifest["sha256"] if dataset.manifest else _shard_stamps(dataset.folder)}
    previous = _read_json(folder / TEACHER_RECORD)
    description = (f"{OFFLINE_TEACHER}, projections trained on {args.teacher_samples:,} {dataset.title} training "
                   f"images with class prompts")
    with progress.stage("teacher", description) as record:
        record.command = shell_command("open_clip_spiking.offline_teacher", argv)
        shards = shards_covering(dataset.folder / "train", args.teacher_samples)
        if output.is_file() and previous is not None and previous.get("key") == key:
            record.status = "reused"
            record.wall_s, record.date = previous["wall_s"], previous["date"]
            say(f"      reusing {output}, built {previous['date']}")
            has_cache = (cache / "cache.json").is_file()
            return Teacher(OFFLINE_TEACHER, str(output), "reused", sha256=previous["sha256"], build=previous,
                           cache=cache if has_cache else None, cached_shards=shards if has_cache else [])
        # The embeddings belong to the checkpoint that this build replaces.
        shutil.rmtree(cache, ignore_errors=True)
        cfg, _ = offline_teacher.parse_args(argv)
        started = time.monotonic()
        offline_teacher.build_teacher(cfg)
        build = {"key": key, "date": record.date, "wall_s": round(time.monotonic() - started, 1),
                 "sha256": sha256(output)}
        (folder / TEACHER_RECORD).write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
        return Teacher(OFFLINE_TEACHER, str(output), "built", sha256=build["sha256"], build=build, cache=cache,
                       cached_shards=shards)


def _shard_stamps(folder: Path) -> List[List[Any]]:
    """Name, size and modification time of each training shard and class file, so that a dataset folder
    changed in place rebuilds the teacher."""
    from ..train.data import expand_urls

    paths = [Path(url) for url in expand_urls(str(folder / "train"))]
    paths += [folder / CLASSNAMES_FILE, folder / TEMPLATES_FILE]
    return [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in paths]


def shards_covering(folder: Path, count: int) -> List[str]:
    """Return the first shards of ``folder``, in the order the offline teacher reads them, that contain
    its first ``count`` samples."""
    from ..train.data import count_samples, expand_urls

    shards, total = [], 0
    for url in expand_urls(str(folder)):
        shards.append(url)
        total += count_samples([url])
        if total >= count:
            break
    return shards


# --- training --------------------------------------------------------------------------------------

def run_training(progress: Progress, stage: str, description: str, argv: List[str]) -> Dict[str, float]:
    """Run one stage of ``python -m open_clip_spiking.train`` with ``argv`` and return its last metrics."""
    from ..train import align, align_text, finetune
    from ..train.config import parse_args
    from ..train.trainer import TrainingError

    runners = {"align": align.run, "align-text": align_text.run, "finetune": finetune.run}
    with progress.stage(stage, description) as record:
        record.command = shell_command("open_clip_spiking.train", argv)
        cfg = parse_stage_args(parse_args, argv, stage, record.command)
        # The trainer appends to metrics.jsonl, so an earlier demo run's records would mix in.
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        try:
            metrics = runners[stage](cfg)
        except TrainingError as error:
            raise StageFailed(f"stage {stage} failed: {error} (command: {record.command})") from error
        prune_run(Path(cfg.output_dir))
        return metrics


def parse_stage_args(parse: Any, argv: List[str], stage: str, command: str) -> Any:
    """Parse a stage's arguments with its own parser; argparse's reason for rejecting them goes into the
    StageFailed message instead of only to stderr."""
    reason = io.StringIO()
    try:
        with contextlib.redirect_stderr(reason):
            return parse(argv)
    except SystemExit:
        message = reason.getvalue().strip().splitlines()
        raise StageFailed(f"stage {stage}: invalid arguments ({message[-1] if message else 'no reason given'}): "
                          f"{command}") from None


def prune_run(run_dir: Path) -> None:
    """Delete what a finished one-epoch run needs only for ``--resume``: the ``.state.pt`` files and the
    ``epoch_N`` copies of ``latest``, about 65 MB a stage for the demo's student."""
    for path in {*run_dir.glob("*.state.pt"), *run_dir.glob("epoch_*.safetensors"), *run_dir.glob("epoch_*.pt")}:
        path.unlink()


def common_train_argv(args: argparse.Namespace, teacher: Teacher) -> List[str]:
    """Return the flags that every training stage of the demo passes."""
    argv = ["--model", args.student, "--teacher", teacher.model, "--teacher-pretrained", teacher.pretrained,
            "--seed", str(args.seed), "--log-every-n-steps", "5"]
    if args.device:
        argv += ["--device", args.device]
    return argv


def train_student(args: argparse.Namespace, dataset: Dataset, teacher: Teacher, progress: Progress,
                  output_dir: Path) -> Dict[str, Path]:
    """Run align, align-text and finetune, and return each stage's ``latest`` checkpoint."""
    common = common_train_argv(args, teacher)
    train_data = str(dataset.folder / "train")
    classes = str(dataset.folder)
    checkpoints = {stage: output_dir / stage / "latest.safetensors" for stage in ("align", "align-text", "finetune")}
    image_flags = ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1"]

    align_data = ["--train-data", train_data]
    if teacher.cache is not None:
        # The teacher build stored its embeddings of the first training images. When they cover the
        # align budget, align reads only their shards, so the teacher's image tower does not run again.
        # Otherwise align reads every shard, and the cache serves the images it contains.
        from ..train.data import count_samples

        align_data.extend(["--teacher-cache", str(teacher.cache)])
        if args.align_samples <= count_samples(teacher.cached_shards):
            align_data[1] = "::".join(teacher.cached_shards)
    run_training(progress, "align",
                 f"student image and text embeddings towards the teacher's, {args.align_samples:,} images",
                 ["--stage", "align", *common, *align_data, "--classnames", classes,
                  "--train-num-samples", str(args.align_samples), *image_flags,
                  "--output-dir", str(output_dir / "align")])

    num_prompts = len(dataset.classnames) * len(dataset.templates)
    text_samples = max(args.align_text_samples, num_prompts)
    # The default student's text tower trained at about 1,800 texts/s eager on one CPU thread, so compiling
    # it (about a minute on a CPU) would cost more than it saves.
    run_training(progress, "align-text",
                 f"student text tower on the {num_prompts} class prompts, {text_samples:,} texts",
                 ["--stage", "align-text", *common, "--pretrained", str(checkpoints["align"]),
                  "--classnames", classes, "--train-num-samples", str(text_samples),
                  "--batch-size", str(min(num_prompts, args.batch_size)), "--epochs", "1", "--compile", "off",
                  "--output-dir", str(output_dir / "align-text")])

    loss = "cross-entropy" if args.kd_weight == 0 else f"cross-entropy + {args.kd_weight:g} x KL to the teacher"
    run_training(progress, "finetune",
                 f"student image tower with {loss}, {args.finetune_samples:,} images",
                 ["--stage", "finetune", *common, "--pretrained", str(checkpoints["align-text"]),
                  "--train-data", train_data, "--classnames", classes,
                  "--train-num-samples", str(args.finetune_samples), *image_flags,
                  "--kd-weight", f"{args.kd_weight:g}", "--logit-scale", f"{args.logit_scale:g}",
                  "--lr", f"{args.finetune_lr:g}", "--lr-min", f"{args.finetune_lr / 10:g}",
                  "--output-dir", str(output_dir / "finetune")])
    return checkpoints


# --- evaluation ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _argv(argv: List[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def clip_benchmark_argv(model: str, pretrained: str, dataset_name: str, dataset_root: Path, output: Path,
                        batch_size: int, workers: int) -> List[str]:
    """Arguments of ``clip_benchmark eval`` for zero-shot classification on a WebDataset folder."""
    return [
        "eval", "--model", model, "--pretrained", pretrained,
        "--dataset", f"wds/{dataset_name}", "--dataset_root", str(dataset_root),
        "--task", "zeroshot_classification", "--output", str(output),
        "--batch_size", str(batch_size), "--num_workers", str(workers),
        # fp32: clip_benchmark's default autocast is bf16 on a CPU, which CPUs without bf16 units emulate slowly.
        "--no_amp", "--quiet",
    ]


def run_clip_benchmark(progress: Progress, role: str, description: str, argv: List[str]) -> Dict[str, Any]:
    """Run ``clip_benchmark eval`` in this process and return the metrics of its output file."""
    from clip_benchmark import cli

    output = Path(argv[argv.index("--output") + 1])
    with progress.stage("clip_benchmark", description) as record:
        record.command = shlex.join(["clip_benchmark", *argv])
        output.parent.mkdir(parents=True, exist_ok=True)
        output.unlink(missing_ok=True)
        # clip_benchmark 1.6.2 parses sys.argv itself: cli.get_parser_args() takes no argument list.
        with _argv(["clip_benchmark", *argv]), warnings.catch_warnings():
            # webdataset 0.2.111 warns that clip_benchmark leaves shardshuffle unset; unset reads shards in order.
            warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=\.\.\.\) is None")
            cli.main()
        if not output.is_file():
            raise StageFailed(f"clip_benchmark wrote no {output} for the {role}: {record.command}")
        report = json.loads(output.read_text(encoding="utf-8"))
    metrics = report["metrics"]
    say(f"      {role}: top-1 {100 * metrics['acc1']:.1f}%, top-5 {100 * metrics['acc5']:.1f}%")
    return metrics


def run_energy(progress: Progress, argv: List[str]) -> Dict[str, Any]:
    """Run ``python -m open_clip_spiking.energy`` with ``argv`` in this process and return its report."""
    from ..energy.__main__ import parse_args
    from ..energy.profiler import run_profile

    command = shell_command("open_clip_spiking.energy", argv)
    with progress.stage("energy", "accumulates, multiply-accumulates and energy per image, student and teacher") \
            as record:
        record.command = command
        cfg, _ = parse_stage_args(parse_args, argv, "energy", command)
        report = run_profile(cfg, command)
    return report


def evaluate(args: argparse.Namespace, dataset: Dataset, teacher: Teacher, checkpoints: Dict[str, Path],
             progress: Progress, output_dir: Path) -> Dict[str, Any]:
    """Score teacher and student with clip_benchmark, profile their energy and return the measurements."""
    student_images = min(args.eval_samples or dataset.test_samples, dataset.test_samples)
    teacher_images = min(args.teacher_eval_samples or student_images, student_images)
    try:
        roots = {
            "student": subset_dataset(dataset, student_images, output_dir / "eval-data" / f"first-{student_images}"),
            "teacher": subset_dataset(dataset, teacher_images, output_dir / "eval-data" / f"first-{teacher_images}"),
        }
    except (OSError, ValueError, tarfile.TarError) as error:
        _logger.info("copying the test images failed", exc_info=True)
        raise StageFailed(f"copying the first test images of {dataset.folder / 'test'} for clip_benchmark failed: "
                          f"{type(error).__name__}: {error}") from error
    runs = [
        ("teacher", teacher.model, teacher.pretrained, teacher_images),
        ("student_zero_shot", args.student, str(checkpoints["align-text"]), student_images),
        ("student_finetuned", args.student, str(checkpoints["finetune"]), student_images),
    ]
    labels = {"teacher": f"teacher {teacher.model}", "student_zero_shot": "student after align-text (zero-shot)",
              "student_finetuned": "student after finetune"}
    accuracy: Dict[str, Any] = {}
    for role, model, pretrained, images in runs:
        root = roots["teacher" if role == "teacher" else "student"]
        argv = clip_benchmark_argv(model, pretrained, dataset.name, root, output_dir / "clip_benchmark" / f"{role}.json",
                                   args.eval_batch_size, min(args.workers, 1))
        metrics = run_clip_benchmark(progress, role, f"{labels[role]}, zero-shot classification of the first "
                                                     f"{images:,} {dataset.title} test images", argv)
        accuracy[role] = {"model": model, "pretrained": pretrained, "num_images": images, **metrics,
                          "command": progress.records[-1].command}

    energy_dir = output_dir / "energy"
    energy_argv = [
        "--model", args.student, "--pretrained", str(checkpoints["finetune"]),
        "--teacher", teacher.model, "--teacher-pretrained", teacher.pretrained,
        "--data", str(dataset.folder / "test"), "--num-images", str(args.energy_images),
        "--batch-size", str(args.eval_batch_size), "--device", args.device or "cpu", "--output", str(energy_dir),
    ]
    report = run_energy(progress, energy_argv)
    energy = {
        "num_images": report["num_images"],
        "student_mj": report["student"]["energy_mj"],
        "teacher_mj": report["teacher"]["energy_mj"],
        "ratio": report["ratio"],
        "student_mean_firing_rate": report["student"].get("mean_firing_rate"),
        "student_time_steps": report["student"].get("time_steps"),
        "mac_pj": report["settings"]["mac_pj"],
        "ac_pj": report["settings"]["ac_pj"],
        "report": str(energy_dir / "energy.json"),
        "figure": str(energy_dir / "energy.png"),
        "command": report["command"],
    }
    return {"accuracy": accuracy, "energy": energy}


def stage_records(progress: Progress) -> List[Dict[str, Any]]:
    return [asdict(record) for record in progress.records]


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """Return the records of a training run's ``metrics.jsonl``, or an empty list when it has none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def environment_for_teacher(teacher_name: str) -> None:
    """Keep transformers off the Hugging Face hub for the offline teacher, which loads local folders only.

    A hub teacher such as ViT-B-16 with ``openai`` weights downloads them once, so it is left alone.
    """
    if teacher_name == OFFLINE_TEACHER:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
