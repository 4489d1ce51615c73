"""The ``edgecompress`` command line.

Errors the tool raises on purpose become one line on stderr: exit 2 for bad
input, 1 for anything else. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from edgecompress.core.errors import EdgecompressError, UsageError, one_line
from edgecompress.core.units import parse_duration_s, parse_fraction, parse_latency_ms, parse_size_bytes


def _budget(latency, memory, max_drop, latency_stat="p90"):
    from edgecompress.plan.planner import Budget

    return Budget(
        latency_ms=parse_latency_ms(latency) if latency is not None else None,
        memory_mb=parse_size_bytes(memory) / 1e6 if memory is not None else None,
        max_accuracy_drop=parse_fraction(max_drop) if max_drop is not None else None,
        latency_stat=latency_stat,
    )


_LATENCY_STAT = click.option(
    "--latency-stat", type=click.Choice(["median", "p90", "p99"]), default="p90", show_default=True,
    help="Which measured latency the budget holds (over timed rounds, batch 1; MLPerf SingleStream reports p90).")


def _device_options(fn):
    """--device and its SSH options, shared by build and bench."""
    options = [
        click.option("--device", "device", metavar="USER@HOST[:PORT]", help="Benchmark on this device over SSH."),
        click.option("--identity", type=click.Path(path_type=Path), help="SSH private key (default: agent and ~/.ssh keys)."),
        click.option("--known-hosts", type=click.Path(path_type=Path), help="known_hosts file (default: ~/.ssh/known_hosts)."),
        click.option("--accept-new-host-key", is_flag=True, help="Trust and record a host key seen for the first time."),
        click.option("--remote-python", default="python3", show_default=True, help="Python on the device (with numpy and the runtime)."),
        click.option("--remote-trtexec", help="trtexec on the device (default: PATH, then /usr/src/tensorrt/bin)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _device(device, identity, known_hosts, accept_new_host_key, remote_python, remote_trtexec):
    if device is None:
        if identity or known_hosts or accept_new_host_key or remote_trtexec:
            raise UsageError("--identity, --known-hosts, --accept-new-host-key and --remote-trtexec need --device USER@HOST")
        return None
    from edgecompress.deploy.remote import SshOptions, parse_device

    return parse_device(device), SshOptions(identity=identity, known_hosts=known_hosts,
                                            accept_new_host_key=accept_new_host_key, python=remote_python,
                                            trtexec=remote_trtexec)


def _triple(text: str | None, flag: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UsageError(f"{flag} {text!r}: write three numbers, R,G,B (for example 0.485,0.456,0.406)")
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="edgecompress")
def cli(debug):
    """Compress a trained network until it fits an edge device's budget."""


