"""``edgecompress meta collect``: the meta-dataset of past compressions, on Ray.

One Ray task compresses one (model, method, ratio) exactly as ``build`` does
(prune, fine-tune), then exports, calibrates and verifies it at every
precision in OpenVINO, giving one row per precision: the spec, the
meta-features, the measured top-1 of the compressed model and of its
uncompressed parent, and the wall time. Rows are appended to the parquet file
as each task finishes (the whole file rewritten under a temporary name and
renamed), so a crash or Ctrl-C loses no finished row; a rerun skips the rows
already present.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec, get_method, spec_hash
from edgecompress.core.errors import UsageError
from edgecompress.core.fsutil import atomic_path

PRECISIONS = ("fp32", "fp16", "int8")
EVAL_TARGET = "openvino-cpu"  # the runtime whose int8/fp16 arithmetic the accuracies come from
# A row is one measurement of exactly these; the method's settings and the fine-tuning recipe are hashes, so a changed
# setting makes new rows instead of mixing with the old (rows from before settings were recorded have none).
KEY_COLUMNS = ("dataset", "model", "method", "method_settings", "ratio", "precision", "recipe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectJob:
    model_spec: str
    method: str
    ratio: float
    precisions: tuple[str, ...]
    finetune: FinetuneSpec
    data_dir: str | None
    image_size: int


def row_key(row: dict) -> tuple:
    return tuple(row.get(c) for c in KEY_COLUMNS)


def run_job(job: CollectJob) -> list[dict]:
    """Compress once, evaluate at each precision; runs inside a Ray worker (or inline)."""
    import torch

    from edgecompress import pipeline
    from edgecompress.data.datasets import load_dataset
    from edgecompress.meta.features import FEATURES_VERSION, Featurizer
    from edgecompress.models import load_model, parse_model_spec
    from edgecompress.targets import get_target

    torch.set_num_threads(max(1, int(os.environ.get("EDGECOMPRESS_THREADS", os.cpu_count() or 1))))
    data = load_dataset(Path(job.data_dir) if job.data_dir else None, job.image_size)
    entry = parse_model_spec(job.model_spec)
    target = get_target(EVAL_TARGET)
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cand = Candidate(model=entry.name, prune=PruneSpec(method=job.method, ratio=job.ratio), quant=QuantSpec())
        (tmp / "c").mkdir()
        compressed = pipeline.compress(cand, entry, data, job.finetune, tmp / "c")
        compress_seconds = time.time() - started
        # compress measured the parent's test accuracy already; the features use that figure.
        featurizer = Featurizer(load_model(entry, data.num_classes), data, compressed.baseline_accuracy)
        for precision in job.precisions:
            t0 = time.time()
            calibrated = pipeline.at_precision(compressed, precision, target, data, tmp)
            try:
                accuracy = pipeline.verify(calibrated, target, data).accuracy
            except pipeline.NumericalError:
                accuracy = 0.0  # non-finite outputs: as useless as a wrong answer
            rows.append({
                "dataset": data.fingerprint(), "model": entry.name, "architecture": entry.architecture,
                "method": job.method, "method_settings": get_method(job.method).settings_hash(),
                "ratio": float(job.ratio), "precision": precision,
                "recipe": spec_hash(job.finetune), "finetune_steps": compressed.finetune_steps,
                "accuracy": accuracy, "parent_accuracy": compressed.baseline_accuracy,
                "accuracy_drop": compressed.baseline_accuracy - accuracy,
                "torch_accuracy": compressed.pruned_accuracy_torch,
                "params_after": compressed.params, "zero_share": compressed.zero_share,
                "eval_runtime": EVAL_TARGET, "features_version": FEATURES_VERSION,
                "wall_seconds": compress_seconds + (time.time() - t0),
                **featurizer.candidate_features(job.method, job.ratio, precision),
            })
    return rows


def refresh_features(path: Path, *, data_dir=None, image_size: int = 32, console=None) -> int:
    """Recompute the meta-features of every row in ``path`` with today's code, keeping what was measured.

    Features are a pure function of (model, dataset, method, ratio, precision), so after a feature
    change the collected accuracies stay valid; rows are rewritten all at once (atomic rename).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from rich.progress import Progress

    from edgecompress.compress.finetune import evaluate_torch
    from edgecompress.data.datasets import load_dataset
    from edgecompress.meta.features import FEATURE_DOCS, Featurizer
    from edgecompress.models import get_model, list_models, load_model

    rows = read_rows(path)
    if not rows:
        raise UsageError(f"{path} holds no rows to refresh")
    data = load_dataset(Path(data_dir) if data_dir else None, image_size)
    zoo = set(list_models())
    unknown = sorted({r["model"] for r in rows} - zoo)
    if unknown:
        raise UsageError(f"--refresh-features recomputes zoo models only; {path} also has {', '.join(unknown)}")
    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("refresh features", total=len(rows))
        for name, model_rows in by_model.items():
            model = load_model(get_model(name), data.num_classes)
            featurizer = Featurizer(model, data, evaluate_torch(model, *data.split("test")))
            for r in sorted(model_rows, key=lambda r: (r["method"], r["ratio"])):
                kept = {k: v for k, v in r.items() if not k.startswith("f_")}
                feats = featurizer.candidate_features(r["method"], r["ratio"], r["precision"])
                out.append({**kept, **{k: feats[k] for k in FEATURE_DOCS}})
                progress.advance(bar)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(out), tmp)
    return len(out)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def append_rows(path: Path, new_rows: list[dict]) -> int:
    """Rewrite the parquet with the new rows under a temporary name, then rename: all or nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(path) + new_rows
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return len(rows)


def plan_jobs(models, methods, ratios, precisions, finetune, data_dir, image_size) -> list[CollectJob]:
    """Every (model, method, ratio), models innermost: a partial collection covers every architecture.

    The uncompressed baselines come first, then channel pruning (what speeds up dense kernels), then the rest.
    """
    jobs = []
    order = {"none": 0, "channel": 1}
    for method in sorted(methods, key=lambda m: (order.get(get_method(m).kind, 2), m)):
        method_ratios = get_method(method).levels if ratios is None else (
            (0.0,) if method == "none" else tuple(r for r in ratios if r > 0))
        for ratio in method_ratios:
            for model in models:
                jobs.append(CollectJob(model_spec=model, method=method, ratio=float(ratio), precisions=tuple(precisions),
                                       finetune=finetune, data_dir=str(data_dir) if data_dir else None, image_size=image_size))
    return jobs


def pending(jobs: list[CollectJob], done_keys: set, dataset_key: str, model_names: dict) -> list[CollectJob]:
    out = []
    for job in jobs:
        settings = get_method(job.method).settings_hash()
        keys = {(dataset_key, model_names[job.model_spec], job.method, settings, job.ratio, p, spec_hash(job.finetune))
                for p in job.precisions}
        if not keys <= done_keys:
            out.append(job)
    return out


def collect(*, out: Path, models, methods, ratios, precisions, finetune: FinetuneSpec, data_dir, image_size: int,
            address: str | None, console) -> dict:
    import ray
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from edgecompress.data.datasets import load_dataset
    from edgecompress.models import parse_model_spec

    if out.suffix != ".parquet":
        raise UsageError(f"--out {out}: the meta-dataset is written as parquet; name it *.parquet")
    data = load_dataset(Path(data_dir) if data_dir else None, image_size)
    model_names = {m: parse_model_spec(m).name for m in models}
    jobs = plan_jobs(models, methods, ratios, precisions, finetune, data_dir, image_size)
    done = {row_key(r) for r in read_rows(out)}
    todo = pending(jobs, done, data.fingerprint(), model_names)
    console.print(f"{len(jobs)} compressions planned ({len(jobs) * len(precisions)} rows); "
                  f"{len(jobs) - len(todo)} already in {out}")
    if not todo:
        return {"rows": len(done), "new_rows": 0, "seconds": 0.0}
    if address:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    else:
        # One task at a time on a small machine: two torch processes on two cores slow each other several times over.
        ray.init(num_cpus=1, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": {"EDGECOMPRESS_THREADS": str(os.cpu_count() or 1)}})
    task = ray.remote(num_cpus=1, max_retries=1)(run_job)
    started = time.time()
    new_rows = 0
    try:
        in_flight = {task.remote(job): job for job in todo}
        with Progress(TextColumn("meta collect"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task("collect", total=len(todo))
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                job = in_flight.pop(ready[0])
                rows = ray.get(ready[0])
                fresh = [r for r in rows if row_key(r) not in done]
                if fresh:
                    append_rows(out, fresh)
                    done |= {row_key(r) for r in fresh}
                    new_rows += len(fresh)
                progress.update(bar, advance=1, description=f"{job.model_spec} {job.method} {job.ratio:.1f}")
    finally:
        ray.shutdown()
    return {"rows": len(done), "new_rows": new_rows, "seconds": round(time.time() - started, 1)}
