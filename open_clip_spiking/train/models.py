"""Build the spiking student and the frozen teacher through open_clip's factory."""
import logging
from typing import Callable, Optional, Sequence, Tuple

import open_clip
import torch

from ..registration import list_spiking_models, register_all

_logger = logging.getLogger(__name__)

_SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


def _check_model_name(name: str, role: str, suggestions: str) -> None:
    if name.startswith(_SCHEMA_PREFIXES) or name in open_clip.list_models():
        return
    raise ValueError(f"unknown {role} model {name!r}; available: {suggestions}")


def build_student(
        model_name: str,
        pretrained: Optional[str],
        device: torch.device,
) -> Tuple[torch.nn.Module, Callable, Callable]:
    """Create the student with its eval-time preprocessing and tokenizer."""
    register_all()
    _check_model_name(model_name, "student", ", ".join(list_spiking_models()))
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    return model, preprocess, open_clip.get_tokenizer(model_name)


def build_teacher(
        model_name: str,
        pretrained: Optional[str],
        device: torch.device,
) -> Tuple[torch.nn.Module, Callable, Callable]:
    """Create a frozen teacher in eval mode with its own preprocessing and tokenizer."""
    register_all()
    _check_model_name(
        model_name,
        "teacher",
        "any name in open_clip.list_models() (for example ViT-B-16 with --teacher-pretrained openai), "
        "an hf-hub: or local-dir: model",
    )
    if pretrained is None and not model_name.startswith(_SCHEMA_PREFIXES):
        _logger.warning(
            "no --teacher-pretrained given: distilling from a randomly initialised %s; pass an open_clip "
            "pretrained tag or a checkpoint path", model_name,
        )
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model.eval()
    model.requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def embed_dim_of(model: torch.nn.Module, device: torch.device) -> int:
    """Width of the image embedding, read from one forward pass of a blank image in eval mode."""
    size = getattr(model.visual, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    was_training = model.training
    model.eval()
    try:
        features = model.encode_image(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
    return int(features.shape[-1])


def check_embed_dims(
        student: torch.nn.Module, student_name: str, teacher: torch.nn.Module, teacher_name: str, device: torch.device
) -> None:
    """Raise ValueError when the student's and teacher's embeddings differ in width."""
    student_dim = embed_dim_of(student, device)
    teacher_dim = embed_dim_of(teacher, device)
    if student_dim != teacher_dim:
        raise ValueError(
            f"student {student_name!r} embeds into {student_dim} dimensions but teacher {teacher_name!r} into "
            f"{teacher_dim}; choose a teacher that embeds into {student_dim} (ViT-B-16 and "
            f"lit-effnetlite0-minilm embed into 512), or add a copy of the student's config with "
            f"embed_dim {teacher_dim} through open_clip.add_model_config"
        )


@torch.no_grad()
def class_embeddings(
        model: torch.nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        templates: Sequence[str],
        device: torch.device,
) -> torch.Tensor:
    """Build the zero-shot classifier ``[num_classes, D]`` from the model's text tower, as clip_benchmark does.

    Each prompt embedding is L2-normalised, the prompts of a class are averaged over the templates and
    the mean is normalised again (``open_clip.build_zero_shot_classifier``). Classes are embedded one at
    a time, as clip_benchmark does: a spiking tower's output can change with the batch shape (a rounding
    difference that crosses a firing threshold), and equal shapes give clip_benchmark's classifier
    exactly. The model is put in eval mode for the computation and returned to its previous mode.
    """
    was_training = model.training
    model.eval()
    try:
        weights = open_clip.build_zero_shot_classifier(
            model,
            tokenizer=tokenizer,
            classnames=list(classnames),
            templates=[lambda c, template=template: template.format(c=c) for template in templates],
            num_classes_per_batch=1,
            device=device,
        )
    finally:
        model.train(was_training)
    return weights.T.contiguous().float()


def _teacher_text_embeddings(teacher: torch.nn.Module):
    text = getattr(teacher, "text", teacher)
    token = getattr(text, "token_embedding", None)
    position = getattr(text, "positional_embedding", None)
    if isinstance(token, torch.nn.Embedding) and isinstance(position, torch.Tensor):
        return token.weight, position
    return None


@torch.no_grad()
def init_text_embeddings_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> bool:
    """Copy the teacher's token embeddings and first position embeddings into the spiking text tower.

    SpikeCLIP starts its text tower from the teacher's embeddings. Both are multiplied by one factor
    that brings the token embeddings to unit standard deviation, so the input neurons fire. Returns
    False (and logs why) when the teacher has none of the same shape, for example a Hugging Face
    text tower.
    """
    text = getattr(student, "text", None)
    if text is None or not hasattr(text, "positional_embedding"):
        return False
    source = _teacher_text_embeddings(teacher)
    if source is None:
        _logger.info("teacher has no token embedding table; the student's text embeddings keep their random init")
        return False
    token, position = source
    student_position = text.positional_embedding
    if token.shape != text.token_embedding.weight.shape or position.shape[0] < student_position.shape[0] \
            or position.shape[1] != student_position.shape[1]:
        _logger.info(
            "teacher token embeddings %s and positions %s do not fit the student's %s and %s; keeping random init",
            tuple(token.shape), tuple(position.shape),
            tuple(text.token_embedding.weight.shape), tuple(student_position.shape),
        )
        return False
    # A transformer's embeddings are small (open_clip initialises them at 0.02), far below the input
    # LIF's threshold, so the copy is rescaled to unit standard deviation. Tokens and positions share
    # the factor, which keeps every angle between embeddings.
    scale = 1.0 / token.float().std().clamp_min(1e-12)
    text.token_embedding.weight.copy_(token * scale)
    student_position.copy_(position[: student_position.shape[0]] * scale)
    _logger.info("copied the teacher's token and position embeddings into the student's text tower, scaled by %.3g",
                 scale.item())
    return True