@cli.command()
@click.option("--target", "target_name", required=True, help="Device target (see `edgecompress targets`).")
@click.option("--latency", help="Latency budget, e.g. 10ms, 800us, 1.2s (batch 1; see --latency-stat).")
@_LATENCY_STAT
@click.option("--memory", help="Memory budget, e.g. 8MB, 512KiB.")
@click.option("--max-accuracy-drop", "max_drop", default="2%", show_default=True,
              help="Allowed top-1 drop against the uncompressed model, e.g. 1% or 0.01.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="ImageFolder directory, or a named dataset: digits (the default), fashion-mnist (Debian's package).")
@click.option("--model", "models", multiple=True, help="Zoo name or timm:ARCH=weights.pth; repeatable (default: the zoo).")
@click.option("--method", "methods", multiple=True,
              help="Pruning method to sweep; repeatable (default: those the shipped meta-dataset covers).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Precision to consider; repeatable (default: every one the target runs).")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory (default: runs/<timestamp>).")
@click.option("--resume", type=click.Path(path_type=Path), metavar="DIR", help="Continue the run in DIR, reusing finished stages.")
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
@click.option("--max-tries", default=4, show_default=True, type=click.IntRange(1, 100), help="Candidates to build before giving up.")
@click.option("--image-size", type=click.IntRange(8, 1024),
              help="Input resolution (default: 32 for digits/fashion-mnist, the model's pretrained_cfg, or a folder's typical size).")
@click.option("--mean", callback=lambda ctx, param, v: _triple(v, "--mean"), metavar="R,G,B",
              help="Normalisation mean of a folder's images, e.g. 0.485,0.456,0.406 (default: what the models expect).")
@click.option("--std", callback=lambda ctx, param, v: _triple(v, "--std"), metavar="R,G,B", help="Normalisation std, like --mean.")
@click.option("--finetune-steps", default=150, show_default=True, type=click.IntRange(0, 100000), help="Optimiser steps of fine-tuning after pruning.")
@click.option("--archive", is_flag=True, help="Also write the bundle as bundle.tar.gz.")
@click.option("--calib", "calib_mode", type=click.Choice(["auto", "real", "synth"]), default="auto", show_default=True,
              help="int8 calibration data: real images, synthesized ones, or synthesized when fewer than 300 real.")
@click.option("--synth-steps", default=1000, show_default=True, type=click.IntRange(1, 10000000),
              help="Training steps of the calibration synthesizer (with --calib synth/auto).")
@click.option("--time-budget", help="Wall time for the whole build, e.g. 10min, 900s (transfer and fine-tunes shrink to fit).")
@click.option("--transfer-top", default=2, show_default=True, type=click.IntRange(1, 50),
              help="With data no zoo was trained on: backbones to transfer (the plan's best by a linear probe).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout.")
@_device_options
def build(target_name, latency, latency_stat, memory, max_drop, data_dir, models, methods, precisions, out, resume, force, max_tries, image_size, mean, std, finetune_steps,
          archive, calib_mode, synth_steps, time_budget, transfer_top, as_json, device, identity, known_hosts, accept_new_host_key, remote_python, remote_trtexec):
    """Plan, compress, export, calibrate, verify and benchmark for TARGET."""
    from edgecompress.build import BuildOptions, command_line, run_build
    from edgecompress.compress.methods import FinetuneSpec, sweep_for
    from edgecompress.targets import get_target

    if resume and force:
        raise UsageError("--resume and --force contradict each other; pick one")
    if resume and out is not None and Path(out) != Path(resume):
        raise UsageError(f"--resume {resume} and --out {out} name different run directories")
    if resume:
        out = resume
    target = get_target(target_name)
    options = BuildOptions(
        target=target, budget=_budget(latency, memory, max_drop, latency_stat), data_dir=data_dir, model_specs=tuple(models),
        sweep=sweep_for(methods), precisions=tuple(precisions), out=out, resume=bool(resume), force=force, max_tries=max_tries, image_size=image_size, mean=mean, std=std, command=command_line(click.get_current_context().obj["argv"]),
        finetune=FinetuneSpec(steps=finetune_steps), archive=archive, calib=calib_mode, synth_steps=synth_steps,
        time_budget_s=None if time_budget is None else parse_duration_s(time_budget), transfer_top=transfer_top,
        device=_device(device, identity, known_hosts, accept_new_host_key, remote_python, remote_trtexec),
    )
    report = run_build(options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        c = report.choice
        click.echo(f"chose {c['model']} / {c['prune_method']} {c['prune_ratio']:.2f} / {c['precision']}: {_met_with(report)}")
        click.echo(f"bundle: {Path(report.run_dir) / report.bundle}")
        click.echo(f"report: {Path(report.run_dir) / 'report.html'}")


def _met_with(report) -> str:
    """What the budget was met with, in one line: the figure of the budget's own statistic beside the budget."""
    from edgecompress.plan.planner import Budget

    m, budget = report.measured, report.budget
    stat, figure = Budget(**budget).measured_stat(dataclasses.asdict(m))
    if figure is None:
        latency = f"{report.predicted['latency_ms']:.3f} ms predicted (not measured)"
    else:
        latency = f"{stat} {figure:.3f} ms measured" + (f" (median {m.latency_ms_median:.3f} ms)" if stat != "median" else "")
        threads = m.threads
        if threads:
            latency += f" on {threads} inference thread{'s' if threads > 1 else ''}"
    if budget["latency_ms"] is not None:
        latency += f", budget {budget['latency_ms']:g} ms"
    accuracy = f"accuracy {m.accuracy * 100:.2f}% (uncompressed {m.baseline_accuracy * 100:.2f}%"
    if budget["max_accuracy_drop"] is not None:
        accuracy += f", drop allowed {budget['max_accuracy_drop'] * 100:g} pp"
    return f"{latency}; {accuracy})"


@cli.command()
@click.option("--target", "target_name", required=True)
@click.option("--latency")
@_LATENCY_STAT
@click.option("--memory")
@click.option("--max-accuracy-drop", "max_drop")
@click.option("--model", "models", multiple=True)
@click.option("--method", "methods", multiple=True, help="Pruning method to sweep; repeatable.")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8"]), help="Repeatable.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
def plan(target_name, latency, latency_stat, memory, max_drop, models, methods, precisions, top, as_json):
    """Rank candidates for TARGET without compressing anything."""
    import time

    from rich.console import Console

    from edgecompress.build import model_facts, resolve_models
    from edgecompress.compress.methods import sweep_for
    from edgecompress.costmodel.devicecal import ensure_calibrated
    from edgecompress.data.datasets import load_digits
    from edgecompress.meta.predictor import AccuracyModel
    from edgecompress.plan.planner import plan as make_plan
    from edgecompress.targets import get_target

    target = get_target(target_name)
    budget = _budget(latency, memory, max_drop, latency_stat)
    ensure_calibrated(target, Console(stderr=True))
    data = load_digits(32)
    console = Console(stderr=True)
    entries = resolve_models(tuple(models), data)  # a user's checkpoint is read once
    graphs, accuracies = model_facts(entries, data)
    accuracy_model = AccuracyModel.shipped(entries, data, accuracies, console, target=target)
    start = time.perf_counter()
    the_plan = make_plan(target, budget, graphs, accuracies, sweep=sweep_for(methods), accuracy_model=accuracy_model,
                         precisions=tuple(precisions) or None, accuracy_resolution=1.0 / len(data.split("test")[1]))
    plan_ms = (time.perf_counter() - start) * 1e3
    rows = [e.to_dict() for e in the_plan.ranked[:top]]
    if as_json:
        click.echo(json.dumps({"target": target.name, "budget": budget.to_dict(), "accuracy_basis": the_plan.accuracy_basis,
                               "plan_ms": plan_ms, "candidates": len(the_plan.ranked), "recommendations": rows}, indent=2))
        return
    from rich.table import Table

    inside = sum(e.fits for e in the_plan.ranked)
    table = Table(title=f"{target.name}: top {len(rows)} of {len(the_plan.ranked)} candidates, {inside} inside the budget "
                        f"(planned in {plan_ms:.0f} ms)", caption=f"accuracy: {the_plan.accuracy_basis}")
    for col in ("candidate", "pred. latency ms", "pred. memory MB", "pred. accuracy", "lower bound", "fits"):
        table.add_column(col)
    for e in the_plan.ranked[:top]:
        pct = lambda v: f"{v * 100:.2f}%" if v is not None else "?"  # noqa: E731
        table.add_row(e.candidate.id, f"{e.cost.latency_ms:.3f}", f"{e.cost.memory_mb:.1f}",
                      pct(e.accuracy), pct(e.accuracy_low), "yes" if e.fits else "no")
    Console(width=max(Console().width, 140)).print(table)


class _ListByDefault(click.Group):
    """``targets [PATTERN]`` lists; ``targets profile T`` profiles."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_ListByDefault)
def targets():
    """Device targets: list them, or profile one's kernels on this machine."""


@targets.command("list")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True)
def targets_list(pattern, as_json):
    """List device targets (without importing any runtime)."""
    from edgecompress.targets import get_target, list_targets

    names = list_targets(pattern)
    if as_json:
        click.echo(json.dumps([get_target(n).to_dict() for n in names], indent=2))
        return
    for name in names:
        t = get_target(name)
        alias = f" (alias {', '.join(t.aliases)})" if t.aliases else ""
        click.echo(f"{name:18s} {t.runtime_name:12s} {','.join(t.precisions):15s} {t.description}{alias}")


@targets.command("profile")
@click.argument("target_name")
@click.option("--networks", default=60, show_default=True, type=click.IntRange(5, 10000),
              help="Random networks to profile (each at every precision of the target).")
@click.option("--work", type=click.Path(path_type=Path), help="Measurements, kept for resuming "
              "(default: ~/.cache/edgecompress/profile/TARGET).")
@click.option("--out", type=click.Path(path_type=Path), help="Where the fitted model goes "
              "(default: the directory the target's TOML names, else kernels/TARGET beside it).")
@click.option("--seed", default=0, show_default=True)
def targets_profile(target_name, networks, work, out, seed):
    """Time kernels and networks on this machine and refit TARGET's kernel latency model (resumable)."""
    import datetime
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgecompress.core.fsutil import cache_dir
    from edgecompress.costmodel.devicecal import machine_fingerprint
    from edgecompress.costmodel.latency import fit, profile_target
    from edgecompress.targets import get_target

    target = get_target(target_name)
    if not target.local:
        raise UsageError(f"{target.name} runs on another machine and cannot be profiled here; its latency model is "
                         f"the roofline in {target.path}")
    work = work or cache_dir() / "profile" / target.name
    out = out or target.latency.kernels or target.path.parent / "kernels" / target.name
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"profiling {target.name}", total=None)

        def progress(what, done, total):
            bar.update(task, completed=done, total=total, description=f"profiling {target.name}: {what}")

        records = profile_target(target, work, networks=networks, seed=seed, progress=progress)
    model = fit(records, info={"target": target.name, "runtime_version": target.runtime().version(),
                               "machine": machine_fingerprint(target.runtime()),
                               "date": datetime.date.today().isoformat(), "networks": networks, "seed": seed,
                               "command": f"edgecompress targets profile {target.name} --networks {networks}"})
    model.save(out)
    summary = {"target": target.name, "model": str(out), "measurements": str(work / "records.jsonl"),
               "composition": model.composition, "kernel_fit": model.info["kernel_fit"]}
    if target.latency.kernels is None:
        console.print(f"{target.path} does not use it yet: add  kernels = \"{os.path.relpath(out, target.path.parent)}\"  "
                      "to its [latency_model]", markup=False)
    click.echo(json.dumps(summary, indent=2))


@targets.command("calibrate")
@click.argument("target_name")
@click.option("--force", is_flag=True, help="Measure again even where a cached calibration exists.")
@click.option("--json", "as_json", is_flag=True)
def targets_calibrate(target_name, force, as_json):
    """Rescale TARGET's kernel latency model to this machine (about 20 s the first time; cached)."""
    from rich.console import Console

    from edgecompress.costmodel.devicecal import calibrate
    from edgecompress.targets import get_target

    calibration = calibrate(get_target(target_name), force=force, console=Console(stderr=True))
    if as_json:
        click.echo(json.dumps(calibration.to_json(), indent=2))
        return
    how = "read from the cache" if calibration.from_cache else "measured"
    if calibration.fitted_on_this_machine:
        how += "; its kernel model was fitted on this machine, on random networks, not trained ones"
    load = f", load average {calibration.load_average_1m:.1f}" if calibration.load_average_1m is not None else ""
    click.echo(f"{calibration.target}: calibrated to {calibration.where()} ({how}; {calibration.seconds:.1f} s of "
               f"measuring on {calibration.date}{load})")
    for precision, scale in calibration.scales.items():
        ratios = sorted(m.ratio for m in calibration.measurements if m.precision == precision)
        click.echo(f"  {precision}: predictions x{scale:.2f} (median measured / predicted of "
                   f"{', '.join(f'{r:.2f}' for r in ratios)})")
    click.echo(f"cached: {calibration.cache_path}")


@targets.command("refit")
@click.argument("target_name")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="TOML file to write: the target's, with its roofline refitted (its own path, with --force, to replace it).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def targets_refit(target_name, run_dirs, out, force):
    """Refit a device target's roofline to the latencies builds with --device measured on it (RUN_DIRS)."""
    from edgecompress.costmodel.refit import refit
    from edgecompress.targets import get_target

    click.echo(json.dumps(refit(get_target(target_name), list(run_dirs), out, force=force), indent=2))


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", "target_name", required=True)
@click.option("--runs", default=200, show_default=True, type=click.IntRange(1, 100000))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(0, 100000))
@click.option("--eval-npz", type=click.Path(path_type=Path), help="npz with 'images' and 'labels': also measure top-1 there.")
@click.option("--log-dir", type=click.Path(path_type=Path), help="Keep the device's raw log here (with --device).")
@click.option("--threads", type=click.IntRange(1, 1024),
              help="The runtime's inference threads, here (default: its own choice; a bundle's runtime.json says "
                   "what its latency was measured on).")
