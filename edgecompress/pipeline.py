"""The build pipeline: plan -> compress -> export -> calibrate -> verify -> benchmark -> report.

Each stage is a function from one typed artifact to the next, writing only
into the directory it is given. :class:`Pipeline` chooses those directories
inside the run directory, writes each stage to a temporary name and renames it
when complete, with the stage's spec hash in ``stage.json``; a resumed build
reuses every finished stage whose hash matches.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from edgecompress.compress.finetune import finetune, predict_torch
from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec, get_method, spec_hash
from edgecompress.core.errors import NumericalError, UsageError
from edgecompress.core.fsutil import atomic_path, write_json
from edgecompress.data.datasets import Dataset
from edgecompress.deploy.timing import merged, with_statistics
from edgecompress.models import ModelEntry, load_model
from edgecompress.runtimes.base import export_onnx
from edgecompress.targets import Target

BENCH_WARMUP = 20
BENCH_RUNS = 200
BENCH_ROUNDS = 10  # the runs are timed in rounds: statistics with intervals (edgecompress.deploy.timing)


# ---------------------------------------------------------------- artifacts
@dataclasses.dataclass(frozen=True)
class CompressedModel:
    candidate: Candidate
    checkpoint: Path  # pickled torch module (our own file; pruning changes the architecture), or a user's ONNX graph
    baseline_accuracy: float
    pruned_accuracy_torch: float
    params: int
    zero_share: float
    finetune_steps: int


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    candidate: Candidate
    onnx: Path  # fp32 ONNX every runtime starts from
    artifact: Path  # in the runtime's format, at fp32/fp16 (int8 comes from calibrate)


@dataclasses.dataclass(frozen=True)
class CalibratedModel:
    candidate: Candidate
    artifact: Path
    calibration: dict  # {"source": "real"|"none", "samples": int}


@dataclasses.dataclass(frozen=True)
class VerifiedModel:
    candidate: Candidate
    artifact: Path
    accuracy: float
    per_class_accuracy: list
    verified_in: str


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    candidate: Candidate
    artifact: Path
    measured: dict | None  # runner output; None when nothing could be measured
    where: str
    threads: int | None = None  # the runtime's inference threads it was timed on (None: the runtime's own choice)


def _to_json(obj, run_dir: Path):
    """JSON for stage.json; paths inside the run directory are stored relative to it."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name), run_dir) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        path = obj.resolve()
        return {"__path__": str(path.relative_to(run_dir)) if run_dir in path.parents else str(path)}
    if isinstance(obj, (list, tuple)):
        return [_to_json(x, run_dir) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_json(v, run_dir) for k, v in obj.items()}
    return obj


def _candidate_from(d: dict) -> Candidate:
    return Candidate(model=d["model"], prune=PruneSpec(**d["prune"]), quant=QuantSpec(**d["quant"]))


def _from_json(cls, data: dict, run_dir: Path):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data and f.default is not dataclasses.MISSING:
            continue  # a field added since that stage ran: its default
        value = data[f.name]
        if f.name == "candidate":
            value = _candidate_from(value)
        elif isinstance(value, dict) and "__path__" in value:
            value = run_dir / value["__path__"]  # an absolute stored path stays absolute
        kwargs[f.name] = value
    return cls(**kwargs)


