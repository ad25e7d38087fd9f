import logging
import subprocess
import sys

import open_clip
import pytest
import timm

import open_clip_spiking
from open_clip_spiking.registration import list_spiking_models

SPIKING_MODELS = list_spiking_models()


def _run_python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300)


def test_shipped_configs_present():
    assert {"spikeclip", "spikeclip-vit-s", "spikeclip-vit-t"} <= set(SPIKING_MODELS)


@pytest.mark.parametrize("name", SPIKING_MODELS)
def test_open_clip_lists_config(name):
    assert name in open_clip.list_models()


def test_timm_lists_image_towers():
    assert set(timm.list_models("spikeclip*")) >= {"spikeclip_vit_s", "spikeclip_vit_t", "spikeclip_vit_s_224"}


@pytest.mark.parametrize("name", SPIKING_MODELS)
def test_tokenizer_uses_spiking_context(name):
    tokenizer = open_clip.get_tokenizer(name)
    context_length = open_clip.get_model_config(name)["text_cfg"]["context_length"]
    tokens = tokenizer(["a photo of a cat", " ".join(["word"] * 100)])
    assert tokens.shape == (2, context_length)
    # A long prompt is truncated and still ends with the end-of-text token.
    assert tokens[1, -1].item() == tokenizer.eot_token_id


def test_startup_hook_is_light():
    result = _run_python(
        "import sys; print('open_clip_spiking' in sys.modules, 'torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


def test_import_open_clip_registers_without_user_code():
    result = _run_python("import open_clip; m = open_clip.create_model('spikeclip-vit-t'); print(type(m.text).__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SpikingTextMlp"


def test_explicit_import_registers_without_site(tmp_path):
    import site

    paths = [p for p in sys.path if p] + site.getsitepackages()
    code = (
        f"import sys; sys.path[:0] = {paths!r}; "
        "import open_clip_spiking, open_clip, timm; "
        "print('spikeclip-vit-s' in open_clip.list_models(), 'spikeclip_vit_s' in timm.list_models('spikeclip*'))"
    )
    result = _run_python(code, "-S")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_clip_benchmark_model_type():
    import clip_benchmark.models as models

    assert "spikeclip" in models.MODEL_TYPES
    model, transform, tokenizer = models.load_clip("spikeclip", "spikeclip-vit-t", None, None, device="cpu")
    assert not model.training
    assert tokenizer(["a dog"]).shape == (1, 20)


def test_register_is_idempotent():
    before = list(open_clip.list_models())
    open_clip_spiking.register()
    open_clip_spiking.register()
    assert open_clip.list_models() == before
    assert open_clip.model._build_text_tower.__wrapped__.__name__ == "_build_text_tower"


def test_import_leaves_root_logger_alone():
    result = _run_python("import logging, open_clip_spiking; open_clip_spiking.register(); print(len(logging.getLogger().handlers))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_unknown_model_error_lists_choices():
    from open_clip_spiking.train.models import build_student

    with pytest.raises(ValueError, match="unknown student model 'spikeclip-vit-q'; available: .*spikeclip-vit-s"):
        build_student("spikeclip-vit-q", None, device="cpu")


def test_other_open_clip_models_unchanged():
    model = open_clip.create_model("RN50", pretrained=None)
    assert type(model).__name__ == "CLIP"
    assert logging.getLogger("open_clip_spiking").handlers  # NullHandler only
