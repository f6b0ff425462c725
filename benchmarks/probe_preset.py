"""A machine preset from a probe: `ringbench probe` measured the kernel and the link, a shipped preset gives the rest.

    python benchmarks/probe_preset.py PROBE.h5 --base h100-sxm5-8x --out my-cluster.yaml [--name NAME]

The kernel tables (TFLOP/s per block tokens, full and causal, forward and backward) and the intra-node link come from
the probes in PROBE.h5 (their largest rank count); inter-node link, collectives, memory, price, overhead and the
overlap slowdown from --base. The file written loads with `ringbench advise --machine my-cluster.yaml`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ringbench import store  # noqa: E402
from ringbench.analysis import advise, model, presets  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", metavar="PROBE.h5")
    ap.add_argument("--base", default="h100-sxm5-8x", help=f"the preset the rest is copied from: {', '.join(presets.names())}")
    ap.add_argument("--out", required=True, metavar="FILE.yaml")
    ap.add_argument("--name", default="probed")
    ns = ap.parse_args(argv)
    probes = store.read_probes(ns.probe)
    if not probes:
        print(f"probe_preset.py: {ns.probe}: no probes in it", file=sys.stderr)
        return 2
    cal = model.calibrate_from_probes(probes)
    cfg = probes[-1].config
    heads, head_dim, batch = int(cfg.get("heads", 8)), int(cfg.get("head_dim", 64)), int(cfg.get("batch", 1))
    base = advise.load_machine(presets.path_of(ns.base))
    text = presets.preset_from_calibration(cal, base, ns.name, batch, heads, head_dim)
    Path(ns.out).write_text(text)
    advise.load_machine(ns.out)  # it must load back
    print(f"wrote {ns.out} (kernel and intra link from {ns.probe}, the rest from {ns.base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