def _moved(obj, old: Path, new: Path):
    """The artifact with paths under ``old`` (the temporary stage dir) moved under ``new``."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Path) and old in value.resolve().parents:
            changes[f.name] = new / value.resolve().relative_to(old)
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- stages
def _zero_share(model) -> float:
    weights = [p.detach() for p in model.parameters() if p.ndim > 1]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / max(total, 1))


def compress(candidate: Candidate, entry: ModelEntry, data: Dataset, finetune_spec: FinetuneSpec, out: Path, *, progress=None,
             teacher: bool = False, baseline_accuracy: float | None = None) -> CompressedModel:
    """Prune (if asked), fine-tune briefly on the train split, save the torch model.

    ``baseline_accuracy`` is the uncompressed model's top-1 on ``data``'s test split where the caller has it (the
    build measured it to plan); otherwise it is measured here. An uncompressed candidate is not evaluated again.

    With ``teacher``, the fine-tune distils from the uncompressed model (a transferred parent: its few training
    images are better seen through its logits).

    An ONNX graph (``entry.source == "onnx"``) is dense by construction (the planner gives it no pruning): it is copied
    as it is and measured in ONNX Runtime; no torch is involved.
    """
    if entry.source == "onnx":
        return _compress_onnx(candidate, entry, data, out)
    import torch

    model = load_model(entry, data.num_classes)
    x_test, y_test = data.split("test")
    if baseline_accuracy is None:
        baseline_accuracy = float((predict_torch(model, x_test).argmax(1) == y_test).mean())
    method = get_method(candidate.prune.method)
    example = torch.zeros(data.input_shape)
    steps = 0
    if method.kind != "none":
        x_train, y_train = data.split("train")
        model = method.prepare(model, candidate.prune.ratio, example, method.prune_data(data))
        steps = finetune_spec.steps
        model = finetune(
            model, x_train, y_train, steps=steps, lr=finetune_spec.lr, batch_size=finetune_spec.batch_size,
            regularizer=method.regularizer(model, candidate.prune.ratio),
            seed=finetune_spec.seed, on_step=progress, teacher=load_model(entry, data.num_classes) if teacher else None,
        )
        model = method.finalize(model, example).eval()
    accuracy = baseline_accuracy if method.kind == "none" else float((predict_torch(model, x_test).argmax(1) == y_test).mean())
    checkpoint = out / "model.pt"
    torch.save(model, checkpoint)
    return CompressedModel(
        candidate=candidate, checkpoint=checkpoint, baseline_accuracy=baseline_accuracy,
        pruned_accuracy_torch=accuracy, params=sum(p.numel() for p in model.parameters()),
        zero_share=_zero_share(model), finetune_steps=steps,
    )


def _compress_onnx(candidate: Candidate, entry: ModelEntry, data: Dataset, out: Path) -> CompressedModel:
    import shutil

    from edgecompress.onnx_model import predict_onnx, weight_stats

    if get_method(candidate.prune.method).kind != "none":
        raise UsageError(f"{entry.name} is an ONNX graph: {candidate.prune.method} pruning needs the torch model")
    checkpoint = out / ONNX_CHECKPOINT
    shutil.copyfile(entry.weights, checkpoint)
    x_test, y_test = data.split("test")
    accuracy = float((predict_onnx(checkpoint, x_test).argmax(1) == y_test).mean())
    params, zero_share = weight_stats(checkpoint)
    return CompressedModel(candidate=candidate, checkpoint=checkpoint, baseline_accuracy=accuracy,
                           pruned_accuracy_torch=accuracy, params=params, zero_share=zero_share, finetune_steps=0)


ONNX_CHECKPOINT = "model.onnx"  # the compress stage's copy of a user's ONNX graph


def export(compressed: CompressedModel, target: Target, data: Dataset, out: Path) -> ExportedModel:
    """fp32 ONNX in ``export_onnx``'s form (a user's ONNX graph is rewritten into it), then the runtime's artifact."""
    if compressed.checkpoint.suffix == ".onnx":
        from edgecompress.onnx_model import canonical_onnx

        onnx_path = canonical_onnx(compressed.checkpoint, out / "model_fp32.onnx", data.input_shape)
    else:
        import torch

        model = torch.load(compressed.checkpoint, weights_only=False)
        onnx_path = export_onnx(model, data.input_shape, out / "model_fp32.onnx")
    runtime_dir = out / "runtime"
    runtime_dir.mkdir()
    precision = compressed.candidate.quant.precision
    artifact = target.runtime().export(onnx_path, "fp32" if precision == "int8" else precision, runtime_dir)
    return ExportedModel(candidate=compressed.candidate, onnx=onnx_path, artifact=artifact)


def calibrate(exported: ExportedModel, target: Target, data: Dataset, out: Path, max_drop: float | None = None,
              calibration: tuple | None = None) -> CalibratedModel:
    """int8: post-training quantization of the exported graph on the calibration split, with the runtime's own
    preset (``Runtime.quant_preset``: ONNX Runtime's quantize_static for ONNX Runtime, NNCF's CPU preset for
    OpenVINO, symmetric QDQ for TensorRT), which the report records as read back from the artifact.

    With ``max_drop``, accuracy-aware: the drop is measured on the validation split and the most sensitive layers
    go back to float until it is within ``max_drop`` (``nncf.quantize_with_accuracy_control``).
    """
    if exported.candidate.quant.precision != "int8":
        return CalibratedModel(candidate=exported.candidate, artifact=exported.artifact, calibration={"source": "none", "samples": 0})
    from edgecompress.runtimes.base import AccuracyControl

    images, info = calibration or (None, None)
    if images is None:
        images = data.split("calib")[0]
        info = {"source": "real", "samples": int(len(images))}
    calibration = dict(info)
    control = None
    if max_drop is not None:
        val_x, val_y = data.split("val")
        control = AccuracyControl(val_x, val_y, max_drop)
        calibration["accuracy_control"] = {"max_drop": max_drop, "validation_samples": int(len(val_y))}
    from edgecompress.runtimes.base import read_quant_record

    artifact = target.runtime().quantize(exported.artifact, images, out, control)
    calibration["quant_preset"] = read_quant_record(artifact)
    return CalibratedModel(candidate=exported.candidate, artifact=artifact, calibration=calibration)


