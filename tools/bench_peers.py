"""edgecompress's int8 against the one-line int8 flows it competes with, on this machine, side by side.

    python tools/bench_peers.py --json                 # 3 zoo models x {ort-cpu, openvino-cpu}; resumable
    python tools/bench_peers.py --models lcnet_050 --targets ort-cpu --repeats 1 --json
    python tools/bench_peers.py --markdown             # the tables for docs/bench_peers.md, from the cache only
    python tools/bench_peers.py --data fashion-mnist --models starnet_s100 ghostnet_050 --builds --json  # its zoo

For each (zoo model, CPU target), every variant below is made from the same exported fp32 ONNX and the same
calibration split of the data (``--data``: the digits, or Fashion-MNIST with its own zoo), its top-1 measured on
the test split (360 digits, 5,000 Fashion-MNIST images) one image at a time in the target's runtime, and all
variants timed together (batch 1) in one fresh runner process with interleaved rounds, so a slow spell of the
machine lands on all of them; that is repeated ``--repeats`` times in fresh processes. Run it with the machine quiet
(../shared/tools/quiet PID -- python tools/bench_peers.py ...).

  fp32                the target's fp32 artifact
  edgecompress        the runtime's own quantize(): its QuantPreset (runtimes/*.py), what `build` ships
  edgecompress_nncf   the same with runtimes.base.NNCF_DEFAULT: the tool's int8 before per-runtime presets
  nncf                plain nncf.quantize with its defaults (NNCF's recommended flow)
  ort_qdq             onnxruntime.quantization.quantize_static after quant_pre_process, defaults (QDQ, s8/s8,
                      per-tensor): ONNX Runtime's documented flow
  ort_qoperator       the same with QuantFormat.QOperator
  ort_qdq_u8s8        the same, QDQ with u8 activations and per-channel s8 weights (ONNX Runtime's x86 advice)
  olive               Olive's OnnxStaticQuantization pass (`olive run`), where Olive runs here (--olive)
  build_1x, build_1.5x  (--builds) what `edgecompress build --target T --latency B --latency-stat median` ships on the
                      same data, any model of its zoo, at B = the best peer's median latency (within the tolerance of the best
                      top-1; from a pilot timing of the variants above) divided by 1 and by 1.5: the tool's own
                      choice, timed beside the peers in the same processes

On openvino-cpu, the ONNX Runtime variants' QDQ graphs are converted to IR by the runtime's own export (OpenVINO
reads Q/DQ as FakeQuantize); a graph it cannot convert is recorded with the reason.

Summary per case: the best accuracy among all variants, and among the variants within ``--tolerance-pp`` of it,
the fastest; edgecompress's speed-up over the fastest peer inside the tolerance (peers: nncf, ort_*, olive).
Cache: one JSON line per finished case (--cache, default docs/bench_peers.jsonl); artifacts under --work.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecompress.core.fsutil import append_jsonl, read_jsonl

MODELS = ("resnet10t", "lcnet_050", "mobilenetv3_small_100")  # compute-bound ReLU; HardSwish depthwise; HardSwish + SE
TARGETS = ("ort-cpu", "openvino-cpu")
VARIANTS = ("fp32", "edgecompress", "edgecompress_nncf", "nncf", "ort_qdq", "ort_qoperator", "ort_qdq_u8s8", "olive")
BUILD_SPEEDUPS = (1.0, 1.5)  # the builds' budgets: the best peer's median latency divided by these (issue 18's goal)
PEERS = ("nncf", "ort_qdq", "ort_qoperator", "ort_qdq_u8s8", "olive")
WARMUP, RUNS, ROUNDS = 20, 300, 15
OLIVE = Path("/tmp/olive-venv/bin/olive")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet():
    from edgecompress.runtimes.base import nncf_quiet

    with nncf_quiet(), contextlib.redirect_stderr(io.StringIO()):
        yield


# --- the peers' ONNX graphs ---------------------------------------------------------------------------------------

def _reader(images):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(images[i:i + 1] for i in range(len(images)))

        def get_next(self):
            x = next(self._items, None)
            return None if x is None else {"input": x}

    return Reader()


def ort_static(src: Path, dst: Path, calib, *, qoperator: bool = False, u8s8_per_channel: bool = False) -> Path:
    """ONNX Runtime's documented static flow: quant_pre_process, then quantize_static (its defaults, or U8S8)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    extra = {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "per_channel": True} if u8s8_per_channel else {}
    quantize_static(str(pre), str(dst), _reader(calib), quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                    **extra)
    pre.unlink()
    return dst


