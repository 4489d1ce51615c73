"""Calibrating a target's kernel latency model to the machine that runs the tool.

A kernel model (:mod:`edgecompress.costmodel.latency`) is fitted on one machine's
measurements; on another CPU its predictions were off by 1.9x on median (0.6x
to 8x), enough for ``build`` to pick candidates that miss the budget. So when
the model was fitted elsewhere (or, like the shipped models, on a machine it
does not name), :func:`calibrate` times a few fixed reference networks here,
at every precision the model covers, and keeps per precision the median of
measured / predicted latency. The result is cached per (target, machine,
kernel model, reference set) in ``cache_dir()/device-calibration/``, so only
the first run on a machine pays for it.

Where it is applied: :func:`ensure_calibrated` (called by ``plan`` and
``build`` before planning) makes the calibration the *active* one for its
target, and :func:`edgecompress.costmodel.cost.predict_cost` multiplies the kernel
model's prediction by ``active_calibration(target.name).scale(precision)``;
``costmodel.describe`` names the calibration in every report. Nothing else
reads the registry, and nothing is active until ``ensure_calibrated`` runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from edgecompress.core.errors import UsageError
from edgecompress.core.fsutil import cache_dir, sha256_file, write_json

FORMAT = 2  # 2: the references carry the zoo's trained weights
# CPU features that change which kernels a runtime picks (and so how fast they run): x86 vector widths,
# int8/bf16 dot products and AMX tiles; NEON/ASIMD on ARM. Fixed and sorted, so the hash is stable.
ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "asimd", "avx2", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni",
             "fma", "neon", "sse4_2")


@dataclasses.dataclass(frozen=True)
class ReferenceNetwork:
    """A zoo architecture (the digits zoo's trained weights) at an input size: what the planner predicts, timed here."""

    architecture: str
    image_size: int

    @property
    def name(self) -> str:
        return f"{self.architecture}@{self.image_size}"


# The zoo's depthwise, dense and squeeze-excitation styles at the digits' 32x32 and at 64x64, in the order
# they are measured: the time box below drops the last ones on a slow machine, never the first three.
REFERENCES = (ReferenceNetwork("mobilenetv2_050", 32), ReferenceNetwork("resnet10t", 32),
              ReferenceNetwork("mobilenetv3_small_100", 64), ReferenceNetwork("lcnet_050", 32),
              ReferenceNetwork("regnetx_002", 64))
MIN_REFERENCES = 3
# No new reference network is started after this many seconds (OpenVINO's int8 quantization is about 3 s a
# network on 2 cores), which keeps a first calibration near half a minute.
TIME_BOX_S = 20.0
NUM_CLASSES = 10  # the digits', as the zoo is trained; the head is a negligible share of the time


def machine_fingerprint(runtime) -> dict:
    """What decides how fast ``runtime`` runs a model here: CPU model, logical cores, ISA flags, runtime version."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not cpu:
                cpu = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86 says flags, ARM says Features
                flags = set(value.split())
    except OSError:  # not Linux: the CPU name from platform, no flags
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "isa": [f for f in ISA_FLAGS if f in flags], "runtime": runtime.name, "runtime_version": runtime.version()}


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def kernel_model_id(directory: Path) -> str:
    """Identity of a kernel model: the hash of its files (a refit changes it, so the calibration is redone)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:12]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceMeasurement:
    network: str  # ReferenceNetwork.name
    precision: str
    measured_ms: float  # median here
    predicted_ms: float  # the kernel model, unscaled

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.predicted_ms


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceCalibration:
    """How a target's kernel model is rescaled on this machine (also the one it was fitted on: see calibrate)."""

    target: str
    machine: dict  # machine_fingerprint()
    machine_hash: str
    kernel_model: str  # kernel_model_id()
    fitted_on_this_machine: bool
    scales: dict  # precision -> median measured / predicted over the reference networks
    measurements: tuple[ReferenceMeasurement, ...]
    seconds: float  # spent measuring
    date: str
    load_average_1m: float | None  # other work on the machine while it measured inflates the scales
    cache_path: Path | None
    from_cache: bool = False

    def scale(self, precision: str) -> float:
        return self.scales.get(precision, 1.0)

    def where(self) -> str:
        m = self.machine
        return f"{m['cpu']}, {m['logical_cores']} cores, {m['runtime']} {m['runtime_version']}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = FORMAT
        d["cache_path"] = str(self.cache_path) if self.cache_path else None
        return d


