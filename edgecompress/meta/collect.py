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
import json
import math
import os
import tempfile
import time
from pathlib import Path

from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec, get_method, spec_hash
from edgecompress.core.errors import OWN_MISTAKES, UsageError, one_line
from edgecompress.core.fsutil import atomic_path, locked, write_json

PRECISIONS = ("fp32", "fp16", "int8")
EVAL_TARGET = "openvino-cpu"  # the runtime whose int8/fp16 arithmetic the accuracies come from
# A row is one measurement of exactly these; the method's settings and the fine-tuning recipe are hashes, so a changed
# setting makes new rows instead of mixing with the old (rows from before settings were recorded have none).
# int8 rows also carry the runtime's quantization preset (quant_settings): the int8 fixes of session 6 changed what
# an int8 row measures without changing the method or the recipe.
# And every row, the precision OpenVINO's CPU plugin computed float layers in (eval_inference_precision): "bf16" on
# CPUs with bfloat16 instructions, where an fp32 IR runs in bfloat16 unless told otherwise; "f32" elsewhere.
KEY_COLUMNS = ("dataset", "model", "method", "method_settings", "ratio", "precision", "recipe", "quant_settings",
               "eval_inference_precision")
# Collection order: the methods of the first meta-dataset first (leave-one-task-out needs them on both tasks), then
# the newer ones; a method not named here comes last.
METHOD_ORDER = ("none", "torch_pruning.l1", "nncf.magnitude_global", "nncf.magnitude_local", "woodfisher", "nncf.rb",
                "lowrank", "sparse24")


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


def eval_inference_precision() -> str:
    from edgecompress.runtimes.openvino import cpu_inference_precision

    assert EVAL_TARGET == "openvino-cpu", "eval_inference_precision reads OpenVINO's CPU plugin"
    return cpu_inference_precision()


def quant_settings(precision: str) -> str:
    """The key of the evaluation runtime's int8 preset for an int8 row; empty for float rows."""
    from edgecompress.targets import get_target

    return get_target(EVAL_TARGET).runtime().quant_preset().key() if precision == "int8" else ""


def zoo_models_for(data_dir) -> list[str]:
    """The zoo trained on ``data_dir`` (None: the digits; a task's name: its zoo); a UsageError for a user's folder."""
    from edgecompress.data.datasets import DIGITS_NAME
    from edgecompress.models import list_models, zoo_tasks

    task = DIGITS_NAME if data_dir is None else str(data_dir)
    if data_dir is not None and (task not in zoo_tasks() or Path(data_dir).is_dir()):
        raise UsageError(f"the embedded zoos are trained on {', '.join(zoo_tasks())}; with --data {data_dir}, "
                         "name the models: --models timm:ARCH=weights.pth")
    return list_models(task=task)


