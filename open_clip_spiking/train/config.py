"""Typed training configuration and the command-line parser that fills it.

Flag names follow open_clip_train where the meaning is the same (``--model``, ``--train-data``,
``--epochs``, ``--batch-size``, ``--lr``, ``--workers``, ``--precision``, ``--seed``, ``--resume``,
``--accum-freq``, ``--dataset-resampled``).
The argparse namespace stops here: the stages receive a ``TrainConfig``.
"""
import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .._cli import HelpFormatter, fraction, non_negative_int, positive_float, positive_int

STAGES = ("align", "align-text", "teacher-finetune", "finetune")
PRECISIONS = ("fp32", "bf16")
COMPILE_CHOICES = ("auto", "on", "off")
# --compile auto compiles on CUDA, and on a CPU for runs of at least this many optimiser steps: there
# compilation takes minutes and pays off only over a longer run.
AUTO_COMPILE_MIN_CPU_STEPS = 200

# Peak and final learning rates of each stage when --lr and --lr-min are not given: the alignment
# stages use SpikeCLIP's 5e-3 cosine to 5e-4, the fine-tuning stages the authors' released settings.
STAGE_LR = {
    "align": (5e-3, 5e-4),
    "align-text": (5e-3, 5e-4),
    "teacher-finetune": (5e-5, 1e-5),
    "finetune": (1e-3, 1e-4),
}

# File names inside a clip_benchmark dataset folder.
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"

STAGE_HELP = (
    "align: match the student's image (and text) embeddings to the teacher's; "
    "align-text: train the student's text tower alone on class prompts and captions; "
    "teacher-finetune: fine-tune the teacher (--teacher) on labelled shards with its own class-prompt classifier; "
    "finetune: dual-loss fine-tuning of the student's image tower (cross-entropy + KL to the teacher)"
)