@_device_options
def bench(artifact, target_name, runs, warmup, eval_npz, log_dir, threads, device, identity, known_hosts,
          accept_new_host_key, remote_python, remote_trtexec):
    """Time ARTIFACT in TARGET's runtime (batch 1), here or on --device, and print JSON."""
    from edgecompress.deploy.timing import with_statistics
    from edgecompress.targets import get_target

    target = get_target(target_name)
    if not artifact.is_file():
        raise UsageError(f"artifact {artifact} does not exist")
    if eval_npz is not None and not eval_npz.is_file():
        raise UsageError(f"--eval-npz {eval_npz} does not exist")
    if threads is not None and device is not None:
        raise UsageError("--threads sets the runtime here; with --device the device's runtime chooses its own")
    remote = _device(device, identity, known_hosts, accept_new_host_key, remote_python, remote_trtexec)
    runtime = target.runtime()
    if artifact.suffix.lower() == ".onnx":
        # Parsed here first: OpenVINO offers a file it cannot read to every frontend, and TensorFlow's prints its
        # own parse errors on stderr before the one line this command owes.
        import onnx
        from google.protobuf.message import DecodeError

        try:
            onnx.load(str(artifact), load_external_data=False)
        except (DecodeError, ValueError, OSError) as exc:
            raise UsageError(f"{artifact} is not an ONNX model: {type(exc).__name__}: {str(exc)[:150]}") from exc
    try:  # a file the runtime cannot load is the user's mistake, not a failed benchmark
        runtime.session(artifact)
    except Exception as exc:  # the runtimes raise their own types for a file that is not a model
        first = one_line(exc)
        raise UsageError(f"{artifact} is not a model {runtime.name} can load: {first}") from exc
    if remote is not None:
        from edgecompress.deploy.remote import DeviceJob, remote_benchmark

        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
        job = DeviceJob(artifact=artifact, warmup=warmup, runs=runs, eval_npz=eval_npz, log_dir=log_dir)
        result = remote_benchmark(*remote, runtime, job)
    else:
        reason = runtime.unavailable_here()
        if reason is not None:
            raise UsageError(f"{target.name} cannot be measured on this machine ({reason}); pass --device USER@HOST")
        result = runtime.benchmark(artifact, warmup=warmup, runs=runs, threads=threads)
    click.echo(json.dumps(with_statistics(result), indent=2))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
