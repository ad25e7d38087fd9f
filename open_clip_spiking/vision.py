"""Spiking vision transformer of SpikeCLIP, registered as timm architectures.

The tower follows the SpikeCLIP image encoder (Lv, Li et al., Neural Networks 188, 2025):

* a spiking patch tokenizer of five 3x3 convolutions, each followed by BatchNorm and a multi-step LIF
  neuron, with max-pools that shrink the image by ``patch_size`` (32x32 input, patch 4 -> 8x8 tokens);
* ``depth`` blocks of softmax-free spiking self-attention ``(Q K^T) V * scale`` followed by an LIF with
  threshold 0.5, and a spiking MLP; every convolution or linear layer is fed by an LIF ("spike-driven"
  residual) and the residual stream carries the real-valued BatchNorm outputs;
* the output tokens, combined over the T time steps by a learned weighted sum.

The image is encoded directly: the first convolution receives the analog image at every time step. Its
output is the same at every step, so it is computed once and broadcast over T.

Layout: building blocks, the model, pretrained cfgs, the builder, then the timm entry points.
"""
import logging
import math
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .neurons import NeuronCfg, TimeWeightedSum, checkpoint_segment, create_lif, fold_time, unfold_time
from .registration import timm_model_overrides

_logger = logging.getLogger(__name__)

__all__ = ["SpikingVisionTransformer"]

# Threshold of the LIF that follows the attention product, as in the SpikeCLIP encoder.
ATTN_V_THRESHOLD = 0.5


