"""Configuration: one frozen dataclass per concern, validated once, recorded once.

- :class:`MaskConfig`: which key blocks a query block keeps (the estimator and its knobs).
- :class:`TraceConfig`: how a model is traced (a ``MaskConfig`` plus chunking and storage).

Each field carries its help text in ``metadata["help"]``; the command line builds its flags from these
fields (``sparsetrace.commands.options``), so a new field appears in the library, the CLI and the trace
manifest (``asdict(config)``) at once. Field metadata may also name the flag (``"flag"``; fields sharing a
flag take one value), the allowed values (``"choices"``) and, for a float, its kind (``"kind":
"fraction"``: a number in (0, 1), range-checked here so that a bad value is one sentence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .errors import UsageError

ESTIMATORS = ("stream", "shortlist", "oracle")
SCORES = ("max", "lse")
MASS_ENCODINGS = ("float16", "log8")


def _option(default, help: str, **cli):
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class MaskConfig:
    """The selection of one attention layer's key blocks (shared/DESIGN.md section 1)."""

    estimator: str = _option("shortlist", "stream (the paper's hierarchical search, O(T log T)), shortlist "
                             "(every candidate pre-scored from pooled keys, the best rescored exactly) or "
                             "oracle (the exact block top-k, O(T^2): small inputs and references)",
                             choices=ESTIMATORS)
    block_q: int = _option(32, "query and key block size in tokens", flag="--block-size")
    block_k: int = _option(32, "query and key block size in tokens", flag="--block-size")
    top_k: int = _option(16, "key blocks kept per query block, forced ones included")
    sink_blocks: int = _option(1, "forced sink blocks at the start", minimum=0)
    local_blocks: int = _option(1, "forced local blocks ending at the diagonal", minimum=0)
    score: str = _option("max", "block score: max (peak q.k, the paper's) or lse (log-sum-exp, "
                         "estimates mass)", choices=SCORES)
    query_stride: int = _option(1, "score blocks with every s-th query of a block (plus its last); "
                                "1 = all")
    coverage: float | None = _option(None, "coverage budget P, 0 < P < 1: each row keeps key blocks in "
                                     "estimated-mass order until the estimated kept attention mass reaches "
                                     "P (forced blocks always kept), between --min-k and --max-k blocks; "
                                     "rows are -1-padded at max-k width (docs/coverage.md); off: every row "
                                     "keeps --top-k", kind="fraction")
    min_k: int = _option(1, "with --coverage: key blocks kept per row at least, forced ones included")
    max_k: int | None = _option(None, "with --coverage: key blocks kept per row at most, forced ones "
                                "included, the width of the trace's rows (default: --top-k)")

    def __post_init__(self) -> None:
        _check_fields(self)
        forced = self.sink_blocks + self.local_blocks
        for name in ("top_k", "max_k"):
            value = getattr(self, name)
            if value is not None and value < forced + 1:
                raise UsageError(
                    f"{name}={value} leaves no room to choose: it must exceed sink_blocks + local_blocks "
                    f"= {forced}; raise {name} or lower the forced blocks."
                )
        if self.coverage is None:
            if self.min_k != 1 or self.max_k is not None:
                raise UsageError(f"min_k={self.min_k} and max_k={self.max_k} bound a coverage budget; add "
                                 "coverage (--coverage P) or drop them.")
        elif not 0 < self.coverage < 1:
            raise UsageError(f"coverage={self.coverage!r} must lie strictly between 0 and 1 (e.g. 0.95: "
                             "rows keep 95% of the estimated attention mass).")
        elif self.min_k > self.width:
            raise UsageError(f"min_k={self.min_k} exceeds max_k={self.width}, the most blocks a row keeps; "
                             "give min_k <= max_k.")

    @property
    def width(self) -> int:
        """Key blocks a row holds at most: ``top_k``, or ``max_k`` (default ``top_k``) under a coverage
        budget. The selection runs at this width; a budget then cuts rows shorter (-1-padded)."""
        return self.top_k if self.coverage is None or self.max_k is None else self.max_k

    def search(self) -> MaskConfig:
        """The fixed-k selection a coverage budget cuts from: this config at ``top_k = width`` without the
        budget (itself when there is none). Estimators, the audit's oracle row and the estimate read it."""
        if self.coverage is None:
            return self
        return replace(self, top_k=self.width, coverage=None, min_k=1, max_k=None)

    def budget(self) -> dict | None:
        """The coverage budget as the trace manifest records it (None without one)."""
        if self.coverage is None:
            return None
        return {"coverage": self.coverage, "min_k": self.min_k, "max_k": self.width}