def nncf_onnx(src: Path, dst: Path, calib) -> Path:
    """Plain ``nncf.quantize`` with its defaults on the ONNX graph."""
    import nncf
    import onnx

    from edgecompress.runtimes.base import calibration_dataset

    onnx.save(nncf.quantize(onnx.load(str(src)), calibration_dataset(calib, lambda x: {"input": x})), str(dst))
    return dst


OLIVE_CONFIG = {
    "input_model": {"type": "ONNXModel", "model_path": None},
    "systems": {"local": {"type": "LocalSystem", "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
    "data_configs": [{"name": "calib", "type": "DataContainer",
                      "user_script": None, "load_dataset_config": {"type": "digits_calib"},
                      "dataloader_config": {"batch_size": 1}}],
    "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
    "host": "local", "target": "local", "output_dir": None, "log_severity_level": 3,
}

OLIVE_SCRIPT = '''
import numpy as np
from olive.data.registry import Registry


class _Calib:
    def __init__(self, path):
        self.x = np.load(path)["images"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input": self.x[i:i + 1][0]}, 0


@Registry.register_dataset("digits_calib")
def digits_calib(data_name=None, **kwargs):
    return _Calib(__file__.replace("user_script.py", "calib.npz"))
'''


def olive_static(src: Path, dst: Path, calib, olive: Path) -> Path:
    """Olive's OnnxStaticQuantization pass through ``olive run`` (its own venv: it pins other versions)."""
    import numpy as np

    if not olive.exists():
        raise RuntimeError(f"olive not installed at {olive} (pip install olive-ai in a separate venv; --olive PATH)")
    work = dst.parent / "olive"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    np.savez(work / "calib.npz", images=calib)
    (work / "user_script.py").write_text(OLIVE_SCRIPT)
    config = json.loads(json.dumps(OLIVE_CONFIG))
    config["input_model"]["model_path"] = str(src)
    config["data_configs"][0]["user_script"] = str(work / "user_script.py")
    config["output_dir"] = str(work / "out")
    (work / "config.json").write_text(json.dumps(config, indent=1))
    proc = subprocess.run([str(olive), "run", "--config", str(work / "config.json")], capture_output=True, text=True,
                          cwd=work, timeout=1800, check=False)
    (work / "olive.log").write_text(proc.stdout + proc.stderr)
    found = sorted((work / "out").rglob("*.onnx"))
    if proc.returncode != 0 or not found:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error:" in line or "Exception:" in line]
        raise RuntimeError(f"olive run exited {proc.returncode} with no model: {(lines or ['no error line'])[-1][:300]}")
    shutil.copyfile(found[0], dst)
    return dst


# --- one case ------------------------------------------------------------------------------------------------------

def model_dir(work: Path, task: str, model: str) -> Path:
    """One model's work directory: its fp32 export and the peers' graphs (shared by both targets), and under
    TARGET/ the variants' artifacts and the tool's builds."""
    return work / task / model


def build_variants(model: str, target_name: str, work: Path, data, olive: Path, task: str) -> tuple[dict, dict]:
    """{variant: artifact path} and {variant: reason} for those that could not be made; artifacts are reused."""
    from edgecompress.models import get_model, load_model
    from edgecompress.runtimes.base import (
        NNCF_DEFAULT,
        export_onnx,
        quantize_onnx,
        quantize_with_control,
    )
    from edgecompress.targets import get_target

    runtime = get_target(target_name).runtime()
    calib = data.split("calib")[0]
    shared = model_dir(work, task, model)
    shared.mkdir(parents=True, exist_ok=True)
    src = shared / "fp32.onnx"
    if not src.exists():
        export_onnx(load_model(get_model(model, task), data.num_classes), data.input_shape, src)
    # Peers' ONNX graphs, shared by both targets.
    onnx_makers = {
        "nncf": lambda p: nncf_onnx(src, p, calib),
        "ort_qdq": lambda p: ort_static(src, p, calib),
        "ort_qoperator": lambda p: ort_static(src, p, calib, qoperator=True),
        "ort_qdq_u8s8": lambda p: ort_static(src, p, calib, u8s8_per_channel=True),
        "olive": lambda p: olive_static(src, p, calib, olive),
    }
    onnx_graphs, failed = {}, {}
    for name, make in onnx_makers.items():
        path = shared / f"{name}.onnx"
        error = shared / f"{name}.error"
        if not path.exists() and not error.exists():
            _log(f"{model}: {name}")
            try:
                with _quiet():
                    make(path)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is a result, recorded with its reason
                error.write_text(f"{type(exc).__name__}: {exc}")
        if error.exists():
            failed[name] = error.read_text()
        else:
            onnx_graphs[name] = path

    case = shared / target_name
    artifacts = {}

    def made(name: str, make) -> None:
        out = case / name
        done = out / ".done"
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            _log(f"{model} {target_name}: {name}")
            try:
                with _quiet():
                    artifact = make(out)
            except Exception as exc:  # noqa: BLE001
                (out / ".error").write_text(f"{type(exc).__name__}: {exc}")
                failed[name] = (out / ".error").read_text()
                return
            done.write_text(artifact.name)
        artifacts[name] = out / done.read_text()

    made("fp32", lambda out: runtime.export(src, "fp32", out))

    def tool(out: Path) -> Path:
        (out / "e").mkdir()
        return runtime.quantize(runtime.export(src, "fp32", out / "e"), calib, out)

    made("edgecompress", tool)

    def tool_nncf(out: Path) -> Path:
        fp32 = runtime.export(src, "fp32", out)
        if fp32.suffix == ".onnx":
            return quantize_onnx(src, calib, out / "int8.onnx", preset=NNCF_DEFAULT)
        import openvino as ov

        quantized = quantize_with_control(ov.Core().read_model(str(fp32)), calib, None, to_input=lambda x: x,
                                          top1=None, conv_weights=runtime.conv_weights, preset=NNCF_DEFAULT)
        ov.save_model(quantized, str(out / "int8.xml"), compress_to_fp16=False)
        return out / "int8.xml"

    made("edgecompress_nncf", tool_nncf)
    if runtime.artifact_name.endswith(".xml"):
        def nncf_ir(out: Path) -> Path:  # NNCF's own flow on OpenVINO: the IR, not the ONNX
            import nncf
            import openvino as ov

            from edgecompress.runtimes.base import calibration_dataset

            fp32 = runtime.export(src, "fp32", out)
            quantized = nncf.quantize(ov.Core().read_model(str(fp32)), calibration_dataset(calib))
            ov.save_model(quantized, str(out / "int8.xml"), compress_to_fp16=False)
            return out / "int8.xml"

        onnx_graphs.pop("nncf", None)
        failed.pop("nncf", None)
        made("nncf", nncf_ir)
    for name, path in onnx_graphs.items():
        made(name, lambda out, path=path: runtime.export(path, "fp32", out))
    return artifacts, failed


def top1(runtime, artifact: Path, data) -> float:
    import numpy as np

    x, y = data.split("test")
    session = runtime.session(artifact)
    return float(np.mean([int(session(x[i:i + 1]).argmax(1)[0] == y[i]) for i in range(len(y))]))


def tool_builds(model: str, target_name: str, work: Path, peer_ms: float, task: str) -> tuple[dict, dict, dict]:
    """``edgecompress build`` at the best peer's median latency / each of BUILD_SPEEDUPS, in a fresh process each:
    ({variant: artifact}, {variant: why it shipped nothing}, {variant: budget, exit code, choice, wall})."""
    artifacts, failed, info = {}, {}, {}
    for speedup in BUILD_SPEEDUPS:
        name = f"build_{speedup:g}x"
        budget = peer_ms / speedup
        run = model_dir(work, task, model) / target_name / name
        cmd = [sys.executable, "-m", "edgecompress", "build", "--data", task, "--target", target_name,
               "--latency", f"{budget:.4f}ms", "--latency-stat", "median", "--out", str(run), "--force"]
        _log(f"{model} {target_name}: {' '.join(cmd[3:])}")
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)  # exit 2 is a result
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        info[name] = {"budget_ms": round(budget, 4), "exit_code": proc.returncode, "wall_s": round(time.time() - started, 1),
                      "last_line": lines[-1] if lines else ""}
        report = run / "report.json"
        if proc.returncode == 0 and report.is_file():
            r = json.loads(report.read_text())
            artifacts[name] = run / r["artifact"]
            info[name]["choice"] = r.get("choice_id")
            info[name]["threads"] = (r.get("measured") or {}).get("threads")  # what its bundle runs on
        else:
            failed[name] = info[name]["last_line"]
    return artifacts, failed, info


def run_case(model: str, target_name: str, work: Path, data, olive: Path, repeats: int, tolerance_pp: float,
             builds: bool = False, task: str = "digits") -> dict:
    from edgecompress.runtimes.base import read_quant_record
    from edgecompress.targets import get_target

    runtime = get_target(target_name).runtime()
    artifacts, failed = build_variants(model, target_name, work, data, olive, task)
    names = [v for v in VARIANTS if v in artifacts]
    def entry(artifact: Path) -> dict:
        return {"top1": top1(runtime, artifact, data), "median_ms": [], "p90_ms": [],
                "size_mb": sum(f.stat().st_size for f in runtime.artifact_files(artifact)) / 1e6}

    variants = {v: entry(artifacts[v]) for v in names}
    record = read_quant_record(artifacts["edgecompress"]) if "edgecompress" in artifacts else None
    build_info = {}
    if builds:
        # A pilot timing of the variants sets the builds' budgets (the best peer as summarize_case picks it); the
        # builds' artifacts are then timed with them.
        pilot = runtime.benchmark_interleaved([artifacts[v] for v in names], warmup=WARMUP, runs=RUNS, rounds=ROUNDS)
        pilot_case = {"model": model, "target": target_name,
                      "variants": {v: {**variants[v], "pilot_ms": res["latency_ms_median"]}
                                   for v, res in zip(names, pilot, strict=True)}}
        peer = summarize_case(pilot_case, tolerance_pp, stat="pilot_ms")["best_peer_inside"]
        if peer is not None:
            peer_ms = pilot_case["variants"][peer]["pilot_ms"]
            made, why, build_info = tool_builds(model, target_name, work, peer_ms, task)
            build_info = {"pilot_best_peer": peer, "pilot_best_peer_ms": round(peer_ms, 4), **build_info}
            failed.update(why)
            for name, artifact in made.items():
                artifacts[name] = artifact
                names.append(name)
                variants[name] = entry(artifact)
    # Every variant at the runtime's own thread count and on one thread, in alternating fresh processes: the peers
    # ship the runtime's own choice; a build ships the count its pre-measurement found fastest (its runtime.json).
    for v in names:
        variants[v].update(median_ms_1t=[], p90_ms_1t=[])
    for r in range(repeats):
        for threads, suffix in ((None, ""), (1, "_1t")):
            _log(f"{model} {target_name}: timing {len(names)} artifacts, interleaved, "
                 f"{'on 1 thread' if threads else 'the runtime choosing its threads'} (repeat {r + 1}/{repeats})")
            results = runtime.benchmark_interleaved([artifacts[v] for v in names], warmup=WARMUP, runs=RUNS,
                                                    rounds=ROUNDS, threads=threads)
            for v, result in zip(names, results, strict=True):
                variants[v][f"median_ms{suffix}"].append(round(result["latency_ms_median"], 4))
                variants[v][f"p90_ms{suffix}"].append(round(result["latency_ms_p90"], 4))
    for v in names:
        for suffix in ("", "_1t"):
            variants[v][f"median_ms{suffix}_all"] = statistics.median(variants[v][f"median_ms{suffix}"])
            variants[v][f"p90_ms{suffix}_all"] = statistics.median(variants[v][f"p90_ms{suffix}"])
        one_thread = build_info.get(v, {}).get("threads") == 1
        variants[v]["threads_shipped"] = 1 if one_thread else None
        variants[v]["shipped_ms"] = variants[v]["median_ms_1t_all" if one_thread else "median_ms_all"]
        variants[v]["best_threads_ms"] = min(variants[v]["median_ms_all"], variants[v]["median_ms_1t_all"])
    return {"data": task, "model": model, "target": target_name, "variants": variants, "failed": failed,
            "edgecompress_preset": record, "builds": build_info, "repeats": repeats, "runs": RUNS, "rounds": ROUNDS,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def summarize_case(case: dict, tolerance_pp: float, stat: str | None = None) -> dict:
    """Within ``tolerance_pp`` of the best accuracy of any variant: the fastest variant, the fastest peer, and
    edgecompress's speed-up over that peer (None where edgecompress is outside the tolerance), by ``stat``: by default
    each variant as it ships (shipped_ms; cases timed before thread counts were compared: median_ms_all)."""
    stat = stat or ("shipped_ms" if all("shipped_ms" in x for x in case["variants"].values()) else "median_ms_all")
    v = case["variants"]
    # The best top-1 of the one-line variants: the builds are judged against it, not part of it.
    best = max(x["top1"] for k, x in v.items() if not k.startswith("build_"))
    inside = {k: x for k, x in v.items() if x["top1"] >= best - tolerance_pp / 100 - 1e-9}
    fastest = min(inside, key=lambda k: inside[k][stat])
    peers = [k for k in inside if k in PEERS]
    best_peer = min(peers, key=lambda k: inside[k][stat]) if peers else None
    tool = v.get("edgecompress")
    speedup = (inside[best_peer][stat] / tool[stat]) if tool and best_peer and "edgecompress" in inside else None
    out = {"model": case["model"], "target": case["target"], "best_top1": best, "fastest_inside": fastest,
           "best_peer_inside": best_peer, "edgecompress_inside": "edgecompress" in inside,
           "edgecompress_speedup_over_best_peer": speedup,
           "edgecompress_int8_vs_fp32": (v["fp32"][stat] / tool[stat]) if tool and "fp32" in v else None}
    # The goal of issue 18: the tool's shipped artifact, at most tolerance_pp below the best peer, 1.5x its speed.
    peer = v[best_peer] if best_peer else None
    for name in (k for k in v if k.startswith("build_")):
        out[name] = {"choice": case.get("builds", {}).get(name, {}).get("choice"), "top1": v[name]["top1"],
                     "pp_vs_best_peer": round((v[name]["top1"] - peer["top1"]) * 100, 2) if peer else None,
                     "speedup_over_best_peer": round(peer[stat] / v[name][stat], 2) if peer else None}
        if peer and "best_threads_ms" in peer:  # against the peer on its own best thread count too
            out[name]["speedup_over_best_peer_on_its_best_threads"] = round(
                min(x["best_threads_ms"] for k, x in inside.items() if k in PEERS) / v[name][stat], 2)
    return out


def markdown(cases: list[dict], tolerance_pp: float) -> str:
    lines = []
    for case in cases:
        s = summarize_case(case, tolerance_pp)
        lines += [(f"**{case['model']} on {case['target']}**{_on(case)} ({case['date']}, load {case['load_average']}, "
                   f"{case['repeats']} fresh processes x {case['rounds']} interleaved rounds)"), "",
                  "| variant | top-1 | median ms | p90 ms | median ms, 1 thread | ships on | vs fp32 (as shipped) | size MB |",
                  "|---|---|---|---|---|---|---|---|"]
        fp32 = case["variants"].get("fp32", {}).get("median_ms_all")
        for name, x in case["variants"].items():
            mark = " **" if name == s["fastest_inside"] else ""
            shipped = x.get("shipped_ms", x["median_ms_all"])
            ratio = f"{fp32 / shipped:.2f}x" if fp32 else ""
            one = f"{x['median_ms_1t_all']:.3f}" if "median_ms_1t_all" in x else ""
            ships = ("1 thread" if x.get("threads_shipped") == 1 else "runtime's choice") if "shipped_ms" in x else ""
            lines.append(f"| {name}{mark} | {x['top1'] * 100:.2f}% | {x['median_ms_all']:.3f} | {x['p90_ms_all']:.3f} | "
                         f"{one} | {ships} | {ratio} | {x['size_mb']:.2f} |")
        for name, why in case["failed"].items():
            lines.append(f"| {name} | failed: {why.splitlines()[0][:160]} | | | | |")
        speed = s["edgecompress_speedup_over_best_peer"]
        lines += ["", f"Within {tolerance_pp} pp of the best top-1 ({s['best_top1'] * 100:.2f}%): fastest "
                  f"{s['fastest_inside']}; best peer {s['best_peer_inside']}; edgecompress "
                  + (f"{speed:.2f}x the best peer's speed." if speed else "outside the tolerance."), ""]
    return "\n".join(lines)


def _on(case: dict) -> str:
    return "" if case.get("data", "digits") == "digits" else f", {case['data']}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", choices=("digits", "fashion-mnist"),
                        help="the named data source; the models are its zoo's")
    parser.add_argument("--models", nargs="+", default=None, help=f"zoo models (digits default: {' '.join(MODELS)})")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--repeats", type=int, default=3, help="fresh timing processes per case")
    parser.add_argument("--tolerance-pp", type=float, default=0.5, help="equal accuracy: within this of the best")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_peers"), help="artifacts (reused on resume)")
    parser.add_argument("--cache", type=Path, default=ROOT / "docs" / "bench_peers.jsonl")
    parser.add_argument("--olive", type=Path, default=OLIVE, help="the olive executable (its own venv)")
    parser.add_argument("--force", action="store_true", help="rerun cached cases")
    parser.add_argument("--builds", action="store_true", help="add the tool's own builds at the best peer's latency "
                        "/ 1 and / 1.5 (variants build_1x, build_1.5x)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print tables from the cache only (runs nothing)")
    args = parser.parse_args(argv)

    if args.models is None:
        if args.data != "digits":
            parser.error("--models is required with --data other than the digits")
        args.models = list(MODELS)
    key = lambda r: (r.get("data", "digits"), r["model"], r["target"])  # rows from before --data: the digits
    done = read_jsonl(args.cache, key=key)
    wanted = [(args.data, m, t) for m in args.models for t in args.targets]
    if not args.markdown:
        from edgecompress.data.datasets import load_dataset

        data = load_dataset(args.data)
        for w in wanted:
            if w in done and not args.force:
                continue
            _, model, target = w
            started = time.time()
            case = run_case(model, target, args.work, data, args.olive, args.repeats, args.tolerance_pp, args.builds,
                            task=args.data)
            case["wall_s"] = round(time.time() - started, 1)
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(args.cache, case)
            done[w] = case
    cases = [done[w] for w in wanted if w in done]
    if args.markdown:
        print(markdown(cases, args.tolerance_pp))
    elif args.json:
        print(json.dumps({"cases": cases, "summary": [summarize_case(c, args.tolerance_pp) for c in cases]}, indent=1))
    else:
        for c in cases:
            print(json.dumps(summarize_case(c, args.tolerance_pp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