def _bn_tokens(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the channel axis of ``[..., C]`` tokens."""
    shape = x.shape
    return bn(x.reshape(-1, shape[-1])).reshape(shape)


class SpikingPatchTokenizer(nn.Module):
    """Five 3x3 convolutions with BatchNorm and LIF that turn an image into ``[T, B, N, C]`` tokens.

    Channels grow as C/8, C/4, C/2, C, C. ``patch_size`` must be a power of two up to 16: each factor
    of two is a 2x2 max-pool, placed after the last of the first four convolutions. The fifth
    convolution is a relative position embedding added to its own input.
    """

    def __init__(
            self,
            img_size: Tuple[int, int],
            patch_size: int,
            in_chans: int,
            embed_dim: int,
            time_steps: int,
            neuron_cfg: NeuronCfg,
    ):
        super().__init__()
        num_pools = int(math.log2(patch_size)) if patch_size > 0 else -1
        if patch_size < 1 or 2 ** num_pools != patch_size or num_pools > 4:
            raise ValueError(f"patch_size must be one of 1, 2, 4, 8, 16, got {patch_size}")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 for the tokenizer channels, got {embed_dim}")
        self.time_steps = time_steps
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        chans = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.convs = nn.ModuleList(
            [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False) for i in range(4)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(chans[i + 1]) for i in range(4)])
        pooled = set(range(4 - num_pools, 4))
        self.pools = nn.ModuleList(
            [nn.MaxPool2d(2) if i in pooled else nn.Identity() for i in range(4)]
        )
        # Neurons feed convolutions 1, 2, 3 and the position-embedding convolution.
        self.lifs = nn.ModuleList([create_lif(neuron_cfg) for _ in range(4)])
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dim)
        self.grad_checkpointing = False

    def _stage(self, i: int, x_seq: torch.Tensor) -> torch.Tensor:
        """LIF, convolution ``i``, BatchNorm and pooling of ``[T, B, C, H, W]`` features."""
        s = fold_time(self.lifs[i - 1](x_seq))
        return unfold_time(self.pools[i](self.bns[i](self.convs[i](s))), self.time_steps)

    def _position(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Add the relative position embedding computed from the spikes of ``x_seq``."""
        s = fold_time(self.lifs[3](x_seq))
        return x_seq + unfold_time(self.rpe_bn(self.rpe_conv(s)), self.time_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.time_steps
        # Direct encoding: conv 0 receives the same analog image at every step, so it runs once.
        x = self.pools[0](self.bns[0](self.convs[0](x)))  # [B, C/8, H, W]
        x_seq = x.unsqueeze(0).expand(T, *x.shape)  # [T, B, C/8, H, W]
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for i in range(1, 4):
            if checkpointed:
                x_seq = checkpoint_segment(partial(self._stage, i), x_seq, self.lifs[i - 1], self.bns[i])
            else:
                x_seq = self._stage(i, x_seq)
        # x_seq: [T, B, C, H', W'] real-valued features
        if checkpointed:
            x_seq = checkpoint_segment(self._position, x_seq, self.lifs[3], self.rpe_bn)
        else:
            x_seq = self._position(x_seq)
        return x_seq.flatten(3).transpose(2, 3)  # [T, B, N, C]


class SpikingSelfAttention(nn.Module):
    """Softmax-free spiking self-attention: ``LIF((Q K^T) V * scale)`` with spiking Q, K and V."""

    def __init__(self, dim: int, num_heads: int, neuron_cfg: NeuronCfg, scale: float = 0.125):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale
        self.in_lif = create_lif(neuron_cfg)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bn = nn.BatchNorm1d(dim)
        self.k_bn = nn.BatchNorm1d(dim)
        self.v_bn = nn.BatchNorm1d(dim)
        self.q_lif = create_lif(neuron_cfg)
        self.k_lif = create_lif(neuron_cfg)
        self.v_lif = create_lif(neuron_cfg)
        self.attn_lif = create_lif(neuron_cfg, v_threshold=ATTN_V_THRESHOLD)
        self.proj = nn.Linear(dim, dim)
        self.proj_bn = nn.BatchNorm1d(dim)

    def _spiking_heads(self, s: torch.Tensor, proj: nn.Linear, bn: nn.BatchNorm1d, lif: nn.Module):
        T, B, N, C = s.shape
        x = _bn_tokens(bn, proj(s))
        x = lif(x)
        return x.reshape(T * B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [T*B, H, N, d]

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        T, B, N, C = x_seq.shape
        s = self.in_lif(x_seq)
        q = self._spiking_heads(s, self.q_proj, self.q_bn, self.q_lif)
        k = self._spiking_heads(s, self.k_proj, self.k_bn, self.k_lif)
        v = self._spiking_heads(s, self.v_proj, self.v_bn, self.v_lif)
        # Without softmax the product is associative, so take the cheaper order. Spike counts are
        # small integers, exact in float32 either way.
        if self.head_dim < N:
            x = q @ (k.transpose(-2, -1) @ v)
        else:
            x = (q @ k.transpose(-2, -1)) @ v
        x = x * self.scale  # [T*B, H, N, d]
        x = x.transpose(1, 2).reshape(T, B, N, C)
        s = self.attn_lif(x)
        return _bn_tokens(self.proj_bn, self.proj(s))


class SpikingMlp(nn.Module):
    """``LIF -> Linear -> BN -> LIF -> Linear -> BN`` over ``[T, B, N, C]`` tokens."""

    def __init__(self, dim: int, hidden_dim: int, neuron_cfg: NeuronCfg):
        super().__init__()
        self.in_lif = create_lif(neuron_cfg)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.hidden_lif = create_lif(neuron_cfg)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.bn2 = nn.BatchNorm1d(dim)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        x = _bn_tokens(self.bn1, self.fc1(self.in_lif(x_seq)))
        return _bn_tokens(self.bn2, self.fc2(self.hidden_lif(x)))


class SpikingBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, neuron_cfg: NeuronCfg, attn_scale: float):
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads, neuron_cfg, scale=attn_scale)
        self.mlp = SpikingMlp(dim, int(dim * mlp_ratio), neuron_cfg)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        x_seq = x_seq + self.attn(x_seq)
        return x_seq + self.mlp(x_seq)


class SpikingVisionTransformer(nn.Module):
    """SpikeCLIP image encoder with timm's classifier interface.

    Args:
        img_size: Input image size.
        patch_size: Downsampling factor of the tokenizer (power of two up to 16).
        in_chans: Number of image channels.
        num_classes: Size of the classifier head; 0 gives pooled features.
        global_pool: ``'avg'`` (mean over tokens) or ``''`` (return tokens).
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        time_steps: Number of simulation time steps T.
        tau: Membrane time constant of the LIF neurons.
        v_threshold: Firing threshold of the LIF neurons (the attention neuron uses 0.5).
        v_reset: Reset potential of the hard reset.
        detach_reset: Keep the reset out of the autograd graph.
        surrogate: Surrogate gradient: ``'sigmoid'``, ``'atan'`` or ``'piecewise_quadratic'``.
        surrogate_alpha: Sharpness of the surrogate gradient.
        attn_scale: Scale applied to ``(Q K^T) V``.
        drop_rate: Dropout before the classifier head.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 384,
            depth: int = 4,
            num_heads: int = 8,
            mlp_ratio: float = 4.0,
            time_steps: int = 4,
            tau: float = 2.0,
            v_threshold: float = 1.0,
            v_reset: float = 0.0,
            detach_reset: bool = True,
            surrogate: str = "sigmoid",
            surrogate_alpha: float = 4.0,
            attn_scale: float = 0.125,
            drop_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if time_steps < 1:
            raise ValueError(f"time_steps must be at least 1, got {time_steps}")
        img_size = to_2tuple(img_size)
        neuron_cfg = NeuronCfg(
            tau=tau,
            v_threshold=v_threshold,
            v_reset=v_reset,
            detach_reset=detach_reset,
            surrogate=surrogate,
            surrogate_alpha=surrogate_alpha,
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.time_steps = time_steps
        self.grad_checkpointing = False

        self.patch_embed = SpikingPatchTokenizer(img_size, patch_size, in_chans, embed_dim, time_steps, neuron_cfg)
        self.blocks = nn.Sequential(
            *[SpikingBlock(embed_dim, num_heads, mlp_ratio, neuron_cfg, attn_scale) for _ in range(depth)]
        )
        self.time_weight = TimeWeightedSum(time_steps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"time_weight.weight"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^time_weight", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each tokenizer stage and each block in the backward pass instead of storing its
        activations; open_clip's ``CLIP.set_grad_checkpointing`` calls this."""
        self.grad_checkpointing = enable
        self.patch_embed.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images ``[B, C, H, W]`` into tokens ``[B, N, C]``, combined over time steps.

        The neuron state is reset first, so the output never depends on an earlier batch.
        """
        functional.reset_net(self)
        x_seq = self.patch_embed(x)  # [T, B, N, C]
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x_seq = checkpoint_segment(block, x_seq, block)
        else:
            x_seq = self.blocks(x_seq)
        # The token mean and the time weighting are both linear, so their order does not matter.
        return self.time_weight(x_seq)  # [B, N, C]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        # open_clip normalises with the OpenAI CLIP statistics by default; the student is trained that way.
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "first_conv": "patch_embed.convs.0",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "spikeclip_vit_s.untrained": _cfg(),
    "spikeclip_vit_t.untrained": _cfg(),
    "spikeclip_vit_s_224.untrained": _cfg(input_size=(3, 224, 224)),
})


def _create_spiking_vit(variant: str, model_args: dict, pretrained: bool = False, **kwargs) -> SpikingVisionTransformer:
    # Precedence: the variant's defaults, then keys from an open_clip config's timm_model_kwargs,
    # then the caller's keyword arguments.
    kwargs = {**model_args, **timm_model_overrides(), **kwargs}
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if not (overlay.get("file") or overlay.get("state_dict")):
            raise ValueError(
                f"no pretrained weights are published for {variant!r}; train a student with "
                "'python -m open_clip_spiking.train' and load it with "
                "open_clip.create_model(..., pretrained=PATH), or pass "
                "pretrained_cfg_overlay=dict(file=PATH) to timm.create_model"
            )
    return build_model_with_cfg(SpikingVisionTransformer, variant, pretrained, **kwargs)


@register_model
def spikeclip_vit_s(pretrained: bool = False, **kwargs) -> SpikingVisionTransformer:
    """Build the SpikeCLIP reference image encoder: 32x32 input, 8x8 tokens, 4 blocks of width 384, 8 heads, T=4."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=384, depth=4, num_heads=8, mlp_ratio=4.0, time_steps=4)
    return _create_spiking_vit("spikeclip_vit_s", model_args, pretrained=pretrained, **kwargs)


@register_model
def spikeclip_vit_t(pretrained: bool = False, **kwargs) -> SpikingVisionTransformer:
    """Build a tiny encoder for tests and quick runs: 32x32 input, 1 block of width 64, 2 heads, T=2."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2.0, time_steps=2)
    return _create_spiking_vit("spikeclip_vit_t", model_args, pretrained=pretrained, **kwargs)


@register_model
def spikeclip_vit_s_224(pretrained: bool = False, **kwargs) -> SpikingVisionTransformer:
    """Build the reference encoder for 224x224 input with patch 16 (14x14 tokens)."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=8, mlp_ratio=4.0, time_steps=4)
    return _create_spiking_vit("spikeclip_vit_s_224", model_args, pretrained=pretrained, **kwargs)
