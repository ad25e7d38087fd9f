"""Exact counts of the multiply-accumulates and spike-driven accumulates of a forward pass.

``OperationCounter`` runs inference under a ``TorchDispatchMode``, which receives every ATen operation
with its real operands. Module forward hooks name each operation after the innermost module running it:
a linear or convolution layer's own product takes the module's name, and other products take
``MODULE:matmulN`` or ``MODULE:attentionN.qk`` / ``.av``, numbered in call order within the module.

Counted operations and their dense multiply-accumulate (MAC) count, summed over every call:

* convolution (``aten.convolution``): output elements x ``C_in / groups`` x kernel size, so stride,
  dilation, padding and groups enter through the output shape. Products with padding zeros are
  included, as in ``torch.utils.flop_counter``. A transposed convolution counts input elements x
  ``C_out / groups`` x kernel size. Bias additions are not counted;
* matrix products (``aten.mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``, ``mv``, ``addmv``,
  ``dot``): M x K x N per product matrix. ``nn.Linear`` reaches ATen as ``mm`` or ``addmm``, and
  ``q @ k`` as ``bmm``. The added matrix of ``addmm`` is not counted;
* fused attention (``aten._scaled_dot_product_*_attention``): ``Q K^T`` and the product with V, as two
  entries of L x S x E and L x S x E_v per batch and head. They always count as MACs.

Spike tensors: the output of every spikingjelly neuron, and tensors made from one only by operations
that move, copy or select its values (views, ``clone``, ``expand``, ``stack``, zero padding, max
pooling). A product is driven by spikes when one operand is a spike tensor. Products with a zero spike
are skipped, and every other product is one accumulate (AC), because a 0/1 spike turns the multiply
into a conditional addition:

* spike x real operand: the number of non-zero spikes times their fan-out. For a linear layer this is
  ``nnz(input) x out_features``. For a convolution it is the exact number of kernel products that meet
  a non-zero input, found by convolving the non-zero mask with an all-ones kernel, so border inputs
  with a smaller fan-out are counted exactly;
* spike x spike operand (``K^T V`` or ``Q K^T`` in spiking self-attention): the number of products
  whose two factors are both non-zero, ``sum_k rows_a(k) x cols_b(k)`` over the contracted index k.

Products of two real operands count as MACs. BatchNorm is not counted because it folds into the
preceding convolution or linear layer at inference. Elementwise work (activations, residual additions,
pooling, scaling, neuron membrane updates) and embedding lookups are not counted either. The padding
zeros of a "same" padding layer count like any other input, because the padded tensor is the operand.
"""
import collections
import logging
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron
from torch.utils._python_dispatch import TorchDispatchMode

_logger = logging.getLogger(__name__)

__all__ = ["LayerOps", "OperationCounter"]

AC = "AC"
MAC = "MAC"

_aten = torch.ops.aten


@dataclass
class LayerOps:
    """Operation counts of one counted operation site, summed over every call.

    ``ops`` is the number of accumulates for ``kind == "AC"`` (spike-driven) or of multiply-accumulates
    for ``kind == "MAC"``. ``dense_macs`` counts every product of the same calls, as an ANN would.
    ``spike_nonzero`` and ``spike_elements`` hold one count per spike operand, in operand order.
    """

    name: str
    module: str
    module_type: str
    op: str
    kind: str
    ops: int = 0
    dense_macs: int = 0
    calls: int = 0
    spike_nonzero: List[int] = field(default_factory=list)
    spike_elements: List[int] = field(default_factory=list)

    @property
    def input_rates(self) -> List[float]:
        """Fraction of non-zero elements in each spike operand."""
        return [nonzero / elements if elements else 0.0
                for nonzero, elements in zip(self.spike_nonzero, self.spike_elements)]

    @property
    def effective_rate(self) -> float:
        """Share of the dense products that were executed: ``ops / dense_macs``."""
        return self.ops / self.dense_macs if self.dense_macs else 0.0


