"""The demo's outputs: the terminal table, ``results.json`` and the PNG figures."""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

ROWS = (
    ("teacher", "teacher {teacher}"),
    ("student_zero_shot", "student {student}, zero-shot (after align-text)"),
    ("student_finetuned", "student {student}, fine-tuned"),
)
TRAINING_STAGES = ("align", "align-text", "finetune")
LOSS_TERMS = ("loss_image", "loss_text", "loss_ce", "loss_kd")


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table_rows(results: Dict[str, Any]) -> List[List[str]]:
    """Return the rows of the result table: header, teacher, zero-shot student and fine-tuned student."""
    accuracy, energy = results["accuracy"], results["energy"]
    names = {"teacher": results["teacher"]["model"], "student": results["student"]["model"]}
    rows = [["model", "test images", "top-1", "top-5", "energy per image", "student / teacher"]]
    for role, label in ROWS:
        scores = accuracy[role]
        energy_mj, ratio = "", ""
        if role == "teacher":
            energy_mj = f"{energy['teacher_mj']:.4g} mJ"
        elif role == "student_finetuned":
            energy_mj = f"{energy['student_mj']:.4g} mJ"
            ratio = f"{energy['ratio']:.4g}" if energy["ratio"] is not None else "-"
        rows.append([label.format(**names), f"{scores['num_images']:,}", _percent(scores["acc1"]),
                     _percent(scores["acc5"]), energy_mj, ratio])
    return rows


def format_table(rows: List[List[str]]) -> str:
    """Align ``rows`` in columns: text left, numbers right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) if column == 0 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary_text(results: Dict[str, Any]) -> str:
    """Return the text printed at the end of a run: the table, what it measured and where the outputs are."""
    dataset, energy = results["dataset"], results["energy"]
    templates = len(dataset["templates"])
    lines = [
        f"{dataset['title']}: clip_benchmark zero-shot classification with {len(dataset['classnames'])} classes "
        f"x {templates} templates; energy of the image towers on {energy['num_images']:,} test images "
        f"({energy['mac_pj']} pJ per MAC, {energy['ac_pj']} pJ per AC)",
        "",
        format_table(table_rows(results)),
        "",
        f"Outputs in {results['output_dir']}",
    ]
    output_dir = Path(results["output_dir"])
    for label, path in results["outputs"].items():
        # A path inside the output folder, such as a checkpoint, is shown relative to it. Anything else is
        # shown as given: the teacher in the cache folder, or a tag such as "openai".
        inside = Path(path).is_absolute() and Path(path).is_relative_to(output_dir)
        lines.append(f"  {label}: {Path(path).relative_to(output_dir) if inside else path}")
    return "\n".join(lines)


def write_json(results: Dict[str, Any], path: Path) -> None:
    # Through a temporary file, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_training_figure(curves: Dict[str, List[Dict[str, Any]]], path: Path) -> Path:
    """Plot the training loss of each stage against its optimiser step, one panel per stage, as a PNG."""
    # A bare Figure renders with the Agg backend and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(curves), 3.2), layout="constrained")
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for axis, (stage, records) in zip(axes, curves.items()):
        records = [record for record in records if "loss" in record]
        terms = [name for name in LOSS_TERMS if any(name in record for record in records)]
        # A single term equals the total loss, so it gets no line of its own.
        for name in ["loss"] + (terms if len(terms) > 1 else []):
            series = [(record["step"], record[name]) for record in records if name in record]
            if series:
                axis.plot(*zip(*series), label=name, marker="." if len(series) < 20 else None)
        axis.set_title(stage)
        axis.set_xlabel("optimiser step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    axes[0].set_ylabel("training loss")
    figure.savefig(path, dpi=120)
    return path


def write_summary_figure(results: Dict[str, Any], path: Path) -> Path:
    """Plot top-1 accuracy of the three models and energy per image of teacher and student, as a PNG."""
    from matplotlib.figure import Figure

    accuracy, energy = results["accuracy"], results["energy"]
    labels = ["teacher", "student\nzero-shot", "student\nfine-tuned"]
    top1 = [100 * accuracy[role]["acc1"] for role, _ in ROWS]
    figure = Figure(figsize=(9, 3.4), layout="constrained")
    left, right = figure.subplots(1, 2)
    bars = left.bar(labels, top1, color=["tab:gray", "tab:blue", "tab:orange"])
    left.bar_label(bars, fmt="%.1f%%")
    left.set_ylim(0, 105)
    left.set_ylabel("top-1 (%)")
    left.set_title(f"{results['dataset']['title']} test accuracy")

    bars = right.bar(["teacher", "student"], [energy["teacher_mj"], energy["student_mj"]],
                     color=["tab:gray", "tab:orange"])
    right.bar_label(bars, fmt="%.3g mJ")
    right.set_yscale("log")
    right.set_ylabel("energy per image (mJ, log scale)")
    ratio = f", student / teacher {energy['ratio']:.3g}" if energy["ratio"] is not None else ""
    right.set_title(f"image tower energy{ratio}")
    figure.savefig(path, dpi=120)
    return path
