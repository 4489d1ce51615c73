"""End-to-end builds through the CLI (slow: minutes)."""

import json

import numpy as np
import pytest

from edgecompress.cli import main
from edgecompress.data.datasets import load_digits

pytestmark = pytest.mark.slow


def _build(tmp_path, *extra):
    out = tmp_path / "run"
    code = main(["build", "--out", str(out), "--finetune-steps", "30", *extra])
    return code, out


def test_build_openvino_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative run directory, as the default runs/<timestamp> is
    code = main(["build", "--out", "run", "--finetune-steps", "30", "--target", "openvino-cpu", "--latency", "5ms",
                 "--model", "lcnet_050", "--model", "mobilenetv3_small_100"])
    out = tmp_path / "run"
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    for key in ("target", "budget", "choice", "artifact", "measured", "predicted", "candidates"):
        assert key in report
    assert set(report["budget"]) == {"latency_ms", "memory_mb", "max_accuracy_drop", "latency_stat"}
    assert set(report["choice"]) >= {"model", "prune_method", "prune_ratio", "precision"}
    m = report["measured"]
    assert m["latency_ms_median"] <= 5 and m["latency_ms_p90"] >= m["latency_ms_median"]
    assert m["peak_memory_mb"] > 0 and m["model_size_mb"] > 0
    assert any(c["tried"] for c in report["candidates"])
    chose = [line for line in capsys.readouterr().out.splitlines() if line.startswith("chose ")]
    assert len(chose) == 1 and f"p90 {m['latency_ms_p90']:.3f} ms measured" in chose[0] and "budget 5 ms" in chose[0], chose
    html = (out / "report.html").read_text()
    assert "<svg" in html and "budget 5 ms" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")

    # Someone else loads the artifact in OpenVINO, feeds it one image at a time (its static input shape), and gets
    # the reported accuracy.
    import openvino as ov

    compiled = ov.Core().compile_model(str(out / report["artifact"]), "CPU")
    assert list(compiled.input(0).get_shape()) == [1, 3, 32, 32]
    x, y = load_digits(32).split("test")
    pred = np.concatenate([compiled(x[i:i + 1])[0] for i in range(len(x))]).argmax(1)
    assert abs(float((pred == y).mean()) - m["accuracy"]) <= 0.002

    # Resume: every stage is reused and the choice is the same.
    code = main(["build", "--resume", "run", "--finetune-steps", "30", "--target", "openvino-cpu",
                 "--latency", "5ms", "--model", "lcnet_050", "--model", "mobilenetv3_small_100"])
    assert code == 0
    again = json.loads((out / "report.json").read_text())
    assert again["choice"] == report["choice"] and again["measured"] == report["measured"]


def test_build_jetson_produces_qdq_and_command(tmp_path, capsys):
    code, out = _build(tmp_path, "--target", "jetson-orin", "--latency", "2ms", "--model", "mobilenetv3_small_100")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "jetson-orin-agx"
    assert report["measured"]["latency_ms_median"] is None  # nothing measured without the device
    assert "not measured" in report["measured_where"]
    assert report["measured"]["accuracy"] > 0.5
    script = (out / "bundle" / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx --shapes=input:1x3x32x32" in script and "--saveEngine=model.plan" in script
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert {"infer_tensorrt.py", "infer_tensorrt.cpp", "build_engine.sh"} <= set(manifest["files"])
    # The engine examples read what the script writes and the bundle's own preprocess.json names.
    assert "model.plan" in (out / "bundle" / "infer_tensorrt.py").read_text()
    pre = json.loads((out / "bundle" / "preprocess.json").read_text())
    assert f'"{pre["input_name"]}"' in (out / "bundle" / "infer_tensorrt.cpp").read_text()


def test_a_candidate_the_runtime_refuses_is_rejected_not_the_build(tmp_path, capsys):
    """A real refusal where nothing was timed before training (Jetson without --device): NNCF's int8 of
    tf_mobilenetv3_small_minimal_100 at 32x32 stops in ONNX Runtime's QLinearConv (a TF-"same" padded depthwise
    convolution meets a 1x1 map) when the host verifies it. The try is rejected with that line, and the build ends
    as any build that found nothing: exit 2, a report, no traceback."""
    import timm
    import torch

    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10).state_dict(),
               weights)
    code, out = _build(tmp_path, "--target", "jetson-orin", "--latency", "100ms", "--method", "none",
                       "--precision", "int8", "--max-tries", "1",
                       "--model", f"timm:tf_mobilenetv3_small_minimal_100={weights}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no candidate met the budget after 1 tries" in err and "Traceback" not in err
    [tried] = [c for c in json.loads((out / "report.json").read_text())["candidates"] if c["tried"]]
    assert tried["outcome"].startswith("rejected: it could not be made or run: ")
    assert "QLinearConv" in tried["outcome"]


def test_user_data_and_weights(tmp_path, capsys, weights_file):
    from conftest import write_images

    write_images(tmp_path / "data", [str(i) for i in range(10)], per_class=12)
    code, out = _build(tmp_path, "--target", "ort-cpu", "--latency", "50ms", "--data", str(tmp_path / "data"),
                       "--model", f"timm:lcnet_050={weights_file}", "--image-size", "24")
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["image_size"] == 24 and report["choice"]["model"].startswith("lcnet_050@")
    # The architecture's pretrained_cfg normalisation reaches what the bundle tells a device to do.
    from edgecompress.data.datasets import preprocess_for_model

    cfg, pre = preprocess_for_model("lcnet_050"), json.loads((out / "bundle" / "preprocess.json").read_text())
    assert pre["mean"] == pytest.approx(cfg.mean) and pre["std"] == pytest.approx(cfg.std) and pre["image_size"] == 24
    assert pre["interpolation"] == cfg.interpolation


def test_nothing_fits_exit_2_names_fastest(tmp_path, capsys):
    # A budget under the fastest predicted candidate, but inside check_reachable's slack of 2x: from this machine's
    # own prediction (its device calibration), not a figure that holds on one machine only (0.035 ms did here
    # until a calibration said 0.078 ms for the fastest, then it was refused as out of reach before building).
    assert main(["plan", "--target", "ort-cpu", "--latency", "1ms", "--model", "lcnet_050", "--top", "1000", "--json"]) == 0
    fastest = min(c["predicted"]["latency_ms"] for c in json.loads(capsys.readouterr().out)["recommendations"])
    code, out = _build(tmp_path, "--target", "ort-cpu", "--latency", f"{fastest / 1.8:.4f}ms", "--model", "lcnet_050",
                       "--max-tries", "1")
    err = capsys.readouterr().err
    assert code == 2 and "no candidate met the budget" in err and "the fastest built was" in err
    assert (out / "report.json").exists()