def read_calibration(path: Path) -> DeviceCalibration | None:
    """The calibration cached in ``path``; None where it is missing, unreadable or of another format."""
    try:
        d = json.loads(Path(path).read_text())
        if d.pop("format") != FORMAT:
            return None
        d["measurements"] = tuple(ReferenceMeasurement(**m) for m in d["measurements"])
        d["cache_path"] = Path(path)
        d["from_cache"] = True
        return DeviceCalibration(**d)
    except (OSError, ValueError, KeyError, TypeError):  # a half-written or older file is measured again
        return None


def calibratable(target) -> bool:
    return target.local and target.kernel_model() is not None


def _fitted_here(kernel_model, fingerprint: dict) -> bool:
    machine = kernel_model.info.get("machine")  # absent from the shipped models: an unknown machine
    return isinstance(machine, dict) and fingerprint_hash(machine) == fingerprint_hash(fingerprint)


def calibration_path(target, machine_hash: str, model_id: str, references) -> Path:
    # The runtime's int8 scheme makes the int8 references' artifacts: a new scheme is a new calibration.
    key = hashlib.sha256(json.dumps([FORMAT, target.name, machine_hash, model_id,
                                     [dataclasses.astuple(r) for r in references],
                                     target.runtime().quant_preset().key()]).encode()).hexdigest()[:12]
    return cache_dir() / "device-calibration" / f"{target.name}-{machine_hash}-{key}.json"


def reference_graph(reference: ReferenceNetwork, workdir: Path):
    """The reference exported as the pipeline exports (ONNX, batch 1) and its kernel graph: (onnx path, graph, input shape)."""
    import timm
    import torch

    from edgecompress.costmodel.kernels import graph_kernels
    from edgecompress.runtimes.base import export_onnx

    model = _trained(reference.architecture)
    if model is None:  # a checkout without the zoo's checkpoints
        torch.manual_seed(0)
        model = timm.create_model(reference.architecture, pretrained=False, num_classes=NUM_CLASSES).eval()
    shape = (1, 3, reference.image_size, reference.image_size)
    onnx_path = export_onnx(model, shape, workdir / f"{reference.name}.onnx")
    return onnx_path, graph_kernels(onnx_path), shape


def _trained(architecture: str):
    """The digits zoo's trained model of ``architecture``, or None.

    Trained weights, not random ones: timm's initialization (zero-initialized last BatchNorm of residual blocks, tiny
    layer scales) makes networks that run unlike any trained one. ONNX Runtime's int8 of a random-weight resnet10t ran
    33x its prediction here, the trained one 0.5x, so a calibration on random weights scaled int8 by 6x.
    """
    from edgecompress.models import get_model, list_models, load_model

    if architecture not in list_models():
        return None
    return load_model(get_model(architecture), NUM_CLASSES).eval()


def measure_artifacts(runtime, onnx_path: Path, precisions, input_shape, workdir: Path) -> dict[str, float]:
    """Median latency (ms) here of the target's artifact at each precision, timed as ``targets profile`` times networks."""
    from edgecompress.costmodel.latency import artifact_for_timing, time_session

    # Shorter than the profile's timing (0.3 s): the median of 20+ runs of a sub-millisecond network is steady.
    sessions = {p: runtime.session(artifact_for_timing(runtime, onnx_path, p, input_shape, workdir)) for p in precisions}
    return {p: time_session(infer, input_shape, min_runs=20, max_seconds=0.15) for p, infer in sessions.items()}