def predict(bundle, images, top_k, as_json):
    """Classify IMAGES with BUNDLE (checks its sha256 manifest first)."""
    from edgecompress.deploy.bundle import predict as run_predict

    results = run_predict(bundle, list(images), top_k=top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["image"] + "\t" + "  ".join(f"{t['label']} {t['probability']:.4f}" for t in r["top"]))


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle):
    """Check BUNDLE's sha256 manifest and that its artifact loads and runs."""
    from edgecompress.deploy.bundle import verify_bundle

    result = verify_bundle(bundle)
    click.echo(f"{result['bundle']}: {result['files']} files match the manifest; the {result['precision']} "
               f"artifact for {result['target']} loads and runs in {result['runtime']}")


@cli.group()
def calib():
    """Calibration data: synthesize it with a diffusion model when real images are few."""


@calib.command("synth")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), help="ImageFolder with the few real images (default: the digits).")
@click.option("--per-class", type=click.IntRange(1, 100000), help="Real images per class to learn from (default: all given).")
@click.option("--count", default=512, show_default=True, type=click.IntRange(1, 1000000), help="Images to synthesize.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output ImageFolder directory (must not exist).")
@click.option("--pipeline", "pipeline_path", type=click.Path(path_type=Path), help="A local diffusers pipeline to sample from instead of training.")
@click.option("--model", "model_spec", help="Zoo name or timm:ARCH=weights.pth: quality checks with this model.")
@click.option("--steps", "train_steps", type=click.IntRange(0, 10000000), help="Training steps (default: the spec's).")
@click.option("--sample-steps", type=click.IntRange(1, 1000), help="DDIM steps (default: the spec's).")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(8, 1024))
@click.option("--seed", default=0, show_default=True, type=int)
def calib_synth(data_dir, per_class, count, out, pipeline_path, model_spec, train_steps, sample_steps, image_size, seed):
    """Train a small class-conditional diffusion model on a few real images and write COUNT synthetic ones."""
    import dataclasses

    from rich.console import Console

    from edgecompress.calib.synth import SynthSpec, few_shot, synthesize, to_unit, write_image_folder
    from edgecompress.core.fsutil import atomic_path, write_json
    from edgecompress.data.datasets import load_dataset
    from edgecompress.models import load_model, parse_model_spec

    if out.exists():
        raise UsageError(f"--out {out} exists; synthesized images go to a new directory")
    data = load_dataset(data_dir, image_size)
    spec = SynthSpec(seed=seed)
    spec = dataclasses.replace(spec, **{k: v for k, v in (("train_steps", train_steps), ("sample_steps", sample_steps)) if v})
    model = load_model(parse_model_spec(model_spec), data.num_classes) if model_spec else None
    images, labels = few_shot(data, per_class)
    synthetic, synth_labels, manifest = synthesize(data, images, labels, count=count, spec=spec, pipeline=pipeline_path,
                                                   model=model, console=Console(stderr=True))
    pre = data.preprocess
    with atomic_path(out) as tmp:
        write_image_folder(tmp, to_unit(synthetic, pre.mean, pre.std), synth_labels, data.class_names)
        write_json(tmp / "manifest.json", manifest)
    click.echo(json.dumps(manifest, indent=2))


