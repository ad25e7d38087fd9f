"""Typed training configuration and the command-line parser that fills it.

Flag names follow open_clip_train where the meaning is the same (``--model``, ``--train-data``,
``--epochs``, ``--batch-size``, ``--lr``, ``--workers``, ``--precision``, ``--seed``, ``--resume``).
The argparse namespace stops here: the stages receive a ``TrainConfig``.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from .._cli import fraction, non_negative_int, positive_int

STAGES = ("align",)
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    stage: str
    model: str
    train_data: str
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.train",
        description="Distil a spiking SpikeCLIP student from a frozen open_clip teacher.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--stage", choices=STAGES, required=True,
                        help="align: match the student's image (and text) embeddings to the teacher's")
    parser.add_argument("--model", default="spikeclip-vit-s", help="open_clip config name of the spiking student")
    parser.add_argument("--pretrained", default=None,
                        help="student checkpoint (.safetensors or .pt) to start from; random init when omitted")
    parser.add_argument("--teacher", required=True, help="open_clip model name of the frozen teacher, e.g. ViT-B-16")
    parser.add_argument("--teacher-pretrained", default=None,
                        help="teacher weights: an open_clip pretrained tag (e.g. openai) or a checkpoint path")
    parser.add_argument("--train-data", required=True,
                        help="local .tar shards: brace pattern, '::'-separated list, glob or folder")
    parser.add_argument("--val-data", default=None, help="validation shards, same forms as --train-data")
    parser.add_argument("--train-num-samples", type=positive_int, default=None,
                        help="samples per epoch; counted from the shards when omitted")
    parser.add_argument("--classnames", default=None,
                        help="class names file, one a line; with --templates builds prompts for 'cls' samples")
    parser.add_argument("--templates", default=None, help="prompt templates file, one a line, each with '{c}'")
    parser.add_argument("--output-dir", required=True, help="folder for checkpoints, metrics.jsonl and the log")
    parser.add_argument("--checkpoint-format", choices=("safetensors", "pt"), default="safetensors",
                        help="file format of the weights in each checkpoint; open_clip loads both")
    parser.add_argument("--epochs", type=positive_int, default=1, help="number of passes over --train-data")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimiser steps in total (short runs)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per step on each device")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    parser.add_argument("--lr-min", type=float, default=5e-4, help="learning rate at the end of the cosine schedule")
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
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data-loader worker processes")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32, or bf16 autocast for the student and teacher")
    parser.add_argument("--device", default=None, help="torch device; cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--resume", default=None,
                        help="'latest' to continue from OUTPUT_DIR/latest, or a path to a .state.pt file")
    parser.add_argument("--log-every-n-steps", type=positive_int, default=10, help="log and record metrics every N steps")
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.01,
                        help="abort when more than this share of samples cannot be used")
    parser.add_argument("--shuffle-buffer", type=positive_int, default=1000, help="samples in the shuffle buffer")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.classnames is None) != (args.templates is None):
        parser.error("--classnames and --templates go together; pass both or neither")
    if args.lr_min > args.lr:
        parser.error(f"--lr-min {args.lr_min} is larger than --lr {args.lr}")
    return TrainConfig(**vars(args))
