"""Machine presets shipped with ringbench (``ringbench/analysis/machines/*.yaml``) and the optional keys a machine file
may carry beyond ``name``, ``ranks_per_node``, ``intra`` and ``inter`` (docs/model.md "Machine presets"): the
collectives' bus bandwidths and the GPU (its kernel's rates, per-call overhead, memory bandwidth and size, the slowdown
under a concurrent transfer, a price per GPU-hour). Pure: no MPI. Errors: ExperimentError naming file:line: key.
"""

from __future__ import annotations

import math
from pathlib import Path

from ringbench.analysis import model
from ringbench.config import did_you_mean
from ringbench.yamlfile import ExperimentError, Source

PRESET_DIR = Path(__file__).with_name("machines")
COLLECTIVE_KEYS = ("all_gather_busbw_gbps", "all_to_all_busbw_gbps")
DEVICE_KEYS = ("gpu", "memory_gib", "price_per_gpu_hour", "hbm_gbps", "call_overhead_us", "overlap_slowdown", "kernel", "merge")
KERNEL_KEYS = ("name", "head_dim", "dtype", "tokens", "fwd_tflops", "fwd_causal_tflops", "bwd_tflops", "bwd_causal_tflops")
TABLES = {
    ("fwd", False): "fwd_tflops",
    ("fwd", True): "fwd_causal_tflops",
    ("bwd", False): "bwd_tflops",
    ("bwd", True): "bwd_causal_tflops",
}
MERGE_KEYS = ("fwd_bytes_per_out_element", "bwd_bytes_per_dq_element", "bwd_bytes_per_dkv_element")
# (low, high, unit) of every number, closed ranges; nan, inf and bools are refused
RANGES = {
    "all_gather_busbw_gbps": (1e-6, 1e5, "GB/s"),
    "all_to_all_busbw_gbps": (1e-6, 1e5, "GB/s"),
    "memory_gib": (1e-3, 1e6, "GiB"),
    "price_per_gpu_hour": (0.0, 1e6, "currency units per GPU-hour"),
    "hbm_gbps": (1e-3, 1e6, "GB/s"),
    "call_overhead_us": (0.0, 1e6, "microseconds"),
    "overlap_slowdown": (0.0, 10.0, "(a fraction: 0.06 is 6% slower)"),
    "head_dim": (1, 4096, ""),
    "tflops": (1e-6, 1e6, "TFLOP/s"),
    "tokens": (1, 2**40, "tokens"),
    "merge": (0.0, 1e4, "bytes per element"),
}


def names() -> list[str]:
    """The shipped presets' names (file stems), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def path_of(name_or_path: str) -> Path:
    """A preset's file for its name; anything else is taken as a path."""
    p = PRESET_DIR / f"{name_or_path}.yaml"
    return p if "/" not in name_or_path and p.is_file() else Path(name_or_path)


