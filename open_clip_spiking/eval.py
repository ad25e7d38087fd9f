"""Zero-shot accuracy under changed label sets: ``python -m open_clip_spiking.eval``.

Scores any open_clip model (a spiking student, a teacher, a fine-tuned checkpoint) on labelled
WebDataset shards with its text tower's class-prompt classifier, under up to four label sets built
from the same images:

* ``original``: the dataset's class names;
* ``synonyms``: each class renamed by ``--synonyms`` (a file in label order, one name a line);
* ``distractors``: the class names plus the ``--distractors`` names, extra classes without images
  that the model may wrongly pick;
* ``synonyms+distractors``: both changes at once.

Image features are computed once and every label set reuses them. Results go to ``--output`` as
JSON and to the terminal as a table.
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ._cli import HelpFormatter, positive_int

_logger = logging.getLogger("open_clip_spiking.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m open_clip_spiking.eval",
        description="Top-1/top-5 zero-shot accuracy of an open_clip model with the original, renamed or "
                    "expanded class list.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. spikeclip-vit-s")
    parser.add_argument("--pretrained", default=None, help="checkpoint path or open_clip pretrained tag")
    parser.add_argument("--data", required=True,
                        help="labelled .tar shards ('cls' field): brace pattern, '::'-separated list, glob or folder")
    parser.add_argument("--classnames", required=True,
                        help="class names file in label order, or a clip_benchmark dataset folder holding "
                             "classnames.txt and zeroshot_classification_templates.txt")
    parser.add_argument("--templates", default=None,
                        help="prompt templates file, one a line, each with '{c}'; read from the --classnames "
                             "folder when omitted")
    parser.add_argument("--synonyms", default=None,
                        help="replacement class names, one a line in label order (as many as --classnames)")
    parser.add_argument("--distractors", default=None,
                        help="extra class names without images, one a line, appended to the class list")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="score only the first N images")
    parser.add_argument("--device", default=None, help="torch device; cuda when available, else cpu")
    return parser


def _label_sets(classnames: List[str], synonyms: Optional[List[str]], distractors: Optional[List[str]],
                args: argparse.Namespace) -> Dict[str, List[str]]:
    sets = {"original": classnames}
    if synonyms is not None:
        if len(synonyms) != len(classnames):
            raise ValueError(
                f"--synonyms {args.synonyms} lists {len(synonyms)} names but --classnames has {len(classnames)}; "
                f"give one replacement a class, in label order"
            )
        sets["synonyms"] = synonyms
    if distractors is not None:
        for name, base in (("distractors", classnames), ("synonyms+distractors", synonyms)):
            if base is None:
                continue
            clashes = sorted(set(distractors) & set(base))
            if clashes:
                raise ValueError(
                    f"--distractors {args.distractors} repeats class names {clashes}; distractors must be new classes"
                )
            sets[name] = base + distractors
    return sets


@torch.no_grad()
def image_features_and_labels(model, urls, preprocess, classnames, batch_size, workers, device, max_samples=None):
    """Return normalised image features ``[N, D]``, labels ``[N]`` and bad-sample records of labelled shards."""
    from .train.data import Collate, SampleDecoder, build_loader

    decoder = SampleDecoder(image_transforms={"image": preprocess}, classnames=classnames, require_label=True)
    loader = build_loader(urls, decoder, Collate(image_fields=("image",)), batch_size, workers, shuffle=False, seed=0)
    features, labels, bad = [], [], []
    count = 0
    for batch in loader:
        bad.extend(batch["bad"])
        if batch["size"] == 0:
            continue
        features.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        labels.append(batch["label"])
        count += batch["size"]
        if max_samples is not None and count >= max_samples:
            break
    if not features:
        raise ValueError(f"no usable labelled images in {len(urls)} shards; first problems: {bad[:3]}")
    features_all, labels_all = torch.cat(features), torch.cat(labels)
    if max_samples is not None:
        features_all, labels_all = features_all[:max_samples], labels_all[:max_samples]
    return features_all, labels_all, bad


def accuracy(features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> Dict[str, float]:
    """Return the top-1 and top-5 accuracy of cosine logits against a ``[C, D]`` classifier."""
    logits = features @ classifier.T
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return {
        "top1": (top[:, 0] == labels).float().mean().item(),
        "top5": (top == labels[:, None]).any(dim=-1).float().mean().item(),
    }


def evaluate(args: argparse.Namespace) -> Dict:
    import open_clip

    from . import register
    from .train.config import resolve_class_files
    from .train.data import expand_urls, load_classnames, load_templates
    from .train.models import class_embeddings

    register()
    classnames_path, templates_path = resolve_class_files(args.classnames, args.templates)
    if templates_path is None:
        raise ValueError(f"--classnames {args.classnames} is a file; pass --templates too, or a clip_benchmark "
                         f"dataset folder as --classnames")
    urls = expand_urls(args.data)
    classnames = load_classnames(classnames_path)
    templates = load_templates(templates_path)
    synonyms = load_classnames(args.synonyms) if args.synonyms else None
    distractors = load_classnames(args.distractors) if args.distractors else None
    label_sets = _label_sets(classnames, synonyms, distractors, args)
    if args.model not in open_clip.list_models():
        raise ValueError(f"unknown model {args.model!r}; pass a name from open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(args.model)
    if args.pretrained and args.pretrained not in tags and not Path(args.pretrained).is_file():
        known = f"; pretrained tags of {args.model}: {', '.join(tags)}" if tags else ""
        raise FileNotFoundError(f"--pretrained {args.pretrained} is neither a checkpoint file nor a pretrained "
                                f"tag{known}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained,
                                                                 device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    features, labels, bad = image_features_and_labels(model, urls, preprocess, classnames, args.batch_size,
                                                      args.workers, device, args.max_samples)
    for url, key, reason in bad[:20]:
        _logger.warning("skipped bad sample %s in %s: %s", key, url, reason)
    results = {}
    for name, names in label_sets.items():
        classifier = class_embeddings(model, tokenizer, names, templates, device).cpu()
        results[name] = {**accuracy(features, labels, classifier), "num_classes": len(names)}
        _logger.info("%s (%d classes): top-1 %.4f", name, len(names), results[name]["top1"])
    return {
        "model": args.model,
        "pretrained": args.pretrained,
        "data": args.data,
        "samples": int(labels.numel()),
        "bad_samples": len(bad),
        "templates": len(templates),
        "label_sets": results,
    }


def format_table(report: Dict) -> str:
    lines = ["| label set | classes | top-1 | top-5 |", "|---|---:|---:|---:|"]
    for name, result in report["label_sets"].items():
        lines.append(f"| {name} | {result['num_classes']} | {100 * result['top1']:.2f}% | "
                     f"{100 * result['top5']:.2f}% |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        report = evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        _logger.error("%s", error)
        return 2
    print(f"{report['model']} on {report['samples']} images of {report['data']}")
    print(format_table(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