@dataclass
class TrainConfig:
    stage: str
    model: str
    train_data: Optional[str]
    output_dir: str
    teacher: str
    teacher_pretrained: Optional[str] = None
    pretrained: Optional[str] = None
    val_data: Optional[str] = None
    classnames: Optional[str] = None
    templates: Optional[str] = None
    train_num_samples: Optional[int] = None
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 5e-3
    lr_min: float = 5e-4
    warmup: int = 0
    wd: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = True
    grad_clip_norm: Optional[float] = None
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    workers: int = 2
    precision: str = "fp32"
    device: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None
    log_every_n_steps: int = 10
    max_bad_fraction: float = 0.01
    shuffle_buffer: int = 1000
    init_text_embeddings_from_teacher: bool = True
    checkpoint_format: str = "safetensors"
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_reduction: str = "sum"
    kd_classifier: str = "teacher"
    logit_scale: float = 1.0
    grad_angle_bound: Optional[float] = None
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    accum_freq: int = 1
    sync_bn: bool = False
    dataset_resampled: bool = False
    save_every_n_steps: Optional[int] = None
    max_nonfinite_steps: int = 5
    max_caption_chars: int = 2048
    compile: str = "auto"
    compile_backend: str = "inductor"
    grad_checkpointing: bool = False
    teacher_cache: Optional[str] = None
    augment: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.train",
        description="Distil a spiking SpikeCLIP student from a frozen open_clip teacher.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--stage", choices=STAGES, required=True, help=STAGE_HELP)
    parser.add_argument("--model", default="spikeclip-vit-s", help="open_clip config name of the spiking student")
    parser.add_argument("--pretrained", default=None,
                        help="student checkpoint (.safetensors or .pt) to start from; random init when omitted")
    parser.add_argument("--teacher", required=True,
                        help="open_clip model name of the teacher, e.g. ViT-B-16; frozen in every stage except "
                             "teacher-finetune, which trains it")
    parser.add_argument("--teacher-pretrained", default=None,
                        help="teacher weights: an open_clip pretrained tag (e.g. openai) or a checkpoint path")
    parser.add_argument("--train-data", default=None,
                        help="local .tar shards: brace pattern, '::'-separated list, glob or folder; optional for "
                             "align-text, which then trains on the class prompts alone")
    parser.add_argument("--val-data", default=None, help="validation shards, same forms as --train-data")
    parser.add_argument("--train-num-samples", type=positive_int, default=None,
                        help="samples per epoch; counted from the shards when omitted")
    parser.add_argument("--classnames", default=None,
                        help=f"class names file, one a line, in label order; or a clip_benchmark dataset folder "
                             f"holding {CLASSNAMES_FILE} and {TEMPLATES_FILE}")
    parser.add_argument("--templates", default=None,
                        help="prompt templates file, one a line, each with '{c}'; read from the --classnames "
                             "folder when omitted")
    parser.add_argument("--output-dir", required=True, help="folder for checkpoints, metrics.jsonl and the log")
    parser.add_argument("--checkpoint-format", choices=("safetensors", "pt"), default="safetensors",
                        help="file format of the weights in each checkpoint; open_clip loads both")
    parser.add_argument("--epochs", type=positive_int, default=1, help="number of passes over --train-data")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimiser steps in total (short runs)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="samples per forward pass on each device; one step takes --accum-freq of them")
    parser.add_argument("--accum-freq", type=positive_int, default=1,
                        help="accumulate the gradients of this many batches before each optimiser step; the "
                             "global batch is --batch-size x devices x --accum-freq")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="peak learning rate; per stage when omitted: " + _stage_lr_help(0))
    parser.add_argument("--lr-min", type=float, default=None,
                        help="learning rate at the end of the cosine schedule; per stage when omitted: "
                             + _stage_lr_help(1))
    parser.add_argument("--warmup", type=non_negative_int, default=0, help="linear warm-up steps")
    parser.add_argument("--wd", type=float, default=0.0, help="weight decay")
    parser.add_argument("--beta1", type=float, default=0.9, help="Adam beta1")
    parser.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    parser.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    parser.add_argument("--no-amsgrad", dest="amsgrad", action="store_false",
                        help="plain Adam instead of the AMSGrad variant used by SpikeCLIP")
    parser.add_argument("--grad-clip-norm", type=float, default=None, help="clip the gradient norm to this value")
    parser.add_argument("--image-loss-weight", type=float, default=1.0, help="weight of the image alignment loss")
    parser.add_argument("--text-loss-weight", type=float, default=1.0,
                        help="weight of the text alignment loss (0 aligns the image tower only)")
    parser.add_argument("--no-init-text-embeddings", dest="init_text_embeddings_from_teacher",
                        action="store_false",
                        help="keep the student's random token embeddings instead of copying the teacher's")
    finetune = parser.add_argument_group("fine-tuning (teacher-finetune and finetune)")
    finetune.add_argument("--logit-scale", type=positive_float, default=1.0,
                          help="factor on the cosine logits of student and teacher; 1 reproduces SpikeCLIP, "
                               "100 is CLIP's usual scale")
    finetune.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy term")
    finetune.add_argument("--kd-weight", type=float, default=1.0,
                          help="weight of the KL(teacher || student) term (0 trains on labels alone)")
    finetune.add_argument("--kd-temperature", type=positive_float, default=1.0,
                          help="distillation temperature; both distributions are softened by it and the KL term "
                               "is multiplied by its square")
    finetune.add_argument("--kd-reduction", choices=("sum", "batchmean"), default="sum",
                          help="sum the KL term over the batch (SpikeCLIP) or average it over the batch")
    finetune.add_argument("--kd-classifier", choices=("teacher", "student"), default="teacher",
                          help="class embeddings for the teacher's logits: the teacher's own text tower, or the "
                               "student's (as the SpikeCLIP release does)")
    finetune.add_argument("--grad-angle-bound", type=float, default=None,
                          help="degrees; when set, a step follows the combined gradient only if the angle between "
                               "the cross-entropy and KL gradients is at most this bound, and the cross-entropy "
                               "gradient alone otherwise; off by default")
    finetune.add_argument("--lock-image", action="store_true",
                          help="teacher-finetune: freeze the teacher's image trunk except the last "
                               "--lock-image-unlocked-groups layer groups (open_clip's lock_image_tower)")
    finetune.add_argument("--lock-image-unlocked-groups", type=non_negative_int, default=0,
                          help="layer groups left trainable by --lock-image")
    finetune.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                          help="with --lock-image, also freeze the BatchNorm statistics of the locked layers")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="data-loader worker processes per device; --train-data needs at least devices x "
                             "workers shards unless --dataset-resampled is set")
    parser.add_argument("--dataset-resampled", action="store_true",
                        help="draw training shards with replacement, endlessly, instead of giving each "
                             "data-loader worker its own share of the shards (open_clip_train's flag); any number "
                             "of shards then works")
    parser.add_argument("--sync-bn", action="store_true",
                        help="with several devices, compute BatchNorm statistics over the global batch "
                             "(SyncBatchNorm) instead of over each device's batch")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16 autocast for the student and teacher")
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                       help="run the student's towers through torch.compile: 'auto' compiles on CUDA, and on a "
                            f"CPU for runs of at least {AUTO_COMPILE_MIN_CPU_STEPS} steps; eager is the fallback "
                            "when compilation is unavailable or fails")
    speed.add_argument("--compile-backend", default="inductor",
                       help="torch.compile backend, e.g. 'aot_eager' to check a graph without code generation")
    speed.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute the student's activations in the backward pass instead of storing them "
                            "(open_clip's set_grad_checkpointing): less memory, about one more forward pass of time")
    speed.add_argument("--teacher-cache", default=None, metavar="DIR",
                       help="store the frozen teacher's image and text embeddings in DIR during the first epoch "
                            "and read them afterwards, in this run and in later runs with the same teacher "
                            "(align and align-text stages; not with --augment)")
    parser.add_argument("--augment", action="store_true",
                        help="random resized crop (scale 0.5 to 1) and horizontal flip of each training image, "
                             "the same for student and teacher, drawn anew every epoch")
    parser.add_argument("--device", default=None, help="torch device; cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--resume", default=None,
                        help="'latest' to continue from OUTPUT_DIR/latest.state.pt (or previous.state.pt when "
                             "latest is unreadable), or a path to a .state.pt file")
    parser.add_argument("--save-every-n-steps", type=positive_int, default=None,
                        help="also write the latest checkpoint every N optimiser steps, so --resume latest loses "
                             "at most N steps; by default it is written at the end of each epoch only")
    parser.add_argument("--log-every-n-steps", type=positive_int, default=10, help="log and record metrics every N steps")
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.01,
                        help="abort when more than this share of samples cannot be used")
    parser.add_argument("--max-caption-chars", type=non_negative_int, default=2048,
                        help="a caption line longer than this many characters makes its sample bad (the text "
                             "towers read at most 77 tokens); 0 turns the check off")
    parser.add_argument("--max-nonfinite-steps", type=positive_int, default=5,
                        help="abort after this many consecutive steps with a non-finite loss or gradient; each "
                             "such step is skipped without an update")
    parser.add_argument("--shuffle-buffer", type=positive_int, default=1000, help="samples in the shuffle buffer")
    return parser