@dataclass(frozen=True)
class TraceConfig:
    """How a model is traced; ``asdict`` of it is the manifest's ``meta["trace_config"]``."""

    mask: MaskConfig = field(default_factory=MaskConfig)
    chunk_size: int = _option(1024, "tokens per prefill chunk, a multiple of the block size")
    mass_encoding: str = _option("float16", "how block masses are stored (log8: 1 byte, <= 3.4% "
                                 "relative error)", choices=MASS_ENCODINGS)
    audit_rate: int = _option(32, "query blocks per layer audited exactly (missed mass and recall by a "
                              "dense pass over those queries only); a count, not a fraction, so the "
                              "audit costs the same share of the trace at every length; 0 = off", minimum=0)
    missed_samples: int = _option(64, "keys sampled per row to estimate the missed attention mass of "
                                  "every row, with an interval (a multiple of 8); 0 = off", minimum=0)

    def __post_init__(self) -> None:
        if not isinstance(self.mask, MaskConfig):
            raise UsageError(f"mask={self.mask!r} must be a MaskConfig.")
        _check_fields(self)
        if self.missed_samples % 8:
            raise UsageError(f"missed_samples={self.missed_samples} must be a multiple of 8 (0 = off).")
        if self.mask.coverage is not None and not self.missed_samples:
            raise UsageError("a coverage budget needs the missed-mass estimate of every row (it says how much "
                             "attention the kept blocks hold); give missed_samples > 0 (--missed-samples).")
        if self.chunk_size % self.mask.block_q:
            raise UsageError(
                f"chunk_size={self.chunk_size} must be a multiple of the block size "
                f"{self.mask.block_q} so that query blocks never straddle two chunks."
            )

    @classmethod
    def of(cls, **options) -> TraceConfig:
        """A config from flat option names, e.g. ``TraceConfig.of(top_k=8, chunk_size=512)``: fields of
        :class:`MaskConfig` go to ``mask``. ``block_size`` (older manifests, one size for both) sets
        ``block_q`` and ``block_k``."""
        if "block_size" in options:
            size = options.pop("block_size")
            options.setdefault("block_q", size)
            options.setdefault("block_k", size)
        mask_names = {f.name for f in fields(MaskConfig)}
        unknown = set(options) - mask_names - {f.name for f in fields(cls)}
        if unknown:
            raise UsageError(f"unknown trace options {sorted(unknown)}; the options are "
                             f"{sorted(mask_names | {f.name for f in fields(cls)} - {'mask'})}.")
        mask = MaskConfig(**{k: v for k, v in options.items() if k in mask_names})
        return cls(mask=mask, **{k: v for k, v in options.items() if k not in mask_names})

    @classmethod
    def from_dict(cls, data: dict) -> TraceConfig:
        """Inverse of ``asdict``; also reads the flat ``trace_config`` of older trace manifests."""
        data = dict(data)
        # a manifest without an estimator predates the field, when every trace was STREAM's (the default
        # became SHORTLIST later): read it as what it was
        if isinstance(data.get("mask"), dict):
            return cls(mask=MaskConfig(**{"estimator": "stream", **data.pop("mask")}), **data)
        return cls.of(**{"estimator": "stream", **data})

    def replace(self, **options) -> TraceConfig:
        """A copy with flat options changed, e.g. ``config.replace(top_k=8)`` (see :meth:`of`)."""
        return TraceConfig.of(**{**self.flat(), **options})

    def flat(self) -> dict:
        """Every option by its flat name: the mask's fields and the trace's own."""
        own = asdict(self)
        return {**own.pop("mask"), **own}


def _check_fields(config) -> None:
    """Types, signs and choices of every field, from the field metadata (one rule for all of them)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None and f.default is None:  # optional and not given
            continue
        if f.metadata.get("kind") == "fraction":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UsageError(f"{f.name}={value!r} must be a number between 0 and 1.")
        elif "choices" in f.metadata:
            if value not in f.metadata["choices"]:
                raise UsageError(f"{f.name}={value!r} is not one of {f.metadata['choices']}.")
        elif f.type in ("int", "int | None"):
            minimum = f.metadata.get("minimum", 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                kind = "a positive integer" if minimum == 1 else "a non-negative integer"
                raise UsageError(f"{f.name}={value!r} must be {kind}.")
