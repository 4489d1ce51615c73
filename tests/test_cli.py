"""Every bad input: exit code 2, one line on stderr, no traceback."""

import json
import subprocess
import sys

import pytest
from conftest import write_images

from edgecompress.cli import main


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Default run directories (runs/<timestamp>) land in a temporary cwd, never in the checkout; the Hugging Face
    cache is an empty one, whatever this machine holds."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD_INPUTS = [
    (["build", "--target", "openvino-cpu", "--latency", "abc"], "cannot read latency budget"),
    (["build", "--target", "openvino-cpu", "--latency", "-1ms"], "cannot read latency budget"),
    (["build", "--target", "openvino-cpu", "--latency", "0ms"], "must be greater than zero"),
    (["build", "--target", "openvino-cpu", "--latency", "10"], "needs a unit"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--time-budget", "10"], "time budget '10' needs a unit"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--mean", "0.5,0.5"], "--mean '0.5,0.5': write three numbers"),
    (["build", "--target", "openvino-cpu", "--latency", "0.00001ms"], "out of reach"),
    (["build", "--target", "openvino-cpu", "--memory", "1KB"], "out of reach"),
    (["build", "--target", "jetson-orin-nano", "--latency", "1ms", "--memory", "20GB"], "exceeds jetson-orin-nano's RAM"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--max-accuracy-drop", "150%"], "between 0% and 100%"),
    (["build", "--target", "openvino-cpu"], "give a budget"),
    (["build", "--target", "jetson-orn", "--latency", "1ms"], "did you mean 'jetson-orin'"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--model", "resnet10"], "did you mean 'resnet10t'"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--model", "timm:resnet18"], "not in the Hugging Face cache"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--model", "timm:resnet18=/nonexistent.pth"], "does not exist"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--data", "/nonexistent"], "does not exist"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--resume"], "requires an argument"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--resume", "nowhere"], "nothing to resume"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--resume", "x", "--force"], "contradict"),
    (["build", "--target", "openvino-cpu", "--latency", "1ms", "--resume", "x", "--out", "y"], "different run directories"),
    (["build", "--latency", "1ms"], "Missing option '--target'"),
    (["bench", "/nonexistent.onnx", "--target", "ort-cpu"], "does not exist"),
    (["nosuchcommand"], "No such command"),
    (["meta", "collect", "--out", "/nonexistent/meta.parquet", "--refresh-features"], "does not exist"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err


def _truncated(tmp_path, weights_file):
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    return ["--model", f"timm:lcnet_050={weights_file}"]


def _corrupt_data(tmp_path, weights_file):
    write_images(tmp_path / "d", ["a", "b"], per_class=4)
    for i in range(3):
        (tmp_path / "d" / "a" / f"bad{i}.png").write_bytes(b"not an image")
    return ["--data", str(tmp_path / "d"), "--model", f"timm:lcnet_050={weights_file}"]


def _one_class(tmp_path, weights_file):
    write_images(tmp_path / "d", ["only"], per_class=4)
    return ["--data", str(tmp_path / "d"), "--model", f"timm:lcnet_050={weights_file}"]


def _empty_data(tmp_path, weights_file):
    (tmp_path / "d").mkdir()
    return ["--data", str(tmp_path / "d"), "--model", f"timm:lcnet_050={weights_file}"]


FILE_INPUTS = [
    (_truncated, "cannot read weights file"),
    (lambda tmp, w: ["--model", f"timm:mobilenetv2_050={w}"], "does not fit architecture mobilenetv2_050"),
    (_corrupt_data, "cannot be read"),
    (_one_class, "one class"),
    (_empty_data, "no class folders"),
    (lambda tmp, w: ["--data", str(w), "--model", f"timm:lcnet_050={w}"], "is not a directory"),
]


@pytest.mark.parametrize("make_args, message", FILE_INPUTS, ids=["truncated-weights", "wrong-arch", "corrupt-images",
                                                                  "one-class", "empty-data", "data-is-a-file"])
def test_bad_files_one_line_exit_2(capsys, tmp_path, weights_file, make_args, message):
    argv = ["build", "--target", "ort-cpu", "--latency", "1ms", *make_args(tmp_path, weights_file)]
    code, _, err = run_cli(capsys, *argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_existing_out_dir_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "build", "--target", "ort-cpu", "--latency", "1ms", "--out", str(out))
    assert code == 2 and "--resume" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_targets_json(capsys):
    code, out, _ = run_cli(capsys, "targets", "--json")
    assert code == 0
    names = {t["name"] for t in json.loads(out)}
    assert {"ort-cpu", "openvino-cpu", "jetson-orin-agx"} <= names


def test_plan_json(capsys):
    code, out, _ = run_cli(capsys, "plan", "--target", "openvino-cpu", "--latency", "0.3ms", "--top", "5", "--json")
    assert code == 0
    rows = json.loads(out)["recommendations"]
    assert len(rows) == 5 and all(r["predicted"]["latency_ms"] > 0 for r in rows)


def test_real_process_bad_input_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "edgecompress.cli", "build", "--target", "nope", "--latency", "1ms"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_internal_error_exit_1_with_debug_hint(capsys, monkeypatch):
    import edgecompress.targets as targets

    def boom(pattern="*"):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(targets, "list_targets", boom)
    code, _, err = run_cli(capsys, "targets")
    assert code == 1 and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "targets"])


@pytest.mark.parametrize("target", ["openvino-cpu", "ort-cpu"])
def test_bench_of_a_file_that_is_not_a_model_is_one_line(tmp_path, target):
    """In a fresh process, so that what a runtime's own frontends print on stderr (OpenVINO offers a file it cannot
    read to TensorFlow's parser, which logs through absl) is counted too."""
    import subprocess
    import sys

    path = tmp_path / "notes.onnx"
    path.write_text("not a model\n")
    proc = subprocess.run([sys.executable, "-m", "edgecompress", "bench", str(path), "--target", target],
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is not an ONNX model" in lines[0], proc.stderr


def test_bench_runs_on_the_threads_asked_for(tmp_path, capsys, digits):
    """--threads reaches the runtime (as it reports it); with --device it is refused in one line."""
    from edgecompress.models import get_model, load_model
    from edgecompress.runtimes.base import export_onnx

    onnx_path = export_onnx(load_model(get_model("lcnet_050"), 10).eval(), digits.input_shape, tmp_path / "m.onnx")
    code, out, _ = run_cli(capsys, "bench", str(onnx_path), "--target", "ort-cpu", "--runs", "20", "--threads", "1")
    result = json.loads(out)
    assert code == 0 and result["threads"] == 1 and result["runtime_threads"] == 1
    code, _, err = run_cli(capsys, "bench", str(onnx_path), "--target", "ort-cpu", "--threads", "1",
                           "--device", "me@127.0.0.1:1")
    assert code == 2 and "--threads" in err and len(err.strip().splitlines()) == 1