@cli.group()
def meta():
    """The meta-dataset and the meta-predictor."""


@meta.command("collect")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Parquet file; rows already in it are skipped.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path))
@click.option("--models", "models", multiple=True, help="Repeatable (default: the zoo trained on --data).")
@click.option("--methods", "methods", multiple=True, help="Repeatable (default: every pruning method).")
@click.option("--ratios", help="Comma-separated ratios for every method (default: per-method grids up to 0.9 / 0.7).")
@click.option("--precisions", default="fp32,fp16,int8", show_default=True)
@click.option("--finetune-steps", default=150, show_default=True, type=click.IntRange(0, 100000))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Fine-tuning seed. Part of each row's recipe key: another seed measures the same compressions "
                   "again as new rows (tools/bench_label_noise.py), and only the default trains the predictor.")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(8, 1024))
@click.option("--address", help="Address of an existing Ray cluster (default: a local Ray instance).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Compressions at a time on the local Ray instance (the cores are shared out among them).")
@click.option("--refresh-features", is_flag=True,
              help="Compress nothing: recompute the meta-features of the rows in --out with today's code (after a "
                   "feature change), keeping what was measured. Resumes where an interrupted refresh stopped.")
def meta_collect(out, data_dir, models, methods, ratios, precisions, finetune_steps, seed, image_size, address, workers,
                 refresh_features):
    """Compress every (model, method, ratio, precision) and record the measured accuracy."""
    from rich.console import Console

    from edgecompress.compress.methods import FinetuneSpec, list_methods
    from edgecompress.core.units import parse_fraction
    from edgecompress.meta.collect import PRECISIONS, collect, zoo_models_for

    if refresh_features:
        from edgecompress.meta.collect import refresh_features as refresh

        if not out.is_file():
            raise UsageError(f"--refresh-features: {out} does not exist")
        click.echo(json.dumps({"refreshed_rows": refresh(out, console=Console(stderr=True))}))
        return

    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in precision_list if p not in PRECISIONS]
    if bad or not precision_list:
        raise UsageError(f"--precisions: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(PRECISIONS)}")
    ratio_list = None
    if ratios:
        ratio_list = [parse_fraction(r.strip()) for r in ratios.split(",")]
        if any(r >= 1 for r in ratio_list):
            raise UsageError("--ratios must be below 1")
    result = collect(out=out, models=list(models) or zoo_models_for(data_dir), methods=list(methods) or list_methods(),
                     ratios=ratio_list, precisions=precision_list,
                     finetune=FinetuneSpec(steps=finetune_steps, seed=seed), data_dir=data_dir, image_size=image_size,
                     address=address, console=Console(stderr=True), workers=workers)
    click.echo(json.dumps(result))