def _number(src: Source, path: tuple, value, kind: str, integer: bool = False) -> float:
    lo, hi, unit = RANGES[kind]
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or not lo <= value <= hi:  # nan fails both
        what = "an integer" if integer else "a finite number"
        raise src.error(path, f"expected {what}{' of ' + unit if unit else ''} from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _mapping(src: Source, path: tuple, value, allowed: tuple) -> dict:
    if not isinstance(value, dict):
        raise src.error(path, f"expected a mapping with keys {', '.join(allowed)}")
    for k in value:
        if k not in allowed:
            raise src.error(path + (k,), f"unknown key{did_you_mean(str(k), allowed)}; allowed: {', '.join(allowed)}")
    return value


def parse_collectives(src: Source, value) -> dict:
    """{"intra" | "inter": {"all_gather" | "all_to_all": bytes/s}} from ``collectives:``."""
    out = {}
    for link, entry in _mapping(src, ("collectives",), value, ("intra", "inter")).items():
        entry = _mapping(src, ("collectives", link), entry, COLLECTIVE_KEYS)
        out[link] = {k.split("_busbw")[0]: _number(src, ("collectives", link, k), v, k) * 1e9 for k, v in entry.items()}
    return out


def parse_device(src: Source, value) -> tuple[model.Device, str]:
    """(the :class:`model.Device`, its GPU's name) from ``device:``; ``kernel`` is required, the rest optional."""
    d = _mapping(src, ("device",), value, DEVICE_KEYS)
    if "kernel" not in d:
        raise src.error(("device",), "missing key kernel")
    k = _mapping(src, ("device", "kernel"), d["kernel"], KERNEL_KEYS)
    for key in ("tokens", *TABLES.values()):
        if key not in k:
            raise src.error(("device", "kernel"), f"missing key {key}")
    tokens = k["tokens"]
    if not isinstance(tokens, list) or not tokens:
        raise src.error(("device", "kernel", "tokens"), "expected a non-empty list of token counts, ascending")
    toks = [_number(src, ("device", "kernel", "tokens", i), t, "tokens", integer=True) for i, t in enumerate(tokens)]
    if any(b <= a for a, b in zip(toks, toks[1:])):
        raise src.error(("device", "kernel", "tokens"), "expected token counts in ascending order, each once")
    tables = {}
    for (phase, causal), key in TABLES.items():
        vals = k[key]
        if not isinstance(vals, list) or len(vals) != len(toks):
            raise src.error(("device", "kernel", key), f"expected a list of {len(toks)} TFLOP/s values, one per tokens entry")
        rates = [_number(src, ("device", "kernel", key, i), v, "tflops") * 1e12 for i, v in enumerate(vals)]
        tables[(phase, causal)] = tuple(zip(toks, rates))
    if "head_dim" in k:
        _number(src, ("device", "kernel", "head_dim"), k["head_dim"], "head_dim", integer=True)
    merge = _mapping(src, ("device", "merge"), d.get("merge", {}), MERGE_KEYS)
    mb = {key: _number(src, ("device", "merge", key), v, "merge") for key, v in merge.items()}
    scalars = ("memory_gib", "price_per_gpu_hour", "hbm_gbps", "call_overhead_us", "overlap_slowdown")
    num = {key: _number(src, ("device", key), d[key], key) for key in scalars if key in d}
    dev = model.Device(
        tables=tables,
        kernel=str(k.get("name", "kernel")),
        call_overhead_s=num.get("call_overhead_us", 0.0) * 1e-6,
        overlap_slowdown=num.get("overlap_slowdown", 0.0),
        hbm_Bps=num["hbm_gbps"] * 1e9 if "hbm_gbps" in num else math.inf,
        merge_fwd_bytes=mb.get("fwd_bytes_per_out_element", 0.0),
        merge_bwd_q_bytes=mb.get("bwd_bytes_per_dq_element", 0.0),
        merge_bwd_kv_bytes=mb.get("bwd_bytes_per_dkv_element", 0.0),
        memory_bytes=num["memory_gib"] * 2**30 if "memory_gib" in num else math.inf,
        price_per_hour=num.get("price_per_gpu_hour", 0.0),
        gpu=str(d.get("gpu", "")),
    )
    return dev, dev.gpu


def calibration(machine: model.Machine) -> model.DeviceCalibration:
    """The model's calibration from a preset's GPU (ExperimentError-free: ``machine.device`` must be set)."""
    d = machine.device
    return model.DeviceCalibration(d, machine, source=f"machine preset {machine.source}: {d.kernel} on {d.gpu or 'its GPU'}")


def preset_from_calibration(cal: model.Calibration, base: model.Machine, name: str, batch: int, heads: int, head_dim: int) -> str:
    """The YAML text of a preset whose kernel tables and intra-node link come from a probe's calibration (``ringbench
    probe``: its rates keyed by a block's FLOPs become TFLOP/s per block tokens, n = sqrt(FLOPs / (4 B H D))), the
    rest copied from ``base`` (a preset). Loads back with :func:`ringbench.analysis.advise.load_machine`."""
    p = max(cal.rates)  # the largest rank count probed

    def tokens_rates(table: dict, mult: float) -> list:
        pts = table.get(p) or table[max(table)]
        return [(max(1, round(math.sqrt(f / (mult * 4 * batch * heads * head_dim)))), r) for f, r in sorted(pts)]

    fwd = tokens_rates(cal.rates, 1.0)
    toks = sorted({t for t, _ in fwd})

    def on(table: dict, mult: float) -> list:
        if not table:
            return [None] * len(toks)
        pts = tokens_rates(table, mult)
        xs, ys = [math.log(t) for t, _ in pts], [r for _, r in pts]
        import numpy as np

        return [float(np.interp(math.log(t), xs, ys)) / 1e12 for t in toks]

    tables = {
        "fwd_tflops": on(cal.rates, 1.0),
        "fwd_causal_tflops": on(cal.diag_rates or cal.rates, 1.0),
        "bwd_tflops": on(cal.bwd_rates, model.BWD_FLOPS),
        "bwd_causal_tflops": on(cal.bwd_diag_rates or cal.bwd_rates, model.BWD_FLOPS),
    }
    for key in ("bwd_tflops", "bwd_causal_tflops"):  # a probe without a backward: the forward's, said so
        if tables[key][0] is None:
            tables[key] = tables[key.replace("bwd", "fwd")]
    lat, bw = cal.link(p) if cal.links else base.intra
    d = base.device
    fmt = ", ".join
    lines = [
        f"# written from {cal.source} (ringbench probe at P={p}); everything else copied from the preset {base.source}",
        f"name: {name}",
        f"ranks_per_node: {base.ranks_per_node}",
        f"intra: {{latency_us: {lat * 1e6:.6g}, bandwidth_gbps: {bw / 1e9:.6g}}}   # the probe's ping-pong",
        f"inter: {{latency_us: {base.inter[0] * 1e6:.6g}, bandwidth_gbps: {base.inter[1] / 1e9:.6g}}}   # from {base.source}",
    ]
    if base.collectives:
        lines.append("collectives:   # from " + base.source)
        for link, c in base.collectives.items():
            lines.append(f"  {link}: {{" + fmt(f"{k}_busbw_gbps: {v / 1e9:.6g}" for k, v in c.items()) + "}")
    lines += ["device:", f"  gpu: {d.gpu if d else 'probed'}"]
    if d is not None:
        if math.isfinite(d.memory_bytes):
            lines.append(f"  memory_gib: {d.memory_bytes / 2**30:.6g}")
        lines.append(f"  price_per_gpu_hour: {d.price_per_hour:.6g}")
    hbm = cal.copy_bw.get(p) if cal.copy_bw else (d.hbm_Bps if d and math.isfinite(d.hbm_Bps) else None)
    if hbm:
        lines.append(f"  hbm_gbps: {hbm / 1e9:.6g}   # the probe's strided-copy rate (or the base preset's)")
    if d is not None:
        lines += [f"  call_overhead_us: {d.call_overhead_s * 1e6:.6g}", f"  overlap_slowdown: {d.overlap_slowdown:.6g}"]
    lines += ["  kernel:", "    name: probed", f"    head_dim: {head_dim}", f"    tokens: [{fmt(str(t) for t in toks)}]"]
    lines += [f"    {k}: [{fmt(f'{v:.6g}' for v in vals)}]" for k, vals in tables.items()]
    if d is not None:
        lines += [
            "  merge:",
            f"    fwd_bytes_per_out_element: {d.merge_fwd_bytes:g}",
            f"    bwd_bytes_per_dq_element: {d.merge_bwd_q_bytes:g}",
            f"    bwd_bytes_per_dkv_element: {d.merge_bwd_kv_bytes:g}",
        ]
    return "\n".join(lines) + "\n"


__all__ = [
    "PRESET_DIR",
    "names",
    "path_of",
    "parse_collectives",
    "parse_device",
    "calibration",
    "preset_from_calibration",
    "ExperimentError",
]
