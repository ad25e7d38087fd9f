"""benchmarks/results.py end to end with tiny models on real images, its caches and its input checks."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results_script():
    spec = importlib.util.spec_from_file_location("benchmarks_results", REPO_ROOT / "benchmarks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("isolated_logging_and_env")


def _tiny_argv(tmp_path, wds_root, tiny_teacher, *extra):
    name, weights = tiny_teacher
    return [
        "--output", str(tmp_path / "page" / "RESULTS.md"),
        "--data-root", str(wds_root),
        "--work-dir", str(tmp_path / "work"),
        "--teacher", name, "--teacher-pretrained", str(weights),
        # spikeclip-vit-t embeds into 64 dimensions, like the tiny teacher.
        "--student", "spikeclip-vit-t",
        "--num-images", "8", "--energy-images", "4",
        "--align-samples", "8", "--align-batch-size", "4",
        "--batch-size", "8", "--workers", "0",
        *extra,
    ]


def test_results_end_to_end_tiny(results_script, tmp_path, wds_root, tiny_teacher):
    argv = _tiny_argv(tmp_path, wds_root, tiny_teacher)
    assert results_script.main(argv) == 0

    page_dir = tmp_path / "page"
    page = (page_dir / "RESULTS.md").read_text(encoding="utf-8")
    results = json.loads((page_dir / "results" / "results.json").read_text(encoding="utf-8"))

    # Provenance: the command, the hardware and the software versions.
    assert "--num-images 8 --energy-images 4" in results["command"]
    assert results["command"] in page
    assert results["hardware"]["cpu_model"]
    assert f"`{results['hardware']['cpu_model']}`" in page
    assert results["hardware"]["logical_cores"] >= 1
    for package in ("torch", "open_clip_torch", "timm", "spikingjelly"):
        assert results["software"][package], package
        assert f"{package} {results['software'][package]}" in page

    # The student came from the short align run, and the page states it.
    assert results["student"]["source"] == "trained"
    assert results["student"]["short_run"]["samples"] == 8
    assert "Short student run" in page
    assert results["student"]["time_steps"] == 2
    assert results["teacher"]["time_steps"] is None
    for role in ("teacher", "student"):
        assert 0 < results[role]["image_tower_parameters"] < results[role]["total_parameters"]
    assert results["student"]["training"]["stage"] == "align"

    assert list(results["datasets"]) == ["cifar10_jpeg", "imagenette"]
    for dataset, title in (("cifar10_jpeg", "CIFAR-10 (JPEG)"), ("imagenette", "Imagenette")):
        entry = results["datasets"][dataset]
        for role in ("teacher", "student"):
            scores = entry["accuracy"][role]
            assert scores["num_images"] == 8
            assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0
            assert f"| {title} | 8 |" in page
            assert f"{role} `{results[role]['model']}`" in page
        assert sum(entry["class_counts"]) == 8

        energy = entry["energy"]
        assert energy["num_images"] == 4
        assert energy["student"]["acs"] > 0
        assert energy["teacher"]["macs"] > 0
        assert energy["ratio"] == pytest.approx(energy["student"]["energy_mj"] / energy["teacher"]["energy_mj"])
        assert f"{energy['ratio']:.4g}" in page
        figure = page_dir / energy["figure"]
        assert figure == page_dir / "results" / f"energy_{dataset}.png"
        assert figure.read_bytes().startswith(b"\x89PNG")
        assert f"]({energy['figure']})" in page
        assert (page_dir / energy["details"]).is_file()

    assert "4.6 pJ per multiply-accumulate" in page
    assert "0.9 pJ per accumulate" in page
    names = [step["name"] for step in results["steps"]]
    assert len(names) == 8
    assert [step["status"] for step in results["steps"][:2]] == ["given", "ran"]
    assert all(step["wall_s"] is not None for step in results["steps"][1:])
    for step in results["steps"][1:]:
        assert step["command"] in page

    # A second run with the same align arguments reuses the student run.
    second = _tiny_argv(tmp_path, wds_root, tiny_teacher, "--datasets", "cifar10_jpeg")
    assert results_script.main(second) == 0
    rerun = json.loads((page_dir / "results" / "results.json").read_text(encoding="utf-8"))
    assert rerun["steps"][1]["status"] == "reused"
    assert rerun["steps"][1]["command"] == results["steps"][1]["command"]
    assert rerun["student"]["sha256"] == results["student"]["sha256"]
    assert list(rerun["datasets"]) == ["cifar10_jpeg"]


def test_missing_data_root_is_reported(results_script, tmp_path, capsys):
    missing = tmp_path / "no-data"
    argv = ["--output", str(tmp_path / "RESULTS.md"), "--data-root", str(missing), "--work-dir", str(tmp_path / "work")]
    assert results_script.main(argv) == 2
    error = capsys.readouterr().err
    assert f"data root {missing} not found" in error
    assert "--data-root" in error
    assert not (tmp_path / "RESULTS.md").exists()


def test_missing_dataset_is_named(results_script, tmp_path, wds_root, tiny_teacher, capsys):
    argv = _tiny_argv(tmp_path, wds_root, tiny_teacher, "--datasets", "no_such_set")
    assert results_script.main(argv) == 2
    assert f"{wds_root / 'no_such_set' / 'test'} not found" in capsys.readouterr().err


def test_missing_student_checkpoint(results_script, tmp_path, wds_root, tiny_teacher, capsys):
    missing = tmp_path / "student.safetensors"
    argv = _tiny_argv(tmp_path, wds_root, tiny_teacher, "--student-pretrained", str(missing))
    assert results_script.main(argv) == 2
    assert f"--student-pretrained {missing} not found" in capsys.readouterr().err


def test_other_teacher_needs_checkpoint(results_script, tmp_path, wds_root, capsys):
    argv = ["--output", str(tmp_path / "RESULTS.md"), "--data-root", str(wds_root),
            "--work-dir", str(tmp_path / "work"), "--teacher", "ViT-B-32"]
    assert results_script.main(argv) == 2
    assert "--teacher ViT-B-32: no --teacher-pretrained given" in capsys.readouterr().err


def test_offline_teacher_build_is_cached(results_script, tmp_path, monkeypatch):
    calls = []

    def fake_build(argv):
        calls.append(argv)
        output = Path(argv[argv.index("--output") + 1])
        output.write_bytes(b"weights")
        return 0

    monkeypatch.setattr(results_script, "_module_main", lambda module: fake_build)
    args = argparse.Namespace(teacher=results_script.OFFLINE_TEACHER, teacher_pretrained=None,
                              work_dir=tmp_path / "work", data_root=tmp_path / "data", rebuild=False)
    expected = tmp_path / "work" / "teacher" / f"{results_script.OFFLINE_TEACHER}.safetensors"

    first_steps = []
    first = results_script.prepare_teacher(args, first_steps)
    assert first == {"checkpoint": expected, "source": "built"}
    assert calls == [["--output", str(expected), "--data-root", str(tmp_path / "data")]]
    assert first_steps[0].status == "ran"
    assert first_steps[0].command.startswith("python -m open_clip_spiking.offline_teacher --output ")

    second_steps = []
    second = results_script.prepare_teacher(args, second_steps)
    assert second == {"checkpoint": expected, "source": "reused"}
    assert len(calls) == 1
    assert second_steps[0].status == "reused"
    assert second_steps[0].command == first_steps[0].command

    args.rebuild = True
    results_script.prepare_teacher(args, [])
    assert len(calls) == 2


def test_failed_step_stops_the_run(results_script, monkeypatch):
    monkeypatch.setattr(results_script, "_module_main", lambda module: lambda argv: 2)
    with pytest.raises(results_script.StepFailed, match="exit code 2"):
        results_script.run_step([], "evaluate", "open_clip_spiking.eval", ["--model", "x"])
