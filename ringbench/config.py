"""Run configuration: one validated dataclass shared by the CLI and by experiment files.

Validation returns every problem as a (key, message) pair; the caller names the place: the CLI
prints ``--seq-len: ...``, an experiment file prints ``experiments/x.yaml: matrix.seq_len[2]: ...``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, fields

from ringbench.documents import doc_lengths
from ringbench.layout import LAYOUTS, divisor, layout_problem

MODES = ("overlap", "blocking", "allgather", "ulysses", "hybrid", "pass-q")
STRATEGY_MODES = ("ulysses", "hybrid", "pass-q")  # ringbench.engine.strategies
BACKENDS = ("numpy", "cupy")
DTYPES = ("float32", "float64", "float16", "bfloat16")
PROGRESS = ("none", "test")
BLAS = ("auto", "numpy", "mkl")
CUDA_AWARE = ("auto", "yes", "no")
KERNELS = ("native", "torch", "flash-attn")  # per-step attention: ringbench's NumPy/CuPy kernel, or a fused one
ULYSSES_GROUPS = ("node", "any")  # hybrid's groups: each on one node (refused where the placement cannot), or any
PASSES = ("fwd", "bwd", "fwd+bwd", "prefill", "decode")  # what `ringbench run` times: the forward, the backward, both
SERVING_PASSES = ("prefill", "decode")  # inference passes (ringbench.engine.serving): one forward-like timed phase
PREFILL_MODES = ("overlap", "blocking", "allgather", "pass-q")  # pass-KV (overlap, blocking), all-gather, pass-Q
MERGES = ("ring", "tree", "gather")  # --pass decode: how the ranks' partial (O, LSE) are merged


class UserError(Exception):
    """Bad input found at run time (all ranks agree on it): one line on stderr, exit status 2."""


class ConfigError(Exception):
    """A user error in a configuration value. ``key`` names the option or key path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass
class RunConfig:
    """Everything that defines one ring-attention run (a sweep point, with the rank count)."""

    batch: int = 1
    seq_len: int = 6144  # global N, over all ranks (2^11 x 3: a multiple of 2P for P = 1, 2, 3, 4, 6, 8, ...)
    heads: int = 8
    kv_heads: int | None = None  # None: same as heads (MHA); 1: MQA
    head_dim: int = 64
    dtype: str = "float32"
    causal: bool = False
    layout: str = "contiguous"
    mode: str = "overlap"
    backend: str = "numpy"
    progress: str = "test"  # 'test': MPI_Testall between compute tiles; 'none': no MPI call while computing
    cuda_aware: str = "auto"
    tile_q: int = 0  # query rows per score tile; 0 = automatic for the backend
    ulysses_degree: int = 1  # --mode hybrid: ranks per all-to-all group U (P = U x R)
    ulysses_groups: str = "node"  # --mode hybrid: 'node' (every group's ranks share a node, else refused), 'any'
    blas: str = "auto"  # score-tile GEMMs: 'numpy' (xp.matmul), 'mkl' (Intel MKL), 'auto'
    kernel: str = "native"  # attention per ring step: 'native' (ringbench.kernels.kernel), 'torch', 'flash-attn'
    warmup: int = 1
    repeat: int = 5
    seed: int = 0
    check: bool = False
    save_tensors: bool = False
    memory_limit: int | str = "auto"  # bytes a rank may use: 'auto' (what the node/GPU has free), 'none' (no check)
    pass_: str = "fwd"  # the key `pass` everywhere outside this class (KEYS): fwd, bwd, fwd+bwd, prefill, decode
    cached_tokens: int = 0  # --pass prefill: C of the seq_len tokens are cached; the other T = N - C are new
    new_tokens: int = 1  # --pass decode: t new tokens per sequence per step (t > 1: speculative decoding)
    merge: str = "tree"  # --pass decode: how the partial outputs are merged: ring, tree, gather
    docs: str = ""  # packed documents: the spec as written (ringbench.documents); "" = one document
    window: int = 0  # sliding window W (query t sees keys t - W < u <= t); 0 = none

    # fields that do not change what is measured: left out of the point id
    NON_IDENTITY = ("check", "save_tensors", "warmup", "repeat", "memory_limit", "ulysses_groups")
    # fields added after the first ids were stored: in the point id only when not at their default, so the ids
    # of points stored before they existed (and the 8-hex legacy ids recomputed for old files) do not change
    ADDED_IDENTITY = {
        "kernel": "native",
        "ulysses_degree": 1,
        "pass": "fwd",
        "cached_tokens": 0,
        "new_tokens": 1,
        "merge": "tree",
        "docs": "",
        "window": 0,
    }
    # field -> its key in the CLI (--pass), experiment files, stored configs: `pass` is a Python keyword
    KEYS = {"pass_": "pass"}

    @property
    def phases(self) -> tuple[str, ...]:
        """The timed phases of the run, in order: ('fwd',), ('bwd',) or ('fwd', 'bwd'); a serving pass (prefill,
        decode) is one forward-like phase, stored where the forward is ('fwd',): the config's pass says which."""
        return ("fwd",) if self.pass_ in SERVING_PASSES else tuple(self.pass_.split("+"))

    @property
    def doc_lengths(self) -> tuple[int, ...]:
        """The documents' lengths (ringbench.documents.doc_lengths of ``docs`` over ``seq_len``): what the layout's
        plans take; (N,) for one document. Raises ValueError on a spec validate refuses."""
        return doc_lengths(self.docs, self.seq_len)

    @property
    def kv_heads_resolved(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    def to_dict(self) -> dict:
        """Every field under its key (``pass``, not ``pass_``), kv_heads resolved."""
        d = {field_key(f.name): getattr(self, f.name) for f in fields(self)}  # every field is a scalar: no deep copy
        d["kv_heads"] = self.kv_heads_resolved
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        """The keys of the fields, as the CLI, experiment files and stored configs spell them."""
        return [field_key(f.name) for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> RunConfig:
        """Build from a mapping (YAML or HDF5 attrs); unknown keys raise ConfigError with a hint."""
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise ConfigError(f"{where}{key}", f"unknown key{did_you_mean(key, names)}")
        cfg = cls()
        attr = {v: k for k, v in cls.KEYS.items()}
        for key, value in data.items():
            setattr(cfg, attr.get(key, key), coerce(key, value, where))
        return cfg


def field_key(name: str) -> str:
    """The key of a RunConfig field (its name, except ``pass_`` -> ``pass``); keys are returned as they are."""
    return RunConfig.KEYS.get(name, name)


# (least, largest) value of each integer field. The upper bounds refuse nonsense before any work (a
# seq_len of 2^63 used to "run" and print 1e34 TFLOP/s); whether a problem within them fits is the memory
# estimate's job. seed: inputs hash (3 * seed + tensor) in 32 bits, so a larger seed would repeat another's.
_INT_FIELDS = {
    "batch": (1, 2**16),
    "seq_len": (1, 2**32),
    "heads": (1, 2**12),
    "kv_heads": (1, 2**12),
    "head_dim": (1, 2**16),
    "warmup": (0, 10**4),
    "repeat": (1, 10**5),
    "seed": (0, 2**30 - 1),
    "tile_q": (0, 2**24),
    "ulysses_degree": (1, 2**12),
    "cached_tokens": (0, 2**32),
    "new_tokens": (1, 2**20),
    "window": (0, 2**32),
}
MEMORY_LIMIT_WORDS = ("auto", "none")
MEMORY_LIMIT_MAX = 2**60
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?", re.IGNORECASE)
CHOICES = {
    "dtype": DTYPES,
    "layout": LAYOUTS,
    "mode": MODES,
    "backend": BACKENDS,
    "progress": PROGRESS,
    "cuda_aware": CUDA_AWARE,
    "blas": BLAS,
    "kernel": KERNELS,
    "pass": PASSES,
    "ulysses_groups": ULYSSES_GROUPS,
    "merge": MERGES,
}
_BOOL_FIELDS = ("causal", "check", "save_tensors")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(key: str, value, where: str = ""):
    """Check the type and range of one field's value; return it normalised."""
    path = f"{where}{key}"
    if key in _INT_FIELDS:
        if key == "kv_heads" and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        lo, hi = _INT_FIELDS[key]
        if value < lo:
            raise ConfigError(path, f"expected an integer >= {lo}, got {value}")
        if value > hi:
            raise ConfigError(path, f"expected an integer <= {hi}{_power_of_two(hi)}, got {value}")
        return value
    if key == "memory_limit":
        return memory_limit(value, path)
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise ConfigError(path, f"expected one of {', '.join(CHOICES[key])}; got {value!r}{did_you_mean(value, CHOICES[key])}")
        return value
    if key == "docs":
        if isinstance(value, int) and not isinstance(value, bool):  # YAML reads `docs: 4096` as an integer
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a document spec such as 4096,1024,3072 or lognormal:mean=2048,sigma=1, got {value!r}")
        return value.strip()
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    raise ConfigError(path, f"unknown key{did_you_mean(key, RunConfig.field_names())}")


def _power_of_two(n: int) -> str:
    for k in (n, n + 1):
        if k > 1024 and k & (k - 1) == 0:
            return f" (2^{k.bit_length() - 1}{' - 1' if k != n else ''})"
    return ""


def memory_limit(value, path: str = "memory_limit") -> int | str:
    """'auto', 'none', or a byte count from an integer or a size such as '20GiB', '512MiB', '1.5GB', '4096'."""
    if isinstance(value, str) and value.strip().lower() in MEMORY_LIMIT_WORDS:
        return value.strip().lower()
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
        n = int(size) if size <= MEMORY_LIMIT_MAX else MEMORY_LIMIT_MAX + 1
    if n is None or not 1 <= n <= MEMORY_LIMIT_MAX:
        raise ConfigError(path, f"expected auto, none, or a size from 1 byte to 2^60 such as 20GiB, 512MiB or 4000000000; got {value!r}")
    return n


def validate(cfg: RunConfig, nranks: int) -> list[tuple[str, str]]:
    """Cross-field problems of ``cfg`` at ``nranks`` ranks, as (key, message) pairs."""
    errors = []
    for f in fields(cfg):
        try:
            coerce(field_key(f.name), getattr(cfg, f.name))
        except ConfigError as e:
            errors.append((field_key(f.name), e.message))
    if errors:
        return errors
    hk = cfg.kv_heads_resolved
    if cfg.heads % hk:
        errors.append(("kv_heads", f"must divide heads={cfg.heads}; got {hk}"))
    div = divisor(cfg.layout, nranks)
    if cfg.seq_len % div:
        need = "2 x ranks" if cfg.layout == "zigzag" else "the rank count"
        errors.append(("seq_len", f"{cfg.seq_len} is not divisible by {div} ({need}, layout {cfg.layout} at {nranks} ranks)"))
    errors += strategy_problems(cfg, nranks) or serving_problems(cfg, nranks) or document_problems(cfg, nranks)
    if cfg.save_tensors:
        nbytes = save_tensors_bytes(cfg)
        if nbytes > SAVE_TENSORS_LIMIT:
            what = "q, k, v and output" + (", do, dq, dk and dv" if "bwd" in cfg.phases else "")
            errors.append(("save_tensors", f"{what} would take {nbytes / 2**20:.0f} MiB; allowed up to {SAVE_TENSORS_LIMIT // 2**20} MiB"))
    return errors


SAVE_TENSORS_LIMIT = 256 * 2**20


def save_tensors_bytes(cfg: RunConfig) -> int:
    """Bytes of the global tensors --save-tensors stores (at 8 bytes an element, the widest dtype): q, k, v, out,
    and with a backward also do, dq (H heads) and dk, dv (H_kv heads)."""
    hk = cfg.kv_heads_resolved
    heads = 2 * cfg.heads + 2 * hk
    if "bwd" in cfg.phases:
        heads *= 2
    return 8 * cfg.batch * cfg.seq_len * heads * cfg.head_dim


def serving_problems(cfg: RunConfig, nranks: int) -> list[tuple[str, str]]:
    """What the serving passes (docs/run.md: prefill against a cache, decode with a sharded cache) refuse: their keys
    away from their defaults under another pass, a cache that leaves no new token, the strategies that do not apply."""
    p, n = cfg.pass_, cfg.seq_len
    if p != "prefill" and cfg.cached_tokens != 0:
        return [("cached_tokens", f"only for --pass prefill; got {cfg.cached_tokens} with --pass {p}")]
    if p != "decode" and cfg.new_tokens != 1:
        return [("new_tokens", f"only for --pass decode; got {cfg.new_tokens} with --pass {p}")]
    if p != "decode" and cfg.merge != "tree":
        return [("merge", f"only for --pass decode; got {cfg.merge} with --pass {p}")]
    if p not in SERVING_PASSES:
        return []
    if not cfg.causal:
        return [("causal", f"--pass {p} attends causally by global position; add --causal")]
    if cfg.save_tensors:
        return [("save_tensors", f"not for --pass {p} (its queries and keys have different lengths); use --check")]
    if p == "prefill":
        if cfg.mode not in PREFILL_MODES:
            return [("mode", f"--pass prefill runs {', '.join(PREFILL_MODES)}; got {cfg.mode}")]
        if cfg.cached_tokens >= n:
            return [("cached_tokens", f"must be below seq_len={n} (at least one new token); got {cfg.cached_tokens}")]
        div = divisor(cfg.layout, nranks)
        if cfg.cached_tokens % div:
            return [("cached_tokens", f"{cfg.cached_tokens} is not divisible by {div} (layout {cfg.layout} at {nranks} ranks)")]
        return []
    if cfg.mode != "overlap":
        return [("mode", f"--pass decode merges by --merge ({', '.join(MERGES)}); --mode does not apply, got {cfg.mode}")]
    if cfg.new_tokens > n:
        return [("new_tokens", f"must be at most seq_len={n} (the new tokens are the cache's last); got {cfg.new_tokens}")]
    return []


def document_problems(cfg: RunConfig, nranks: int) -> list[tuple[str, str]]:
    """What packed documents and sliding windows (docs/run.md) refuse: a spec that does not hold over seq_len, the
    serving passes, a window without --causal, a layout that cannot take them (ringbench.layout.layout_problem)."""
    if not cfg.docs and not cfg.window:
        return []
    key = "docs" if cfg.docs else "window"
    if cfg.pass_ in SERVING_PASSES:
        return [(key, f"not for --pass {cfg.pass_} (the training passes fwd, bwd, fwd+bwd take documents and windows)")]
    if cfg.window and not cfg.causal:
        return [("window", f"a sliding window is causal (each query sees the {cfg.window} keys up to itself): add --causal")]
    try:
        docs = cfg.doc_lengths
    except ValueError as exc:
        return [("docs", f"{exc} (got {cfg.docs!r})")]
    why = layout_problem(cfg.layout, nranks, cfg.seq_len, docs if len(docs) > 1 else (), cfg.window, cfg.causal)
    return [("layout" if key == "window" or len(docs) == 1 else "docs", why)] if why else []


def heads_rule(heads: int, kv_heads: int, u: int) -> str | None:
    """Why H query heads and H_kv kv heads cannot be split over an all-to-all group of U ranks (None if they can)."""
    if heads % u:
        return f"the all-to-all group size {u} must divide heads={heads}"
    if kv_heads % u and u % kv_heads:
        return f"the all-to-all group size {u} must divide kv_heads={kv_heads} or be a multiple of it (kv heads replicated)"
    return None


def strategy_problems(cfg: RunConfig, nranks: int) -> list[tuple[str, str]]:
    """What the context-parallel strategies refuse (README: the strategies): the all-to-all needs its group size U
    (P for ulysses) to divide the query heads, and to divide the kv heads or be a multiple of them."""
    hk = cfg.kv_heads_resolved
    if cfg.mode == "pass-q" and cfg.kernel != "native" and cfg.pass_ not in ("fwd", "prefill"):
        return [("kernel", f"--mode pass-q runs --kernel {cfg.kernel} in its forward only (--pass fwd or prefill); got --pass {cfg.pass_}")]
    if cfg.mode != "hybrid":
        if cfg.ulysses_degree != 1:
            return [("ulysses_degree", f"only for --mode hybrid; got {cfg.ulysses_degree} with --mode {cfg.mode}")]
        if cfg.mode == "ulysses":
            why = heads_rule(cfg.heads, hk, nranks)
            return [("mode", f"ulysses at {nranks} ranks: {why}")] if why else []
        return []
    u = cfg.ulysses_degree
    if nranks % u:
        return [("ulysses_degree", f"must divide the rank count {nranks}; got {u}")]
    why = heads_rule(cfg.heads, hk, u)
    return [("ulysses_degree", f"hybrid with U={u}: {why}")] if why else []


ID_HEX = 16  # hex digits of SHA-1 in a point id: 64 bits, so distinct configurations never share one in practice
LEGACY_ID_HEX = 8  # what ids had before (32 bits: they collide); files with them are still read


def point_id(cfg: RunConfig, nranks: int) -> str:
    """Stable id of a sweep point: readable prefix + hash of every parameter that affects the measurement.

    A field added to RunConfig later enters the hash only when it differs from its default (listed in
    RunConfig.ADDED_IDENTITY), so the ids of points stored before it existed do not change.
    """
    return _point_id(cfg, nranks, ID_HEX)


def legacy_point_id(cfg: RunConfig, nranks: int) -> str:
    """The id an older ringbench gave this point (8 hex digits): where its part file of an earlier sweep is."""
    return _point_id(cfg, nranks, LEGACY_ID_HEX)


def stored_point_id(config: dict, nranks: int, stored: str) -> str:
    """The id of the point a stored run measured, recomputed from its stored configuration and rank count.

    Stored runs are matched to points by this, never by the id string they carry, so a run stored under an
    older (8 hex digit) id still counts for its point. ``stored`` (that string) is returned only when the
    configuration cannot be read back (missing, or a key this version does not know).
    """
    if not config:
        return stored
    try:
        return point_id(RunConfig.from_dict(config), int(nranks))
    except (ConfigError, TypeError, ValueError):
        return stored


def _point_id(cfg: RunConfig, nranks: int, digits: int) -> str:
    added = RunConfig.ADDED_IDENTITY
    ident = {k: v for k, v in cfg.to_dict().items() if k not in RunConfig.NON_IDENTITY and added.get(k, ...) != v}
    ident["nranks"] = nranks
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:digits]
    causal = "-causal" if cfg.causal else ""
    mode = f"hybrid{cfg.ulysses_degree}" if cfg.mode == "hybrid" else cfg.merge if cfg.pass_ == "decode" else cfg.mode
    phase = "" if cfg.pass_ == "fwd" else "-" + cfg.pass_.replace("+", "")  # -bwd, -fwdbwd, -prefill, -decode
    return f"{mode}{phase}-{cfg.layout}{causal}-{cfg.dtype}-N{cfg.seq_len}-P{nranks}-{digest}"


def option_name(key: str) -> str:
    """CLI spelling of a config key (or field name: ``pass_`` is ``--pass``)."""
    return "--" + field_key(key).replace("_", "-")


def to_argv(cfg: RunConfig) -> list[str]:
    """The ``ringbench run`` options that reproduce ``cfg`` (used by sweeps and job scripts)."""
    argv = []
    defaults = RunConfig()
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        opt = option_name(f.name)
        if isinstance(value, bool):
            argv.append(opt if value else "--no-" + opt[2:])
        else:
            argv += [opt, str(value)]
    return argv