def run_job(job: CollectJob, data=None) -> tuple[list[dict], dict[str, str]]:
    """Compress once, evaluate at each precision; runs inside a Ray worker (or inline).

    ``data`` is the loaded dataset (from Ray's object store: :func:`collect` puts it there once); without it the job
    loads its own. Returns the rows and, by precision, why one could not be measured: a runtime that refuses the
    compressed model at one precision (OpenVINO could not compile one int8 model, "could not append an elementwise
    post-op") costs that precision's row, not the other precisions'. A compression that fails raises."""
    import torch

    from edgecompress import pipeline
    from edgecompress.data.datasets import DIGITS_NAME, load_dataset
    from edgecompress.meta.features import FEATURES_VERSION, Featurizer
    from edgecompress.models import load_model, parse_model_spec
    from edgecompress.targets import get_target

    torch.set_num_threads(max(1, int(os.environ.get("EDGECOMPRESS_THREADS", os.cpu_count() or 1))))
    if data is None:
        data = load_dataset(Path(job.data_dir) if job.data_dir else None, job.image_size)
    entry = parse_model_spec(job.model_spec, task=data.task or DIGITS_NAME)
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
        errors = {}
        for precision in job.precisions:
            t0 = time.time()
            try:
                calibrated = pipeline.at_precision(compressed, precision, target, data, tmp)
                accuracy = pipeline.verify(calibrated, target, data).accuracy
            except pipeline.NumericalError:
                accuracy = 0.0  # non-finite outputs: as useless as a wrong answer
            except OWN_MISTAKES:
                raise
            except Exception as exc:  # noqa: BLE001 - a converter or runtime that refuses this precision's model
                errors[precision] = one_line(exc, 300)
                continue
            rows.append({
                "dataset": data.fingerprint(), "task": data.task or data.name, "model": entry.name,
                "architecture": entry.architecture,
                "method": job.method, "method_settings": get_method(job.method).settings_hash(),
                "ratio": float(job.ratio), "precision": precision, "quant_settings": quant_settings(precision),
                "eval_inference_precision": eval_inference_precision(),
                "recipe": spec_hash(job.finetune), "finetune_steps": compressed.finetune_steps,
                "accuracy": accuracy, "parent_accuracy": compressed.baseline_accuracy,
                "accuracy_drop": compressed.baseline_accuracy - accuracy,
                "torch_accuracy": compressed.pruned_accuracy_torch,
                "params_after": compressed.params, "zero_share": compressed.zero_share,
                "eval_runtime": EVAL_TARGET, "features_version": FEATURES_VERSION,
                "wall_seconds": compress_seconds + (time.time() - t0),
                "compress_seconds": compress_seconds, "precision_seconds": time.time() - t0,
                **featurizer.candidate_features(job.method, job.ratio, precision),
            })
    return rows, errors


def features_finite(row: dict) -> bool:
    return all(v is not None and math.isfinite(v) for k, v in row.items() if k.startswith("f_"))


def changed_since(version) -> set[str] | None:
    """The feature groups (features.VERSION_CHANGES) today's version changed since ``version``; None where a row of
    that version must be recomputed whole (older than the changes listed)."""
    from edgecompress.meta.features import FEATURES_VERSION, VERSION_CHANGES

    if version is None or not all(v in VERSION_CHANGES for v in range(int(version) + 1, FEATURES_VERSION + 1)):
        return None
    return {g for v in range(int(version) + 1, FEATURES_VERSION + 1) for g in VERSION_CHANGES[v]}


def refresh_features(path: Path, *, console=None) -> int:
    """Recompute the meta-features of every stale row in ``path`` (an older FEATURES_VERSION, or a feature that is no
    number) with today's code, keeping what was measured; the number of rows recomputed.

    Features are a pure function of (model, task, method, ratio, precision), so after a feature change the
    collected accuracies stay valid; each row's task (its ``task`` column, the digits for rows without one) gives
    the data and the zoo. The file is rewritten (atomic rename) after each parent model, its rows marked with
    today's FEATURES_VERSION, so an interrupted refresh resumes with the parents not yet done.
    """
    import torch
    from rich.progress import Progress

    from edgecompress.compress.finetune import evaluate_torch
    from edgecompress.data.datasets import DIGITS_NAME, NAMED_DATASETS, load_dataset
    from edgecompress.meta.features import FEATURE_DOCS, FEATURES_VERSION, Featurizer
    from edgecompress.models import get_model, list_models, load_model

    rows = read_rows(path)
    if not rows:
        raise UsageError(f"{path} holds no rows to refresh")
    parent = lambda r: (r.get("task") or DIGITS_NAME, r["model"])
    stale_rows: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        # Rows added since (a collection) are current already; a row with a feature that is no number predates a fix.
        if r.get("features_version") != FEATURES_VERSION or not features_finite(r):
            stale_rows.setdefault(parent(r), []).append(r)
    stale = sorted(stale_rows)
    for task in sorted({t for t, _ in stale}):
        if task not in NAMED_DATASETS:
            raise UsageError(f"--refresh-features recomputes rows of the named tasks only; {path} has rows of {task}")
        unknown = sorted({m for t, m in stale if t == task} - set(list_models(task=task)))
        if unknown:
            raise UsageError(f"--refresh-features recomputes zoo models only; {path} also has {', '.join(unknown)} ({task})")
    # One thread, as the planner featurizes: small forward passes (WoodFisher's are per sample), and a second thread
    # beside a busy core (a collection) waits for it: a parent took over 4 minutes with two, beside one worker.
    torch.set_num_threads(1)
    done, datasets = 0, {}
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("refresh features", total=sum(map(len, stale_rows.values())))
        for task, name in stale:
            if task not in datasets:
                datasets = {task: load_dataset(None if task == DIGITS_NAME else task, 32)}
            data = datasets[task]
            model = load_model(get_model(name, task=task), data.num_classes)
            featurizer = Featurizer(model, data, evaluate_torch(model, *data.split("test")))
            mine = sorted(stale_rows[(task, name)], key=lambda r: (r["method"], r["ratio"]))
            fresh = {}
            for r in mine:
                groups = changed_since(r.get("features_version")) if features_finite(r) else None
                if groups is None:
                    feats = featurizer.candidate_features(r["method"], r["ratio"], r["precision"])
                else:  # the rest is what today's code computes
                    feats = dict(r)
                    if "model" in groups:
                        feats |= featurizer.model_features()
                    if "probe" in groups:
                        feats |= featurizer.probe_features(r["method"], r["ratio"])
                fresh[row_key(r)] = {k: feats[k] for k in FEATURE_DOCS}
                progress.advance(bar)
            # Read again under the lock: a collection may have appended rows (of any parent) since.
            with locked(path):
                now = read_rows(path)
                for i, r in enumerate(now):
                    if row_key(r) in fresh and parent(r) == (task, name):
                        now[i] = {**{k: v for k, v in r.items() if not k.startswith("f_")},
                                  **fresh[row_key(r)], "features_version": FEATURES_VERSION}
                _write_rows(path, now)
            done += len(mine)
    return done