def run_session(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([session(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> list:
    return [float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(num_classes)]


def verify(calibrated: CalibratedModel, target: Target, data: Dataset, batch_size: int = 64) -> VerifiedModel:
    """Top-1 accuracy of the artifact itself, run in a runtime, on the test split (``batch_size`` images a call: 1
    for a graph whose batch axis is fixed to it)."""
    runtime = target.runtime()
    images, labels = data.split("test")
    logits = run_session(runtime.session(calibrated.artifact), images, batch_size)
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        raise NumericalError(f"{calibrated.candidate.id}: {bad} of {len(labels)} test outputs hold NaN or Inf")
    pred = logits.argmax(1)
    return VerifiedModel(
        candidate=calibrated.candidate, artifact=calibrated.artifact, accuracy=float((pred == labels).mean()),
        per_class_accuracy=per_class_accuracy(pred, labels, data.num_classes), verified_in=runtime.verified_in,
    )


def benchmark(verified: VerifiedModel, target: Target, data: Dataset | None = None, out: Path | None = None,
              device=None, threads: int | None = None) -> BenchmarkResult:
    """Time the artifact here, or on ``device`` (a (DeviceSpec, SshOptions) pair) over SSH; here, on ``threads``
    inference threads (None: the runtime's own choice; pre-measurement picks them).

    On a device, the test split goes along and the runner measures the artifact's accuracy there too.
    """
    runtime = target.runtime()
    if device is None:
        if runtime.unavailable_here() is not None:
            return BenchmarkResult(candidate=verified.candidate, artifact=verified.artifact, measured=None,
                                   where="not measured: no device; latency is the target model's prediction")
        measured = with_statistics(runtime.benchmark(verified.artifact, warmup=BENCH_WARMUP, runs=BENCH_RUNS,
                                                     rounds=BENCH_ROUNDS, threads=threads))
        where = "this machine" + (f" ({measured['gpu']}, {runtime.name} {measured['runtime_version']})" if "gpu" in measured else "")
        return BenchmarkResult(candidate=verified.candidate, artifact=verified.artifact, measured=measured, where=where,
                               threads=threads)
    from edgecompress.deploy.remote import remote_benchmark

    spec, ssh = device
    eval_npz = None
    if runtime.measures_accuracy_on_device:
        images, labels = data.split("test")
        eval_npz = out / "eval.npz"
        np.savez(eval_npz, images=images, labels=labels)
    measured = with_statistics(remote_benchmark(spec, ssh, runtime, _device_job(verified, target, eval_npz, out)))
    if eval_npz is not None:
        eval_npz.unlink()
    return BenchmarkResult(candidate=verified.candidate, artifact=verified.artifact, measured=measured,
                           where=f"device {spec} over SSH")


def _device_job(verified, target: Target, eval_npz: Path | None = None, log_dir: Path | None = None):
    from edgecompress.deploy.remote import DeviceJob

    return DeviceJob(artifact=verified.artifact, warmup=BENCH_WARMUP, runs=BENCH_RUNS, rounds=BENCH_ROUNDS,
                     precision=verified.candidate.quant.precision,
                     sparse=get_method(verified.candidate.prune.method).uses_sparse_kernels(target),
                     eval_npz=eval_npz, log_dir=log_dir)


def retimed(benched: BenchmarkResult, target: Target, device=None) -> dict:
    """The same artifact timed once more in a fresh process, here or on the device, merged with the first timing."""
    runtime = target.runtime()
    if device is None:
        again = runtime.benchmark(benched.artifact, warmup=BENCH_WARMUP, runs=BENCH_RUNS, rounds=BENCH_ROUNDS,
                                  threads=benched.threads)
    else:
        from edgecompress.deploy.remote import remote_benchmark

        again = remote_benchmark(*device, runtime, _device_job(benched, target))
    return merged(benched.measured, again)


def at_precision(compressed: CompressedModel, precision: str, target: Target, data: Dataset, workdir: Path) -> CalibratedModel:
    """Export and calibrate one compressed model at another precision (for sweeps that compress once)."""
    candidate = dataclasses.replace(compressed.candidate, quant=QuantSpec(precision=precision))
    compressed = dataclasses.replace(compressed, candidate=candidate)
    for sub in ("export", "calibrate"):
        (workdir / precision / sub).mkdir(parents=True)
    exported = export(compressed, target, data, workdir / precision / "export")
    return calibrate(exported, target, data, workdir / precision / "calibrate")


def _verify_batch(exported: ExportedModel) -> int:
    """Images per session call in verify: a user's graph that could not be given a free batch axis takes one."""
    if exported.onnx.is_file():
        from edgecompress.onnx_model import fixed_batch

        return fixed_batch(exported.onnx) or 64
    return 64


# ---------------------------------------------------------------- orchestration
class Pipeline:
    """Runs the stages for a candidate inside ``run_dir``, caching finished stages."""

    def __init__(self, run_dir: Path, target: Target, data: Dataset, entries: dict[str, ModelEntry], finetune_spec: FinetuneSpec,
                 device=None, int8_max_drop: float | None = None, calibration=None, calibration_key: str = "real",
                 teacher: bool = False, baselines: dict[str, float] | None = None):
        self.run_dir = Path(run_dir).resolve()
        self.target = target
        self.data = data
        self.entries = entries
        self.finetune_spec = finetune_spec
        self.device = device  # (DeviceSpec, SshOptions) or None: benchmark here
        self.int8_max_drop = int8_max_drop  # accuracy-aware int8 within this drop (None: plain PTQ)
        # () -> (images or None for the real split, info for the report); called on the first int8 candidate only.
        self.calibration = calibration
        self.calibration_key = calibration_key
        self.teacher = teacher  # fine-tune compressed candidates with their parent as teacher
        self.baselines = baselines or {}  # model -> uncompressed top-1 on data's test split, where known
        self.reused: list[str] = []

    def candidate_dir(self, candidate: Candidate) -> Path:
        return self.run_dir / "candidates" / candidate.id

    def _stage(self, candidate: Candidate, name: str, key: str, cls, fn):
        stage_dir = self.candidate_dir(candidate) / name
        marker = stage_dir / "stage.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("spec_hash") == key:
                self.reused.append(f"{candidate.id}/{name}")
                return _from_json(cls, saved["artifact"], self.run_dir)
        with atomic_path(stage_dir) as tmp:
            tmp.mkdir()
            started = time.time()
            artifact = _moved(fn(tmp), tmp.resolve(), stage_dir)
            write_json(tmp / "stage.json", {
                "stage": name, "spec_hash": key, "seconds": round(time.time() - started, 3),
                "artifact": _to_json(artifact, self.run_dir),
            })
        return artifact

    def run_candidate(self, candidate: Candidate, *, progress=None,
                      threads: int | None = None) -> tuple[CompressedModel, CalibratedModel, VerifiedModel, BenchmarkResult]:
        """Every stage of one candidate (reusing finished ones); ``threads``: what its benchmark runs on (benchmark)."""
        entry = self.entries[candidate.model]
        data_key = self.data.fingerprint()
        k_compress = spec_hash("compress", candidate, get_method(candidate.prune.method).settings_hash(), self.finetune_spec,
                               entry.sha256, data_key, *(["teacher"] if self.teacher else []))
        compressed = self._stage(candidate, "compress", k_compress, CompressedModel,
                                 lambda out: compress(candidate, entry, self.data, self.finetune_spec, out, progress=progress,
                                                      teacher=self.teacher,
                                                      baseline_accuracy=self.baselines.get(candidate.model)))
        k_export = spec_hash("export", k_compress, self.target.name)
        exported = self._stage(candidate, "export", k_export, ExportedModel,
                               lambda out: export(compressed, self.target, self.data, out))
        k_calib = spec_hash("calibrate", k_export, self.int8_max_drop, self.calibration_key,
                            self.target.runtime().quant_preset().key())
        calibrated = self._stage(candidate, "calibrate", k_calib, CalibratedModel,
                                 lambda out: calibrate(exported, self.target, self.data, out, self.int8_max_drop,
                                                       self.calibration() if self.calibration and candidate.quant.precision == "int8" else None))
        k_verify = spec_hash("verify", k_calib)
        verified = self._stage(candidate, "verify", k_verify, VerifiedModel,
                               lambda out: verify(calibrated, self.target, self.data, _verify_batch(exported)))
        threads = None if self.device else threads  # a remote device runs the runtime's own choice
        k_bench = spec_hash("benchmark", k_verify, BENCH_RUNS, BENCH_ROUNDS, str(self.device[0]) if self.device else "local",
                            *([f"threads={threads}"] if threads else []))
        benched = self._stage(candidate, "benchmark", k_bench, BenchmarkResult,
                              lambda out: benchmark(verified, self.target, self.data, out, self.device, threads))
        return compressed, calibrated, verified, benched
