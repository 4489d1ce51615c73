"""Meta-dataset collection: features on every zoo model; resume after an interruption (slow)."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from edgecompress.collect import read_rows
from edgecompress.features import FEATURE_DOCS, method_features, model_features
from edgecompress.models import get_model, list_models, load_model


@pytest.mark.parametrize("name", list_models())
def test_features_on_every_zoo_model(name):
    model = load_model(get_model(name), 10)
    feats = model_features(model, (1, 3, 32, 32))
    for kind, ratio, local in [("none", 0.0, False), ("unstructured", 0.7, False), ("unstructured", 0.5, True), ("channel", 0.5, False)]:
        feats.update(method_features(model, kind, ratio, local))
        assert all(math.isfinite(v) for v in feats.values())
        if ratio:
            assert 0 < feats["f_mass_below_global"] < ratio  # the pruned weights are the small ones
    assert set(feats) <= set(FEATURE_DOCS)
    assert feats["f_params"] == get_model(name).params


ARGS = ["meta", "collect", "--models", "lcnet_050", "--methods", "none", "--methods", "torch_pruning.l1",
        "--ratios", "0.3,0.5,0.7", "--precisions", "fp32", "--finetune-steps", "2"]


@pytest.mark.slow
def test_collect_resumes_after_ctrl_c(tmp_path):
    out = tmp_path / "meta.parquet"
    cmd = [sys.executable, "-m", "edgecompress.cli", *ARGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not out.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "collection finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=120)
    first = read_rows(out)  # a complete, readable file, never a half-written one
    assert 1 <= len(first) < 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 4
    assert sorted((r["method"], r["ratio"]) for r in rows) == [("none", 0.0), ("torch_pruning.l1", 0.3),
                                                               ("torch_pruning.l1", 0.5), ("torch_pruning.l1", 0.7)]
    # The rows from before the interruption were kept, not recomputed.
    kept = {(r["method"], r["ratio"]): r["wall_seconds"] for r in rows}
    assert all(kept[(r["method"], r["ratio"])] == r["wall_seconds"] for r in first)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert '"new_rows": 0' in again.stdout


def test_collect_bad_input(capsys, tmp_path):
    from edgecompress.cli import main

    assert main(["meta", "collect", "--out", str(tmp_path / "m.csv")]) == 2
    assert "parquet" in capsys.readouterr().err
    assert main(["meta", "collect", "--out", str(tmp_path / "m.parquet"), "--precisions", "int4"]) == 2
    assert "unknown int4" in capsys.readouterr().err
    assert main(["meta", "collect", "--out", str(tmp_path / "m.parquet"), "--methods", "woodfisher"]) == 2
