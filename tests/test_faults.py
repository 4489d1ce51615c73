"""Faults injected into real builds: a full disk, a candidate that outputs NaN."""

import json
import subprocess
import uuid

import pytest

from edgecompress import pipeline
from edgecompress.cli import main
from edgecompress.core.errors import NumericalError


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB tmpfs; mounting needs root (CI runs as root here)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_during_build(small_disk, capsys):
    out = small_disk / "run"
    # resnet10t's fp32 ONNX (20 MB) cannot fit in 3 MB.
    code = main(["build", "--target", "ort-cpu", "--latency", "50ms", "--model", "resnet10t", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [l for l in err.splitlines() if l.startswith("edgecompress:")]
    assert len(errors) == 1 and "disk full while writing" in errors[0] and "nothing was replaced" in errors[0]
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert not (out / "report.json").exists()
    stage_dirs = [p for p in out.glob("candidates/*/*") if not p.name.startswith(".")]
    assert all((p / "stage.json").exists() for p in stage_dirs)  # no stage under its final name half-written
    assert not list(out.rglob("*.tmp"))  # temporaries were cleaned up


def test_nan_candidate_is_rejected_and_next_tried(tmp_path, capsys, monkeypatch):
    real_verify = pipeline.verify
    calls = []

    def flaky_verify(calibrated, target, data, *args):
        calls.append(calibrated.candidate.id)
        if len(calls) == 1:
            raise NumericalError(f"{calibrated.candidate.id}: 360 of 360 test outputs hold NaN or Inf")
        return real_verify(calibrated, target, data, *args)

    monkeypatch.setattr(pipeline, "verify", flaky_verify)
    out = tmp_path / "run"
    code = main(["build", "--target", "ort-cpu", "--latency", "50ms", "--model", "lcnet_050", "--out", str(out),
                 "--finetune-steps", "5"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    tried = [c for c in report["candidates"] if c["tried"]]
    assert [c["id"] for c in tried] == calls  # every built candidate was verified, in order
    assert tried[0]["outcome"].startswith("rejected:") and "NaN or Inf" in tried[0]["outcome"]
    assert report["choice_id"] == calls[-1] != calls[0]
