"""Energy estimates from operation counts, and the JSON, Markdown and PNG outputs of the profiler.

Energy per sample is ``ACs x ac_pj + MACs x mac_pj``. The defaults, 4.6 pJ per multiply-accumulate and
0.9 pJ per accumulate, are 45 nm CMOS estimates for 32-bit floating point that SNN papers commonly use
to compare an SNN with an ANN. They cover arithmetic alone, so memory access, data movement and neuron
membrane updates are not included.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .counting import AC, MAC, LayerOps
from .stats import NeuronStats

__all__ = [
    "CONVENTIONS",
    "EnergyCosts",
    "tower_report",
    "write_figure",
    "write_json",
    "write_markdown",
]

PJ_PER_MJ = 1e9

# Counting rules, written into energy.json and energy.md so that every output states them.
CONVENTIONS = (
    "Counts are per sample (image or text): totals over all batches divided by the number of samples.",
    "MACs of a layer are its dense multiply-accumulates: output elements x C_in/groups x kernel size for a "
    "convolution (stride, padding, dilation and groups enter through the output shape, and products with "
    "padding zeros are included), M x K x N for a linear layer or matrix product. Bias additions are not "
    "counted.",
    "A layer is fed by spikes when its input comes from a spikingjelly neuron, through views, copies, "
    "stacking, zero padding or max pooling only. Its accumulates (ACs, synaptic operations) are the products "
    "whose spike factor is non-zero, counted exactly: nnz(input) x out_features for a linear layer, and for "
    "a convolution the kernel products that meet a non-zero input, so border inputs with a smaller fan-out "
    "count correctly.",
    "Time steps enter once, through the tensors: spiking layers run on [T*B, ...] inputs, so their dense MACs "
    "are T x the MACs of one step, and ACs = effective rate x dense MACs = T x effective rate x MACs per step. "
    "For a linear layer the effective rate equals the input firing rate.",
    "Input firing rate: non-zero elements / all elements of the spike input, over all T time steps and all "
    "samples. Neuron firing rates are the same ratio for each neuron layer's output.",
    "Spiking self-attention computes Q (K^T V) when head_dim < tokens, else (Q K^T) V. The product of two spike "
    "tensors (K^T V, or Q K^T) counts the products whose two factors are both non-zero, and lists both "
    "operands' rates. The product with the real-valued intermediate (Q M, or M V) is fed by the spikes of Q "
    "(or V) and counts nnz x the other dimension. The scale multiplication is not counted.",
    "Layers fed by real values count MACs: the first convolution, which vision.py runs once per image on the "
    "analog image and broadcasts over T, and the projection into the embedding space.",
    "BatchNorm folds into the preceding convolution or linear layer at inference, so it adds no operations. "
    "Activations, pooling, residual additions, the weighted sum over time steps and the neuron membrane "
    "updates are elementwise and not counted. Embedding lookups are not counted.",
    "Teacher (ANN): every convolution, linear layer and attention product counts MACs, including Q K^T and "
    "the product with V of each attention layer.",
)


@dataclass(frozen=True)
class EnergyCosts:
    """Energy of one operation in picojoules."""

    mac_pj: float = 4.6
    ac_pj: float = 0.9
    technology: str = "45 nm CMOS estimate for 32-bit floating point"

    def energy_pj(self, kind: str, ops: float) -> float:
        return ops * (self.ac_pj if kind == AC else self.mac_pj)


def _layer_entry(layer: LayerOps, num_items: int, costs: EnergyCosts, time_steps: Optional[int]) -> Dict[str, Any]:
    ops = layer.ops / num_items
    dense = layer.dense_macs / num_items
    spike_fed = layer.kind == AC
    return {
        "name": layer.name,
        "module": layer.module,
        "module_type": layer.module_type,
        "op": layer.op,
        "kind": layer.kind,
        "ops": ops,
        "dense_macs": dense,
        # A spiking layer runs on every time step, so one step is a T-th of its dense MACs.
        "macs_per_step": dense / time_steps if spike_fed and time_steps else None,
        "input_rates": layer.input_rates,
        "effective_rate": layer.effective_rate,
        "energy_mj": costs.energy_pj(layer.kind, ops) / PJ_PER_MJ,
        "calls": layer.calls,
    }


def tower_report(
        layers: Sequence[LayerOps],
        num_items: int,
        costs: EnergyCosts,
        model: str,
        pretrained: Optional[str],
        time_steps: Optional[int] = None,
        neuron_stats: Optional[Mapping[str, NeuronStats]] = None,
        uncounted_ops: Optional[Mapping[str, int]] = None,
) -> Dict[str, Any]:
    """Turn the counts of one tower into per-sample operations and energy, per layer and in total."""
    if num_items < 1:
        raise ValueError(f"num_items must be at least 1, got {num_items}")
    entries = [_layer_entry(layer, num_items, costs, time_steps) for layer in layers]
    acs = sum(entry["ops"] for entry in entries if entry["kind"] == AC)
    macs = sum(entry["ops"] for entry in entries if entry["kind"] == MAC)
    report = {
        "model": model,
        "pretrained": pretrained,
        "num_items": num_items,
        "time_steps": time_steps,
        "acs": acs,
        "macs": macs,
        "dense_macs": sum(entry["dense_macs"] for entry in entries),
        "energy_ac_mj": costs.energy_pj(AC, acs) / PJ_PER_MJ,
        "energy_mac_mj": costs.energy_pj(MAC, macs) / PJ_PER_MJ,
        "energy_mj": (costs.energy_pj(AC, acs) + costs.energy_pj(MAC, macs)) / PJ_PER_MJ,
        "layers": entries,
        "uncounted_ops": dict(uncounted_ops or {}),
    }
    if neuron_stats is not None:
        ran = {name: stats for name, stats in neuron_stats.items() if stats.calls}
        spikes = sum(stats.spikes for stats in ran.values())
        elements = sum(stats.elements for stats in ran.values())
        report["mean_firing_rate"] = spikes / elements if elements else 0.0
        report["neurons"] = [
            {
                "name": name,
                "rate": stats.rate,
                "step_rates": list(stats.step_rates) if stats.step_rates is not None else None,
                "spikes_per_item": stats.spikes / num_items,
                "neurons_per_item": stats.elements / num_items,
            }
            for name, stats in ran.items()
        ]
    return report


# --- JSON ------------------------------------------------------------------------------------------

def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """Write the report as indented JSON, through a temporary file so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- Markdown --------------------------------------------------------------------------------------

