"""Fault injection: kill a real build process in each stage, then --resume (slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ARGS = ["build", "--target", "ort-cpu", "--latency", "50ms", "--model", "lcnet_050",
        "--finetune-steps", "20"]
STAGES = ["compress", "export", "calibrate", "verify", "benchmark"]


def _cmd(out, *extra):
    return [sys.executable, "-m", "edgecompress.cli", *ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    subprocess.run(_cmd(out), check=True, capture_output=True)
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_kill_in_stage_then_resume(tmp_path, stage, uninterrupted):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    before = STAGES[STAGES.index(stage) - 1] if stage != "compress" else None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if before is None and (out / "build.json").exists():
            break  # the run has started; compress is the first stage
        if before and list(out.glob(f"candidates/*/{before}/stage.json")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    # Nothing half-written under a final name: every stage directory is complete.
    for stage_dir in out.glob("candidates/*/*"):
        if not stage_dir.name.startswith("."):
            assert (stage_dir / "stage.json").exists(), stage_dir
    done = subprocess.run(_cmd(out, "--resume", str(out)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["choice"] == uninterrupted["choice"]
    assert report["measured"]["accuracy"] == uninterrupted["measured"]["accuracy"]
    if before:
        assert any(r.endswith(f"/{before}") for r in report["reused_stages"])
