"""Parse trtexec's console output into the same ``measured`` fields as local targets.

Formats seen in real logs (fixtures in tests/fixtures/trtexec, each with its source):

- TensorRT 8 and 10: a ``=== Performance summary ===`` block with lines such as
  ``Latency: min = 0.80 ms, max = 1.41 ms, mean = 0.83 ms, median = 0.82 ms,
  percentile(90%) = 0.85 ms, percentile(95%) = 0.88 ms, percentile(99%) = 1.06 ms``
  (8.0 to 8.2 print only ``percentile(99%)``; some builds print ``percentile = X ms at 99%``);
- TensorRT 7: blocks headed ``Host Latency`` and ``GPU Compute`` with one
  statistic per line (``min: 0.79 ms (end to end 1.4 ms)``, ``percentile: 1.0 ms at 99%``),
  and ``throughput: 1234 qps``.

"Latency" is the host latency (enqueue to output on the host), what an
application sees; "GPU Compute Time" is the kernels alone.
"""

from __future__ import annotations

import re

from edgecompress.core.errors import TrtexecParseError

_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)*")  # [date] [I] prefixes
_SUMMARY = re.compile(r"^(Throughput|Latency|GPU Compute Time|Host Latency|Enqueue Time|H2D Latency|D2H Latency|GPU Compute)\s*:\s*(.*)$")
_PAIR = re.compile(r"(min|max|mean|median|percentile\((?P<p>[\d.]+)%\))\s*=\s*(?P<v>[\d.eE+-]+)\s*ms")
_PCT_AT = re.compile(r"percentile\s*[:=]\s*(?P<v>[\d.eE+-]+)\s*ms at (?P<p>[\d.]+)%")
_LINE_STAT = re.compile(r"^(min|max|mean|median)\s*:\s*(?P<v>[\d.eE+-]+)\s*ms")
_QPS = re.compile(r"^(?:Throughput|throughput)\s*:\s*(?P<v>[\d.eE+-]+)\s*qps")
_VERSION_TEXT = re.compile(r"TensorRT version\s*:\s*(?P<v>\d+(?:\.\d+)+)")
_VERSION_CODE = re.compile(r"\[TensorRT v(?P<v>\d{4,6})\]")
_ENGINE_SIZE = re.compile(r"(?:Created engine with size|Engine size)\s*:\s*(?P<v>[\d.]+)\s*(?P<u>MiB|MB|KiB|B)\b")
_UNITS = {"MiB": 1.048576, "MB": 1.0, "KiB": 1.024e-3, "B": 1e-6}


def _version(text: str) -> str | None:
    m = _VERSION_TEXT.search(text)
    if m:
        return m["v"]
    m = _VERSION_CODE.search(text)
    if not m:
        return None
    code = m["v"]  # 8601 -> 8.6.1, 100300 -> 10.3.0
    major, rest = (code[:2], code[2:]) if len(code) == 6 else (code[:1], code[1:])
    return f"{int(major)}.{int(rest[:-2])}.{int(rest[-2:])}"


def _stats(body: str) -> dict[str, float]:
    out = {}
    for m in _PAIR.finditer(body):
        key = m.group(1)
        out[f"p{float(m['p']):g}" if m["p"] else key] = float(m["v"])
    m = _PCT_AT.search(body)
    if m:
        out[f"p{float(m['p']):g}"] = float(m["v"])
    return out


def parse_trtexec(text: str) -> dict:
    """Figures from one trtexec run; raises TrtexecParseError when no latency summary is found."""
    blocks: dict[str, dict[str, float]] = {}
    throughput = None
    current = None  # TensorRT 7: the block whose per-line statistics follow
    for raw in text.splitlines():
        line = _PREFIX.sub("", raw.strip()).strip()
        q = _QPS.match(line)
        if q:
            throughput = float(q["v"])
            continue
        m = _SUMMARY.match(line)
        if m:
            name = {"Host Latency": "Latency", "GPU Compute": "GPU Compute Time"}.get(m.group(1), m.group(1))
            stats = _stats(m.group(2))
            if stats:
                blocks.setdefault(name, {}).update(stats)
                current = None
            else:
                current = name
            continue
        if line in ("Host Latency", "GPU Compute", "GPU Compute Time"):
            current = {"Host Latency": "Latency"}.get(line, "GPU Compute Time")
            continue
        if current:
            s = _LINE_STAT.match(line)
            p = _PCT_AT.search(line)
            if s:
                blocks.setdefault(current, {})[s.group(1)] = float(s["v"])
            elif p:
                blocks.setdefault(current, {})[f"p{float(p['p']):g}"] = float(p["v"])
            elif line and not line.startswith(("end to end", "enqueue")):
                current = None
    latency = blocks.get("Latency")
    if not latency or "median" not in latency and "mean" not in latency:
        raise TrtexecParseError("no latency summary in the trtexec output (did the engine build fail?)")
    gpu = blocks.get("GPU Compute Time", {})
    size = _ENGINE_SIZE.search(text)
    return {
        "tensorrt_version": _version(text),
        "throughput_qps": throughput,
        "latency_ms_min": latency.get("min"),
        "latency_ms_mean": latency.get("mean"),
        "latency_ms_median": latency.get("median", latency.get("mean")),
        "latency_ms_p90": latency.get("p90"),
        "latency_ms_p99": latency.get("p99"),
        "gpu_compute_ms_median": gpu.get("median"),
        "gpu_compute_ms_mean": gpu.get("mean"),
        "engine_size_mb": float(size["v"]) * _UNITS[size["u"]] if size else None,
    }
