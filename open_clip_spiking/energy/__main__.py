"""Command line: ``python -m open_clip_spiking.energy --model NAME --data SHARDS --output DIR ...``."""
import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import register
from .._cli import positive_float, positive_int
from .profiler import TEXT_SOURCES, ProfileConfig, run_profile
from .report import EnergyCosts

_logger = logging.getLogger("open_clip_spiking.energy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.energy",
        description="Estimate the inference energy of a spiking open_clip model and an ANN teacher on real "
                    "images: per-layer firing rates, accumulates (ACs), multiply-accumulates (MACs) and "
                    "energy per image, written to DIR/energy.json, energy.md and energy.png.",
    )
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="open_clip model config of the student, e.g. spikeclip-vit-s")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="student checkpoint (.safetensors or .pt). Without it the weights are random")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="WebDataset shards with images: a .tar file, a brace pattern such as "
                             "'test/{0..4}.tar', or a folder of .tar shards")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR",
                        help="folder for energy.json, energy.md and energy.png")

    parser.add_argument("--teacher", default=None, metavar="NAME",
                        help="open_clip model config of the ANN teacher (optional)")
    parser.add_argument("--teacher-pretrained", default=None, metavar="PATH",
                        help="teacher checkpoint. Without it the teacher's weights are random, which leaves "
                             "its MAC count unchanged")

    parser.add_argument("--num-images", type=positive_int, default=256,
                        help="images to profile, read in shard order (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default: %(default)s)")

    parser.add_argument("--mac-pj", type=positive_float, default=4.6,
                        help="energy of one multiply-accumulate in pJ (default: %(default)s, 45 nm CMOS estimate)")
    parser.add_argument("--ac-pj", type=positive_float, default=0.9,
                        help="energy of one accumulate in pJ (default: %(default)s, 45 nm CMOS estimate)")

    parser.add_argument("--text-source", choices=TEXT_SOURCES, default="none",
                        help="also profile the text towers: 'prompts' on --classnames x --templates, "
                             "'captions' on one 'txt' line of each image read (default: %(default)s)")
    parser.add_argument("--classnames", default=None, metavar="FILE",
                        help="class names file, one a line, for --text-source prompts")
    parser.add_argument("--templates", default=None, metavar="FILE",
                        help="prompt templates with a {c} placeholder, one a line, for --text-source prompts")
    parser.add_argument("--num-texts", type=positive_int, default=256,
                        help="maximum number of prompts to profile with --text-source prompts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the caption choice (default: %(default)s)")

    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: %(default)s)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """Parse the command line into a ``ProfileConfig`` and the logging level."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.text_source == "prompts" and not (args.classnames and args.templates):
        parser.error("--text-source prompts needs --classnames and --templates")
    if args.teacher_pretrained and not args.teacher:
        parser.error("--teacher-pretrained needs --teacher, the model config of that checkpoint")
    cfg = ProfileConfig(
        model=args.model,
        pretrained=args.pretrained,
        data=args.data,
        output=args.output,
        teacher=args.teacher,
        teacher_pretrained=args.teacher_pretrained,
        num_images=args.num_images,
        batch_size=args.batch_size,
        costs=EnergyCosts(mac_pj=args.mac_pj, ac_pj=args.ac_pj),
        device=args.device,
        text_source=args.text_source,
        classnames=args.classnames,
        templates=args.templates,
        num_texts=args.num_texts,
        seed=args.seed,
    )
    return cfg, args.log_level


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the profiler from the command line and return a process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, log_level = parse_args(argv)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    register()
    command = shlex.join(["python", "-m", "open_clip_spiking.energy", *argv])
    try:
        run_profile(cfg, command)
    except (ValueError, FileNotFoundError, ImportError) as error:
        _logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
