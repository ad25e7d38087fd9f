"""Helpers of the stages that train a classifier head made of class-prompt embeddings."""
from typing import Dict, Optional, Sequence

import torch

from .data import Collate, SampleDecoder, build_loader
from .distributed import all_reduce_sum
from .losses import cosine_logits
from .trainer import BadSampleCounter, autocast


def image_features(output) -> torch.Tensor:
    """Image features from an open_clip model's forward output (dict or tuple)."""
    return output["image_features"] if isinstance(output, dict) else output[0]


@torch.no_grad()
def evaluate_top1(
        model: torch.nn.Module,
        urls: Sequence[str],
        decoder: SampleDecoder,
        collate: Collate,
        image_field: str,
        classifier: torch.Tensor,
        batch_size: int,
        workers: int,
        device: torch.device,
        precision: str = "fp32",
        bad_samples: Optional[BadSampleCounter] = None,
) -> Dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` with a ``[C, D]`` class-embedding classifier.

    The model runs in eval mode and is returned to its previous mode; counts are summed over ranks.
    Bad samples are logged as they come and added to ``bad_samples`` once, after the ranks' counts
    are summed, so that every rank reaches the same verdict.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64)  # top-1 hits, top-5 hits, samples, bad samples, samples read
    try:
        loader = build_loader(urls, decoder, collate, batch_size, workers, shuffle=False, seed=0)
        for batch in loader:
            if bad_samples is not None:
                bad, seen = bad_samples.log(batch)
                counts[3:] += torch.tensor([bad, seen], dtype=torch.float64)
            if batch["size"] == 0:
                continue
            with autocast(precision, device):
                features = model.encode_image(batch[image_field].to(device))
            logits = cosine_logits(features, classifier, 1.0)
            labels = batch["label"].to(device)
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            counts[:3] += torch.tensor([
                (top[:, 0] == labels).sum().item(),
                (top == labels[:, None]).any(dim=-1).sum().item(),
                batch["size"],
            ], dtype=torch.float64)
    finally:
        model.train(was_training)
    counts = all_reduce_sum(counts.to(device)).cpu()
    if bad_samples is not None:
        bad_samples.add(int(counts[3].item()), int(counts[4].item()))
    samples = max(counts[2].item(), 1.0)
    return {"val_top1": counts[0].item() / samples, "val_top5": counts[1].item() / samples,
            "val_samples": int(counts[2].item())}