# predictor.TARGETS and its DEFAULT_TARGET, named here so that the command line starts without importing the predictor
# (test_predictor checks).
META_TARGETS = ("absolute", "headroom", "residual")


@meta.command("train")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None, help="Meta-dataset (default: the zoo's).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the trained predictor.")
@click.option("--regressor", type=click.Choice(["auto", "lightgbm", "ridge"]), default="auto", show_default=True,
              help="auto: the one `meta eval` finds recommending best for held-out architectures.")
@click.option("--target", type=click.Choice(META_TARGETS), default=None,
              help="What the regressors learn: the accuracy drop, the drop as a share of the parent's accuracy above "
                   "chance, or the drop less the one the fine-tuning probe implies (default: residual).")
def meta_train(data_path, out, regressor, target):
    """Train the meta-predictor (expected and upper-bound accuracy drop)."""
    from edgecompress.meta.predictor import DEFAULT_TARGET, Predictor, best_regressor, evaluate, shipped_meta_dataset

    target = target or DEFAULT_TARGET
    path = data_path or shipped_meta_dataset()
    rows, stale = _current_meta_rows(path)
    why = ""
    if regressor == "auto":
        result = evaluate(rows, target)
        regressor = best_regressor(result)
        why = f" (held-out regret {result[regressor]['regret_vs_oracle_pp']:.2f} pp)"
    Predictor.fit(rows, regressor, target=target).save(out)
    older = f" ({stale} older rows left out: other method settings, recipe or int8 preset)" if stale else ""
    click.echo(f"trained {regressor}{why} on {len(rows)} rows from {path}{older}; saved to {out}")


