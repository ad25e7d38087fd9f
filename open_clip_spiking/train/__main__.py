"""Command line: ``python -m open_clip_spiking.train --stage {align,align-text,teacher-finetune,finetune} ...``."""
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import register
from .config import parse_args

_logger = logging.getLogger("open_clip_spiking.train")


def _configure_logging(output_dir: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log", encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, run the requested stage and return a process exit code."""
    cfg = parse_args(argv)
    _configure_logging(cfg.output_dir)
    # Registering here makes the model names visible to torchrun ranks and data-loader workers too.
    register()
    from . import align, align_text, finetune, teacher_finetune
    from .trainer import TrainingError

    stages = {
        "align": align.run,
        "align-text": align_text.run,
        "teacher-finetune": teacher_finetune.run,
        "finetune": finetune.run,
    }
    try:
        stages[cfg.stage](cfg)
    except (ValueError, FileNotFoundError, TrainingError) as error:
        _logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