def current_rows(rows: list[dict]) -> list[dict]:
    """The rows that measure what today's code builds: a registered method at its current settings, the default
    fine-tuning recipe, and for int8 the evaluation runtime's current preset. Older rows stay in the file (a
    collection skips what it has) but neither train nor evaluate the predictor."""
    from edgecompress.compress.methods import METHODS

    settings = {name: method.settings_hash() for name, method in METHODS.items()}
    recipe, quant = spec_hash(FinetuneSpec()), quant_settings("int8")
    return [r for r in rows if r.get("method_settings") == settings.get(r["method"]) and r.get("recipe") == recipe
            and (r["precision"] != "int8" or r.get("quant_settings") == quant)]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def append_rows(path: Path, new_rows: list[dict]) -> int:
    """Rewrite the parquet with the new rows under a temporary name, then rename: all or nothing."""
    with locked(path):
        rows = read_rows(path) + new_rows
        _write_rows(path, rows)
    return len(rows)


def _write_rows(path: Path, rows: list[dict]) -> None:
    """Rewrite the parquet under a temporary name, then rename: all or nothing. Every column any row has is kept (a
    row without it reads None): pyarrow takes the columns of the first row only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), tmp)


def plan_jobs(models, methods, ratios, precisions, finetune, data_dir, image_size) -> list[CollectJob]:
    """Every (model, method, ratio), models innermost: a partial collection covers every architecture.

    Methods go in :data:`METHOD_ORDER` (the uncompressed baselines first), each at its levels unless ``ratios`` are
    given.
    """
    jobs = []
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    for method in sorted(methods, key=lambda m: (rank.get(m, len(rank)), m)):
        method_ratios = get_method(method).levels if ratios is None else (
            (0.0,) if method == "none" else tuple(r for r in ratios if r > 0))
        for ratio in method_ratios:
            for model in models:
                jobs.append(CollectJob(model_spec=model, method=method, ratio=float(ratio), precisions=tuple(precisions),
                                       finetune=finetune, data_dir=str(data_dir) if data_dir else None, image_size=image_size))
    return jobs


def pending(jobs: list[CollectJob], done_keys: set, dataset_key: str, model_names: dict) -> list[CollectJob]:
    """The jobs with a row still to measure, each narrowed to the precisions it lacks."""
    out = []
    # The runtime's parts of the key are the same for every job: read once, not per job and precision.
    quant = {p: quant_settings(p) for p in PRECISIONS}
    inference = eval_inference_precision()
    for job in jobs:
        head = (dataset_key, model_names[job.model_spec], job.method, get_method(job.method).settings_hash(), job.ratio)
        recipe = spec_hash(job.finetune)
        missing = tuple(p for p in job.precisions if (*head, p, recipe, quant[p], inference) not in done_keys)
        if missing:
            # Only the precisions without a row: a new int8 preset recollects int8, not the float rows beside it.
            out.append(dataclasses.replace(job, precisions=missing))
    return out


def collect(*, out: Path, models, methods, ratios, precisions, finetune: FinetuneSpec, data_dir, image_size: int,
            address: str | None, console, workers: int = 1) -> dict:
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
    from edgecompress.data.datasets import DIGITS_NAME

    data = load_dataset(Path(data_dir) if data_dir else None, image_size)
    model_names = {m: parse_model_spec(m, task=data.task or DIGITS_NAME).name for m in models}
    jobs = plan_jobs(models, methods, ratios, precisions, finetune, data_dir, image_size)
    done = {row_key(r) for r in read_rows(out)}
    todo = pending(jobs, done, data.fingerprint(), model_names)
    console.print(f"{len(jobs)} compressions planned ({len(jobs) * len(precisions)} rows); "
                  f"{len(jobs) - len(todo)} complete in {out}, {len(todo)} to run for "
                  f"{sum(len(j.precisions) for j in todo)} rows")
    if not todo:
        return {"rows": len(done), "new_rows": 0, "seconds": 0.0}
    if address:
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    else:
        # ``workers`` tasks at a time, the cores shared out as torch threads: most of a job (NNCF's statistics
        # collection on a batch-1 graph) runs on one core whatever the thread count.
        threads = max(1, (os.cpu_count() or 1) // workers)
        ray.init(num_cpus=workers, log_to_driver=False, include_dashboard=False,
                 runtime_env={"env_vars": {"EDGECOMPRESS_THREADS": str(threads)}})
    task = ray.remote(num_cpus=1, max_retries=1)(run_job)
    started = time.time()
    new_rows = 0
    # Compressions that failed, by (model, method, ratio), over every run on this file; a success takes one off.
    failures_path = out.with_suffix(".failures.json")
    failures = {(f["model"], f["method"], f["ratio"]): f for f in
                (json.loads(failures_path.read_text()) if failures_path.is_file() else [])}
    try:
        data_ref = ray.put(data)  # once: every job reads its arrays from the object store instead of decoding the files
        in_flight = {task.remote(job, data_ref): job for job in todo}
        with Progress(TextColumn("meta collect"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task("collect", total=len(todo))
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                job = in_flight.pop(ready[0])
                key = (job.model_spec, job.method, job.ratio)
                try:
                    rows, errors = ray.get(ready[0])
                    refused, error = sorted(errors), "; ".join(f"{p}: {e}" for p, e in errors.items())
                except ray.exceptions.RayTaskError as exc:
                    # One compression that fails (a method that cannot handle an architecture) costs its rows, not
                    # the collection: it is said and kept in the failures file, and tried again by the next run.
                    cause = exc.as_instanceof_cause()
                    rows, refused = [], list(job.precisions)
                    error = ([line for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__])[-1][:300]
                if refused:
                    # The failures file names the precisions without a row: those a runtime refused, or all of them.
                    failures[key] = {"model": job.model_spec, "method": job.method, "ratio": job.ratio,
                                     "precisions": refused, "error": error}
                    console.print(f"failed: {job.model_spec} {job.method} {job.ratio}: {error}")
                    write_json(failures_path, list(failures.values()))
                elif failures.pop(key, None):
                    write_json(failures_path, list(failures.values()))
                fresh = [r for r in rows if row_key(r) not in done]
                if fresh:
                    append_rows(out, fresh)
                    done |= {row_key(r) for r in fresh}
                    new_rows += len(fresh)
                progress.update(bar, advance=1, description=f"{job.model_spec} {job.method} {job.ratio:.1f}")
    finally:
        ray.shutdown()
    if not failures and failures_path.exists():
        failures_path.unlink()
    return {"rows": len(done), "new_rows": new_rows, "failed": len(failures), "seconds": round(time.time() - started, 1)}