def _current_meta_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of ``path`` that measure today's compression (meta.collect.current_rows), and how many do not."""
    from edgecompress.meta.collect import current_rows, read_rows

    if not path.is_file():
        raise UsageError(f"meta-dataset {path} does not exist; run `edgecompress meta collect` first")
    rows = read_rows(path)
    current = current_rows(rows)
    if not current:
        raise UsageError(f"{path}: none of its {len(rows)} rows measures today's methods, recipe and int8 preset; "
                         "collect again (`edgecompress meta collect`)")
    return current, len(rows) - len(current)


@meta.command("eval")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None, help="Meta-dataset (default: the zoo's).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--target", type=click.Choice(META_TARGETS), default=None,
              help="What the regressors learn (see meta train; default: residual).")
def meta_eval(data_path, as_json, target):
    """Held-out accuracy and recommendation quality per task (leave one architecture out; leave one task out),
    LightGBM against ridge and a nearest-known-architecture baseline."""
    from edgecompress.meta.predictor import DEFAULT_TARGET, evaluate, shipped_meta_dataset

    path = data_path or shipped_meta_dataset()
    rows, _ = _current_meta_rows(path)
    result = evaluate(rows, target or DEFAULT_TARGET)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))


# Import-time chatter of third-party modules (torch's CUDA probe on a CPU machine, deprecation notes)
# is not the user's business; --debug shows it.
QUIET_LOGGERS = ("torch.utils.cpp_extension", "torch.utils._pytree", "nncf", "diffusers")


def main(argv=None) -> int:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        cli.main(args=argv, prog_name="edgecompress", standalone_mode=False, obj={"argv": argv})
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("edgecompress: interrupted; finished work is kept (build: rerun with --resume DIR; meta collect: rerun the same command)", err=True)
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"edgecompress: {exc.format_message()}", err=True)
        return 2
    except EdgecompressError as exc:
        if debug:
            raise
        click.echo(f"edgecompress: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("edgecompress: interrupted; finished work is kept (build: rerun with --resume DIR; meta collect: rerun the same command)", err=True)
        return 130
    except Exception as exc:  # an internal error: a bug, not bad input
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"edgecompress: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