def _stage_lr_help(index: int) -> str:
    return ", ".join(f"{stage} {rates[index]:g}" for stage, rates in STAGE_LR.items())


def resolve_class_files(classnames: Optional[str], templates: Optional[str]):
    """Turn a clip_benchmark dataset folder given as ``classnames`` into its two files.

    Raises FileNotFoundError when ``classnames`` names neither a file nor a folder.
    """
    if classnames is not None and not os.path.exists(classnames):
        raise FileNotFoundError(
            f"--classnames {classnames} not found; pass a class names file or a clip_benchmark dataset folder "
            f"that holds {CLASSNAMES_FILE}"
        )
    if classnames is not None and os.path.isdir(classnames):
        folder = classnames
        classnames = os.path.join(folder, CLASSNAMES_FILE)
        if templates is None:
            templates = os.path.join(folder, TEMPLATES_FILE)
    return classnames, templates


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.classnames, args.templates = resolve_class_files(args.classnames, args.templates)
    except FileNotFoundError as error:
        parser.error(str(error))
    if (args.classnames is None) != (args.templates is None):
        parser.error("--classnames and --templates go together; pass both, or a clip_benchmark dataset folder "
                     "as --classnames")
    if args.stage in ("teacher-finetune", "finetune"):
        if args.classnames is None:
            parser.error(f"--stage {args.stage} needs the class list: pass --classnames and --templates, or a "
                         f"clip_benchmark dataset folder as --classnames")
    if args.stage == "align-text":
        if args.train_data is None and args.classnames is None:
            parser.error("--stage align-text needs texts: pass --classnames and --templates for class prompts, "
                         "--train-data shards with captions, or both")
    elif args.train_data is None:
        parser.error(f"--stage {args.stage} needs --train-data")
    default_lr, default_lr_min = STAGE_LR[args.stage]
    args.lr = default_lr if args.lr is None else args.lr
    args.lr_min = min(default_lr_min, args.lr) if args.lr_min is None else args.lr_min
    if args.lr_min > args.lr:
        parser.error(f"--lr-min {args.lr_min} is larger than --lr {args.lr}")
    if args.teacher_cache is not None:
        if args.stage not in ("align", "align-text"):
            parser.error(f"--teacher-cache is for the align and align-text stages, not --stage {args.stage}")
        if args.augment:
            parser.error("--teacher-cache cannot be used with --augment: the teacher would see a new random crop "
                         "every epoch, so embeddings stored in the first epoch would be stale; drop one of the two")
    if args.augment and args.stage == "align-text":
        parser.error("--augment has no effect in --stage align-text, which reads no images; drop it")
    if args.grad_angle_bound is not None and not 0 <= args.grad_angle_bound <= 180:
        parser.error(f"--grad-angle-bound {args.grad_angle_bound} is not an angle in degrees between 0 and 180")
    return TrainConfig(**vars(args))