def _format_count(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.3e}"
    return f"{value:,.2f}"


def _format_rates(rates: Sequence[float]) -> str:
    return " x ".join(f"{rate:.4f}" for rate in rates) if rates else "-"


def _totals_rows(report: Mapping[str, Any]) -> List[str]:
    rows = []
    for section, label in (("student", "image"), ("teacher", "image")):
        tower = report.get(section)
        if tower:
            rows.append(_total_row(f"{section} {label}", tower))
    text = report.get("text") or {}
    for section in ("student", "teacher"):
        tower = text.get(section)
        if tower:
            rows.append(_total_row(f"{section} text", tower))
    return rows


def _total_row(label: str, tower: Mapping[str, Any]) -> str:
    return (
        f"| {label} | `{tower['model']}` | {tower['time_steps'] or '-'} | {_format_count(tower['acs'])} | "
        f"{_format_count(tower['macs'])} | {_format_count(tower['dense_macs'])} | {tower['energy_mj']:.4g} |"
    )


def _layer_table(tower: Mapping[str, Any]) -> List[str]:
    lines = [
        "| layer | kind | input firing rate | effective rate | MACs per step | ops per sample | energy (µJ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in tower["layers"]:
        lines.append(
            f"| `{entry['name']}` | {entry['kind']} | {_format_rates(entry['input_rates'])} | "
            f"{entry['effective_rate']:.4f} | {_format_count(entry['macs_per_step'])} | "
            f"{_format_count(entry['ops'])} | {entry['energy_mj'] * 1e3:.4g} |"
        )
    return lines


def _neuron_table(tower: Mapping[str, Any]) -> List[str]:
    lines = ["| neuron layer | firing rate | rate per time step |", "|---|---|---|"]
    for neuron_entry in tower.get("neurons", []):
        steps = neuron_entry["step_rates"]
        per_step = ", ".join(f"{rate:.4f}" for rate in steps) if steps else "-"
        lines.append(f"| `{neuron_entry['name']}` | {neuron_entry['rate']:.4f} | {per_step} |")
    return lines


def _tower_sections(title: str, tower: Optional[Mapping[str, Any]]) -> List[str]:
    if not tower:
        return []
    lines = ["", f"## {title}: per layer", ""] + _layer_table(tower)
    if tower.get("neurons"):
        lines += ["", f"## {title}: neuron firing rates", "",
                  f"Mean over all neurons: {tower['mean_firing_rate']:.4f}.", ""]
        lines += _neuron_table(tower)
    if tower.get("uncounted_ops"):
        lines += ["", f"Not counted (unknown operations, calls): {tower['uncounted_ops']}."]
    return lines


def _ratio_line(label: str, ratio: Optional[float]) -> List[str]:
    if ratio is None:
        return []
    return [f"{label} energy, student / teacher: {ratio:.4g} (the teacher needs {1 / ratio:.3g} times as much)."
            if ratio > 0 else f"{label} energy, student / teacher: 0."]


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    """Write the totals, the per-layer tables and the counting conventions as a Markdown page."""
    settings = report["settings"]
    student = report["student"]
    teacher = report.get("teacher")
    title = f"`{student['model']}`" + (f" vs `{teacher['model']}`" if teacher else "")
    lines = [
        f"# Energy estimate: {title}",
        "",
        f"{report['num_images']} images from `{settings['data']}`. Costs: {settings['mac_pj']} pJ per MAC, "
        f"{settings['ac_pj']} pJ per AC ({settings['technology']}). Every number is per sample.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| tower | model | time steps | ACs | MACs | dense MACs | energy (mJ) |",
        "|---|---|---|---|---|---|---|",
        *_totals_rows(report),
        "",
        *_ratio_line("Image tower", report.get("ratio")),
        *_ratio_line("Text tower", (report.get("text") or {}).get("ratio")),
    ]
    lines += _tower_sections("Student image tower", student)
    lines += _tower_sections("Teacher image tower", teacher)
    text = report.get("text") or {}
    lines += _tower_sections(f"Student text tower ({text.get('source')})", text.get("student"))
    lines += _tower_sections(f"Teacher text tower ({text.get('source')})", text.get("teacher"))
    lines += ["", "## Counting conventions", ""] + [f"- {rule}" for rule in report["conventions"]]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- PNG -------------------------------------------------------------------------------------------

def _short_names(names: Sequence[str]) -> List[str]:
    """Drop the module path prefix that all names share, keeping whole path components."""
    if len(names) < 2:
        return list(names)
    prefix = os.path.commonprefix(list(names))
    prefix = prefix[: prefix.rfind(".") + 1]
    return [name[len(prefix):] or name for name in names]


def write_figure(report: Mapping[str, Any], path: Path) -> Path:
    """Plot per-layer neuron firing rates and energy, the student's next to the teacher's, as a PNG."""
    # A bare Figure renders with the Agg backend and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    student = report["student"]
    teacher = report.get("teacher")
    neurons = student.get("neurons") or []
    panels = [("rates", student), ("energy", student)] + ([("energy", teacher)] if teacher else [])
    rows = max(len(neurons), len(student["layers"]), len(teacher["layers"]) if teacher else 0, 1)
    figure = Figure(figsize=(6 * len(panels), 1.5 + 0.22 * rows))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]

    rate_axis = axes[0]
    names = _short_names([entry["name"] for entry in neurons])
    rate_axis.barh(range(len(neurons)), [entry["rate"] for entry in neurons], color="tab:purple")
    rate_axis.set_yticks(range(len(neurons)), names, fontsize=7)
    # The same row range on every panel gives every bar the same height, top to bottom.
    rate_axis.set_ylim(rows - 0.5, -0.5)
    rate_axis.set_xlabel("firing rate (spikes per neuron and time step)")
    rate_axis.set_title(f"student neurons, mean {student.get('mean_firing_rate', 0.0):.4f}", fontsize=9)

    energy_axes = []
    for axis, (_, tower) in zip(axes[1:], panels[1:]):
        layers = tower["layers"]
        colors = ["tab:green" if entry["kind"] == AC else "tab:red" for entry in layers]
        axis.barh(range(len(layers)), [entry["energy_mj"] * 1e3 for entry in layers], color=colors)
        axis.set_yticks(range(len(layers)), _short_names([entry["name"] for entry in layers]), fontsize=7)
        axis.set_ylim(rows - 0.5, -0.5)
        axis.set_xlabel("energy per image (µJ); green: AC, red: MAC")
        role = "student" if tower is student else "teacher"
        axis.set_title(f"{role} {tower['model']}: {tower['energy_mj']:.4g} mJ per image", fontsize=9)
        energy_axes.append(axis)
    # A shared energy axis puts student and teacher layers on one scale.
    largest = max((entry["energy_mj"] * 1e3 for _, tower in panels[1:] for entry in tower["layers"]), default=0.0)
    if largest > 0 and math.isfinite(largest):
        for axis in energy_axes:
            axis.set_xlim(0, largest * 1.05)

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