class _TensorSet:
    """Identity set of tensors that does not keep them alive and never compares values."""

    def __init__(self):
        self._refs: Dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self._refs[key] = weakref.ref(tensor, lambda _ref, key=key: self._refs.pop(key, None))

    def __contains__(self, tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor

    def clear(self) -> None:
        self._refs.clear()


# Operations whose output contains only values of their first tensor argument, so spikes stay spikes.
_SPIKE_PRESERVING = {
    _aten.view, _aten._unsafe_view, _aten.reshape, _aten._reshape_alias, _aten.t, _aten.transpose,
    _aten.permute, _aten.expand, _aten.clone, _aten.contiguous, _aten.unsqueeze, _aten.squeeze,
    _aten.flatten, _aten.select, _aten.slice, _aten.alias, _aten.detach, _aten._to_copy,
    _aten.as_strided, _aten.repeat, _aten.index_select, _aten.narrow, _aten.movedim,
    _aten.unbind, _aten.split, _aten.split_with_sizes, _aten.chunk,
    _aten.max_pool1d, _aten.max_pool2d, _aten.max_pool3d,
    _aten.max_pool2d_with_indices, _aten.max_pool3d_with_indices,
}
# Operations whose output is a spike tensor when every input tensor of the list is one.
_SPIKE_JOINING = {_aten.stack, _aten.cat}
# Operations that return indices next to values, so only their first output contains spikes.
_VALUES_AND_INDICES = {_aten.max_pool2d_with_indices, _aten.max_pool3d_with_indices}

_FUSED_ATTENTION = {
    getattr(_aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(_aten, name)
}
# Matrix products: overload packet -> positions of the two factors in the argument list.
_MATMUL_OPERANDS = {
    _aten.mm: (0, 1),
    _aten.bmm: (0, 1),
    _aten.addmm: (1, 2),
    _aten.baddbmm: (1, 2),
    _aten.addbmm: (1, 2),
    _aten.mv: (0, 1),
    _aten.addmv: (1, 2),
    _aten.dot: (0, 1),
}
_CONVOLUTIONS = {_aten.convolution, _aten._convolution}
# Substrings of ATen names that suggest multiply-accumulates outside the operations counted above.
_SUSPECT_NAME_PARTS = ("mm", "conv", "attention", "matmul", "linear", "einsum", "_mha")


def _matrix_view(tensor: torch.Tensor, as_row: bool) -> torch.Tensor:
    """View a 1-D factor of ``mv`` or ``dot`` as a matrix: a row for the left factor, else a column."""
    if tensor.dim() >= 2:
        return tensor
    return tensor.unsqueeze(0) if as_row else tensor.unsqueeze(-1)


def _matmul_counts(a: torch.Tensor, b: torch.Tensor, a_spike: bool, b_spike: bool) -> Tuple[int, int]:
    """Return ``(executed products, dense products)`` of ``a @ b`` with batch dims ``[..., M, K] @ [..., K, N]``.

    Products with a zero spike factor are skipped. Products of real factors are always executed.
    """
    a, b = _matrix_view(a, True), _matrix_view(b, False)
    rows, inner = a.shape[-2], a.shape[-1]
    columns = b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]).numel()
    dense = batch * rows * inner * columns
    if not (a_spike or b_spike):
        return dense, dense
    if a_spike and b_spike:
        # For each contracted index k, the non-zero products are (non-zero rows of a) x (non-zero columns of b).
        active_rows = (a != 0).sum(-2, dtype=torch.int64)  # [..., K]
        active_columns = (b != 0).sum(-1, dtype=torch.int64)  # [..., K]
        return int((active_rows * active_columns).sum()), dense
    if a_spike:
        factor_batch = a.shape[:-2].numel()
        return int(torch.count_nonzero(a)) * columns * (batch // factor_batch), dense
    factor_batch = b.shape[:-2].numel()
    return int(torch.count_nonzero(b)) * rows * (batch // factor_batch), dense


def _conv_counts(args: Sequence, output: torch.Tensor, input_spike: bool) -> Tuple[int, int]:
    """Return ``(executed products, dense products)`` of ``aten.convolution`` or ``aten._convolution``."""
    x, weight = args[0], args[1]
    stride, padding, dilation, transposed, output_padding, groups = args[3:9]
    kernel_products = weight.shape[1:].numel()  # C_in / groups x kernel for a convolution
    if transposed:
        # weight is [C_in, C_out / groups, *kernel]: every input element meets kernel_products weights.
        dense = x.numel() * kernel_products
        if not input_spike:
            return dense, dense
        return int(torch.count_nonzero(x)) * kernel_products, dense
    dense = output.numel() * kernel_products
    if not input_spike:
        return dense, dense
    # Convolving the non-zero mask with one all-ones kernel per group counts, at every output position,
    # the kernel products that meet a non-zero input. Each of the C_out / groups output channels of a
    # group repeats those products.
    mask = (x != 0).to(x.dtype)
    ones = torch.ones((groups, weight.shape[1], *weight.shape[2:]), dtype=x.dtype, device=x.device)
    hits = _aten.convolution(mask, ones, None, stride, padding, dilation, False, output_padding, groups)
    out_per_group = weight.shape[0] // groups
    return int(round(float(hits.sum(dtype=torch.float64)))) * out_per_group, dense


class _CountingMode(TorchDispatchMode):
    def __init__(self, counter: "OperationCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        self.counter._observe(func, args, kwargs, output)
        return output


@dataclass
class _Frame:
    name: str
    module: nn.Module
    op_index: collections.Counter = field(default_factory=collections.Counter)


class OperationCounter:
    """Count MACs and spike-driven ACs of every forward pass run inside the ``with`` block.

    Example::

        counter = OperationCounter(model)
        with torch.no_grad(), counter:
            model.encode_image(images)
        for layer in counter.layers():
            print(layer.name, layer.kind, layer.ops, layer.input_rates)

    The counts are totals over all calls, and they accumulate over every ``with`` block until
    ``reset()``. Divide them by the number of samples for per-sample figures. The rules are in this
    module's docstring. Spikes are recognised by where a tensor comes from, never by its values, so a
    real-valued tensor that contains only 0 and 1 still counts as MACs.

    While the block is open, ``torch.backends.mha`` fast path is disabled. Its fused kernel
    (``aten._native_multi_head_attention``) hides the attention products, and ``nn.MultiheadAttention``
    computes the same result without it.

    Args:
        model: Module whose submodules name the counted operations. Its spiking neurons produce the
            spike tensors.
        neuron_types: Module types whose outputs are spike tensors.
    """

    def __init__(
            self,
            model: nn.Module,
            neuron_types: Union[Type[nn.Module], Tuple[Type[nn.Module], ...]] = neuron.BaseNode,
    ):
        self.model = model
        self.neuron_types = neuron_types
        self._layers: Dict[Tuple[str, str], LayerOps] = {}
        self._spikes = _TensorSet()
        self._stack: List[_Frame] = []
        self._handles = []
        self._mode: Optional[_CountingMode] = None
        self._fastpath_was_enabled: Optional[bool] = None
        self.uncounted_ops: Dict[str, int] = {}

    # --- context --------------------------------------------------------------------------------

    def __enter__(self) -> "OperationCounter":
        if self._mode is not None:
            raise RuntimeError("this OperationCounter is already active; it cannot be entered twice")
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._pop_frame, always_call=True))
            if isinstance(module, self.neuron_types):
                self._handles.append(module.register_forward_hook(self._mark_spikes))
        self._fastpath_was_enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        try:
            self._mode.__exit__(exc_type, exc_value, traceback)
        finally:
            self._mode = None
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._stack.clear()
            self._spikes.clear()
            torch.backends.mha.set_fastpath_enabled(self._fastpath_was_enabled)
        return False

    def reset(self) -> None:
        """Drop the counts collected so far."""
        self._layers.clear()
        self.uncounted_ops.clear()

    # --- results --------------------------------------------------------------------------------

    def layers(self) -> List[LayerOps]:
        """Return one entry per operation site and kind, in the order they first ran."""
        return list(self._layers.values())

    def total(self, kind: str) -> int:
        """Return the summed ``ops`` of the entries of one kind, ``"AC"`` or ``"MAC"``."""
        return sum(layer.ops for layer in self._layers.values() if layer.kind == kind)

    # --- hooks ----------------------------------------------------------------------------------

    def _make_pre_hook(self, name: str):
        def push_frame(module, _args):
            self._stack.append(_Frame(name, module))

        return push_frame

    def _pop_frame(self, module, _args, _output):
        # always_call=True runs this after an exception too, so the stack stays balanced.
        if self._stack and self._stack[-1].module is module:
            self._stack.pop()

    def _mark_spikes(self, _module, _args, output):
        if isinstance(output, torch.Tensor):
            self._spikes.add(output)

    # --- dispatch -------------------------------------------------------------------------------

    def _is_spike(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value in self._spikes

    def _observe(self, func, args, kwargs, output) -> None:
        packet = func.overloadpacket
        if packet in _MATMUL_OPERANDS:
            self._count_matmul(packet, args)
        elif packet in _CONVOLUTIONS:
            self._count_conv(args, output)
        elif packet in _FUSED_ATTENTION:
            self._count_fused_attention(args)
        elif packet in _SPIKE_PRESERVING:
            self._propagate(packet, args, output)
        elif packet in _SPIKE_JOINING:
            tensors = args[0]
            if tensors and all(self._is_spike(tensor) for tensor in tensors):
                self._spikes.add(output)
        elif packet is _aten.constant_pad_nd:
            value = args[2] if len(args) > 2 else kwargs.get("value", 0)
            if value == 0 and self._is_spike(args[0]):
                self._spikes.add(output)
        else:
            self._check_uncounted(func)

    def _propagate(self, packet, args, output) -> None:
        if not args or not self._is_spike(args[0]):
            return
        if packet in _VALUES_AND_INDICES:
            self._spikes.add(output[0])
        elif isinstance(output, torch.Tensor):
            self._spikes.add(output)
        else:
            for tensor in output:
                self._spikes.add(tensor)

    def _check_uncounted(self, func) -> None:
        name = str(func.overloadpacket)
        base = name.rsplit(".", 1)[-1]
        if any(part in base for part in _SUSPECT_NAME_PARTS):
            if name not in self.uncounted_ops:
                _logger.warning(
                    "operation %s is not counted, so its multiply-accumulates are missing from the totals", name
                )
            self.uncounted_ops[name] = self.uncounted_ops.get(name, 0) + 1

    def _site(self, label: str) -> Tuple[str, str, str]:
        """Name the current operation site: ``(display name, module path, module type)``."""
        if not self._stack:
            return f"(outside modules):{label}", "", ""
        frame = self._stack[-1]
        index = frame.op_index[label]
        frame.op_index[label] += 1
        module_name = frame.name or type(frame.module).__name__
        own_op = (label == "conv" and isinstance(frame.module, nn.modules.conv._ConvNd)) or (
            label == "matmul" and isinstance(frame.module, nn.Linear)
        )
        name = module_name if own_op and index == 0 else f"{module_name}:{label}{index}"
        return name, frame.name, type(frame.module).__name__

    def _record(self, site, op: str, ops: int, dense: int, spike_operands: Sequence[torch.Tensor]) -> None:
        name, module, module_type = site
        kind = AC if spike_operands else MAC
        entry = self._layers.get((name, kind))
        if entry is None:
            entry = LayerOps(
                name=name,
                module=module,
                module_type=module_type,
                op=op,
                kind=kind,
                spike_nonzero=[0] * len(spike_operands),
                spike_elements=[0] * len(spike_operands),
            )
            self._layers[(name, kind)] = entry
        entry.ops += ops
        entry.dense_macs += dense
        entry.calls += 1
        for position, tensor in enumerate(spike_operands):
            entry.spike_nonzero[position] += int(torch.count_nonzero(tensor))
            entry.spike_elements[position] += tensor.numel()

    def _count_matmul(self, packet, args) -> None:
        left, right = (args[position] for position in _MATMUL_OPERANDS[packet])
        left_spike, right_spike = self._is_spike(left), self._is_spike(right)
        ops, dense = _matmul_counts(left, right, left_spike, right_spike)
        spikes = [tensor for tensor, spike in ((left, left_spike), (right, right_spike)) if spike]
        self._record(self._site("matmul"), "matmul", ops, dense, spikes)

    def _count_conv(self, args, output) -> None:
        input_spike = self._is_spike(args[0])
        ops, dense = _conv_counts(args, output, input_spike)
        self._record(self._site("conv"), "conv", ops, dense, [args[0]] if input_spike else [])

    def _count_fused_attention(self, args) -> None:
        query, key, value = args[0], args[1], args[2]
        batch = query.shape[:-2].numel()
        target_length, embed = query.shape[-2], query.shape[-1]
        source_length, value_embed = key.shape[-2], value.shape[-1]
        name, module, module_type = self._site("attention")
        qk = batch * target_length * source_length * embed
        av = batch * target_length * source_length * value_embed
        self._record((f"{name}.qk", module, module_type), "attention_qk", qk, qk, [])
        self._record((f"{name}.av", module, module_type), "attention_av", av, av, [])
