"""The target registry: one TOML file per device in ``targets/``.

``list_targets("jetson*")`` and ``get_target("jetson-orin")`` read the files
without importing any runtime; :meth:`Target.runtime` imports the runtime's
class only when a stage needs it. Third-party packages add target directories
through the ``edgecompress.targets`` entry-point group (each entry point is a
callable returning a directory of TOML files).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from edgecompress.core.errors import TargetFileError, UnknownNameError

PRECISIONS = ("fp32", "fp16", "int8")
RUNTIMES = {
    # runtime name -> "module:Class", imported on first use
    "onnxruntime": "edgecompress.runtimes.onnxruntime:OnnxRuntime",
    "openvino": "edgecompress.runtimes.openvino:OpenVinoRuntime",
    "tensorrt": "edgecompress.runtimes.tensorrt:TensorRtRuntime",
}
KERNEL_KINDS = ("conv", "depthwise", "pointwise", "linear")


@lru_cache(maxsize=1)
def known_runtimes() -> dict[str, str]:
    """Runtime name -> "module:Class": the built-in ones and those other packages register through the
    ``edgecompress.runtimes`` entry-point group (a class following runtimes.base.Runtime)."""
    return {**RUNTIMES, **{ep.name: ep.value for ep in metadata.entry_points(group="edgecompress.runtimes")}}


def runtime_class(name: str):
    """The class that drives runtime ``name``, imported on first use."""
    import importlib

    runtimes = known_runtimes()
    if name not in runtimes:
        raise UnknownNameError("runtime", name, runtimes)
    module_name, class_name = runtimes[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def builtin_targets_dir() -> Path:
    """``targets/`` in a source checkout, or its installed copy inside the package."""
    installed = Path(__file__).parent / "targets_data"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[1] / "targets"


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Per-layer roofline plus fixed costs; see edgecompress.costmodel.cost."""

    overhead_ms: float
    per_layer_us: float
    efficiency: dict  # kernel kind -> share of peak reached
    int8_efficiency: dict  # kernel kind -> share of int8 peak reached
    kernels: Path | None = None  # fitted kernel-level model (edgecompress.costmodel.latency); None: the roofline alone


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime_name: str
    precisions: tuple[str, ...]
    peak_gops: dict  # precision -> dense peak, GOP/s
    memory_bandwidth_gbs: float
    ram_mb: float | None  # None: the host's RAM (local targets)
    local: bool  # can the artifact be benchmarked on this machine?
    sparse_kernels: tuple[str, ...]
    latency: LatencyModel
    runtime_overhead_mb: float
    aliases: tuple[str, ...]
    sources: tuple[str, ...]
    path: Path

    def runtime(self):
        return runtime_class(self.runtime_name)(self)

    def host_ram_mb(self) -> float:
        if self.ram_mb is not None:
            return self.ram_mb
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6

    def kernel_model(self):
        """The fitted kernel-level latency model, or None where the target has only the roofline."""
        if self.latency.kernels is None:
            return None
        from edgecompress.costmodel.latency import KernelLatencyModel

        return _load_kernel_model(self.latency.kernels, KernelLatencyModel)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["runtime"] = d.pop("runtime_name")
        d["path"] = str(self.path)
        if self.latency.kernels is not None:
            d["latency"]["kernels"] = str(self.latency.kernels)
        return d


@lru_cache(maxsize=None)
def _load_kernel_model(directory: Path, cls):
    return cls.load(directory)


def _need(data: dict, key: str, kind, path: Path, where: str = ""):
    full = f"{where}{key}"
    if key not in data:
        raise TargetFileError(f"target file {path}: missing key '{full}'")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise TargetFileError(f"target file {path}: key '{full}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    if kind is float and value < 0:
        raise TargetFileError(f"target file {path}: key '{full}' must not be negative, got {value!r}")
    return value


def _kernel_table(data: dict, key: str, path: Path, where: str) -> dict:
    table = _need(data, key, dict, path, where)
    out = {}
    for kind in KERNEL_KINDS:
        value = _need(table, kind, float, path, f"{where}{key}.")
        if not 0 < value <= 1:
            raise TargetFileError(f"target file {path}: key '{where}{key}.{kind}' must be in (0, 1], got {value}")
        out[kind] = value
    return out


def load_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetFileError(f"target file {path}: not valid TOML ({exc})") from exc
    name = _need(data, "name", str, path)
    runtime = _need(data, "runtime", str, path)
    if runtime not in known_runtimes():
        raise TargetFileError(f"target file {path}: key 'runtime' is {runtime!r}; known: {', '.join(known_runtimes())}")
    precisions = tuple(_need(data, "precisions", list, path))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise TargetFileError(f"target file {path}: key 'precisions' must list some of {PRECISIONS}, got {list(precisions)}")
    peak = _need(data, "peak_gops", dict, path)
    for p in precisions:
        _need(peak, p, float, path, "peak_gops.")
    ram = data.get("ram_mb", "host")
    if ram != "host":
        ram = _need(data, "ram_mb", float, path)
    lat = _need(data, "latency_model", dict, path)
    latency = LatencyModel(
        overhead_ms=_need(lat, "overhead_ms", float, path, "latency_model."),
        per_layer_us=_need(lat, "per_layer_us", float, path, "latency_model."),
        efficiency=_kernel_table(lat, "efficiency", path, "latency_model."),
        int8_efficiency=_kernel_table(lat, "int8_efficiency", path, "latency_model.") if "int8" in precisions else {},
        kernels=(path.parent / _need(lat, "kernels", str, path, "latency_model.")) if "kernels" in lat else None,
    )
    mem = _need(data, "memory_model", dict, path)
    return Target(
        name=name,
        description=_need(data, "description", str, path),
        runtime_name=runtime,
        precisions=precisions,
        peak_gops={p: float(peak[p]) for p in precisions},
        memory_bandwidth_gbs=_need(data, "memory_bandwidth_gbs", float, path),
        ram_mb=None if ram == "host" else ram,
        local=_need(data, "local", bool, path),
        sparse_kernels=tuple(data.get("sparse_kernels", [])),
        latency=latency,
        runtime_overhead_mb=_need(mem, "runtime_overhead_mb", float, path, "memory_model."),
        aliases=tuple(data.get("aliases", [])),
        sources=tuple(data.get("sources", [])),
        path=path,
    )


def _target_dirs() -> list[Path]:
    dirs = [builtin_targets_dir()]
    for ep in metadata.entry_points(group="edgecompress.targets"):
        dirs.append(Path(ep.load()()))
    return dirs


@lru_cache(maxsize=1)
def _registry() -> tuple[dict[str, Target], dict[str, str]]:
    targets: dict[str, Target] = {}
    aliases: dict[str, str] = {}
    for directory in _target_dirs():
        for path in sorted(directory.glob("*.toml")):
            target = load_target_file(path)
            if target.name in targets:
                raise TargetFileError(f"target file {path}: name {target.name!r} is also defined in {targets[target.name].path}")
            targets[target.name] = target
            for alias in target.aliases:
                aliases[alias] = target.name
    return targets, aliases


def list_targets(pattern: str = "*") -> list[str]:
    targets, _ = _registry()
    return sorted(n for n in targets if fnmatch.fnmatch(n, pattern))


def get_target(name: str) -> Target:
    targets, aliases = _registry()
    name = aliases.get(name, name)
    if name not in targets:
        raise UnknownNameError("target", name, list(targets) + list(aliases))
    return targets[name]