def calibrate(target, *, force: bool = False, console=None, references: tuple[ReferenceNetwork, ...] | None = None
              ) -> DeviceCalibration:
    """``target``'s kernel model calibrated to this machine: read from the cache, or measured (``force``: always).

    Also where the model records that it was fitted on this machine: the random networks it was fitted on are not
    trained models, and here it over-predicted the trained zoo on OpenVINO by 20-70% (docs/benchmarks.md, session
    13); the reference networks, trained zoo models, measure that bias as they measure another machine's speed.
    """
    import numpy as np

    if not target.local:
        raise UsageError(f"{target.name} runs on another machine; its latency model is the roofline in {target.path}, "
                         "nothing to calibrate here")
    kernel_model = target.kernel_model()
    if kernel_model is None:
        raise UsageError(f"{target.name} has no kernel latency model to calibrate; fit one with "
                         f"`edgecompress targets profile {target.name}`")
    references = references or REFERENCES
    runtime = target.runtime()
    fingerprint = machine_fingerprint(runtime)
    machine_hash = fingerprint_hash(fingerprint)
    model_id = kernel_model_id(target.latency.kernels)
    precisions = [p for p in target.precisions if p in kernel_model.composition]
    record = {"target": target.name, "machine": fingerprint, "machine_hash": machine_hash, "kernel_model": model_id,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    here = _fitted_here(kernel_model, fingerprint)
    path = calibration_path(target, machine_hash, model_id, references)
    if not force:
        cached, now = read_calibration(path), load_average()
        if cached is not None and not (busy(cached.load_average_1m) and not busy(now)):
            return cached
        if cached is not None and console is not None:
            console.print(f"the cached calibration of {target.name} was measured on a busy machine (load average "
                          f"{cached.load_average_1m:.1f}); measuring again now that it is quieter ({now:.1f})",
                          markup=False, soft_wrap=True)
    if console is not None:
        console.print(f"calibrating {target.name}'s latency model to this machine (first time, about {TIME_BOX_S:.0f} s; "
                      "cached)", markup=False, soft_wrap=True)
    start = time.perf_counter()
    measurements = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, reference in enumerate(references):
            if i >= MIN_REFERENCES and time.perf_counter() - start > TIME_BOX_S:
                break
            work = Path(tmp) / reference.name
            work.mkdir()
            onnx_path, graph, shape = reference_graph(reference, work)
            measured = measure_artifacts(runtime, onnx_path, precisions, shape, work)
            measurements += [ReferenceMeasurement(network=reference.name, precision=p, measured_ms=measured[p],
                                                  predicted_ms=kernel_model.predict_ms(graph, p)) for p in precisions]
    # The median ratio, not the geometric mean: on a shared machine one network timed while another process ran
    # is slow by a lot, and the median ignores it where the mean of logs would follow it.
    scales = {p: float(np.median([m.ratio for m in measurements if m.precision == p])) for p in precisions}
    calibration = DeviceCalibration(**record, fitted_on_this_machine=here, scales=scales,
                                    measurements=tuple(measurements), seconds=time.perf_counter() - start,
                                    load_average_1m=load_average(), cache_path=path)
    write_json(path, calibration.to_json())
    if console is not None and busy(calibration.load_average_1m):
        console.print(f"note: the machine was busy while {target.name} was measured (load average "
                      f"{calibration.load_average_1m:.1f} on {os.cpu_count()} cores), which inflates its scales; the "
                      "next plan on a quieter machine measures again", markup=False, soft_wrap=True)
    return calibration


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def busy(load: float | None) -> bool:
    """A load average that says other work ran beside the measurement. Measuring keeps about one core per runtime
    thread busy itself; well above the core count, others were running too. A calibration taken busy is cached
    (it is the best this machine gave then) but measured again by the first plan that finds the machine quiet:
    one taken beside a LightGBM evaluation had an fp32 scale of 1.14 where a quiet one had 0.98."""
    return load is not None and load > (os.cpu_count() or 1) + 1


# --- the active calibrations: what predict_cost applies -------------------------------------------------------

_ACTIVE: dict[str, DeviceCalibration] = {}


def activate(calibration: DeviceCalibration) -> None:
    """From now on in this process, ``costmodel.predict_cost`` rescales the target's kernel model by ``calibration``."""
    _ACTIVE[calibration.target] = calibration


def active_calibration(target_name: str) -> DeviceCalibration | None:
    return _ACTIVE.get(target_name)


def ensure_calibrated(target, console=None) -> DeviceCalibration | None:
    """Calibrate ``target`` to this machine if it needs it (once; cached) and make that calibration active.

    None for targets that are not measured here or have no kernel model (their roofline is not rescaled), and
    where the target's runtime is not installed: planning needs only the model, so it goes on unscaled.
    """
    if not calibratable(target):
        return None
    try:
        target.runtime().version()
    except ImportError as exc:
        if console is not None:
            console.print(f"{target.name}'s runtime is not installed ({exc}); its latency model is not calibrated "
                          "to this machine", markup=False, soft_wrap=True)
        return None
    calibration = calibrate(target, console=console)
    activate(calibration)
    return calibration
