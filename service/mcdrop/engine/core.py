"""MCEngine: N stochastic passes over B rows in memory-bounded chunks, statistics streamed.

The deterministic prefix runs once per input row; the sampled suffix runs on R rows x S
samples per chunk, with masks keyed by (seed, site, row, sample) so results do not depend
on chunking. Row counts given to every forward are multiples of 8 and each row's block is
aligned, which keeps CPU GEMM kernels on the same code path for every row.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mcdrop.config import DEFAULT_CHUNK_ELEMENTS
from mcdrop.engine.accumulators import Accumulators, OutputHead
from mcdrop.engine.allocator import keep_freed_memory
from mcdrop.engine.audit import (
    AUDIT_ROWS,
    AUDIT_SAMPLES,
    AuditPolicy,
    AuditReport,
    compare,
    training_mode_features,
)
from mcdrop.engine.dispatch_sites import DropoutCalls
from mcdrop.engine.fallback import WholeProgram
from mcdrop.engine.partials import PartialStats, Shard
from mcdrop.engine.partition import PartitionedProgram
from mcdrop.engine.program import prepare_program
from mcdrop.engine.sampling import RowKeys, SamplingContext, Site
from mcdrop.engine.sites import SampleSelection
from mcdrop.engine.streaming import BLOCK, round_up
from mcdrop.engine.tracing import TRACE_LOCK
from mcdrop.uncertainty import (
    ClassificationSummary,
    RegressionSummary,
    Summary,
    rows_of,
    validate_levels,
)

log = logging.getLogger(__name__)

Task = Literal["regression", "classification"]
MaskMode = Literal["independent", "shared"]
AUTO_FIRST_ROUND = 64
# Called after every chunk of a run; whatever it raises abandons the run (see run_many).
Checkpoint = Callable[[], None]


@dataclass(frozen=True)
class MCOptions:
    """How to sample one request."""

    samples: int | Literal["auto"] = 100
    tolerance: float = 0.01  # samples="auto": stop when every standard error is below this
    max_samples: int = 100_000  # samples="auto": never draw more than this
    mask_mode: MaskMode = "independent"
    seed: int | None = None  # None: a fresh random seed, reported in the summary
    interval_levels: tuple[float, ...] = (0.95,)
    return_samples: int = 0  # keep up to this many raw samples per row

    def validated(self) -> MCOptions:
        """Check ranges; raise ValueError naming the option."""
        if self.samples != "auto" and (not isinstance(self.samples, int) or self.samples < 1):
            raise ValueError(f"samples must be a positive integer or 'auto', got {self.samples!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")
        if self.mask_mode not in ("independent", "shared"):
            raise ValueError(f"mask_mode must be 'independent' or 'shared', got {self.mask_mode!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.return_samples < 0:
            raise ValueError(f"return_samples must be >= 0, got {self.return_samples}")
        validate_levels(self.interval_levels)
        return self


@dataclass(frozen=True)
class MCRequest:
    """One request's rows x [B, *input_shape], its options, and optional targets [B, D]."""

    x: Tensor
    options: MCOptions
    targets: Tensor | None = None


def batch_key(options: MCOptions) -> tuple[object, ...]:
    """Requests whose options share this key may run together in one engine pass."""
    return (options.samples, options.mask_mode, options.tolerance, options.max_samples)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MCEngine:
    """Monte Carlo dropout inference for one model; safe to call from several threads."""

    def __init__(
        self,
        module: nn.Module,
        *,
        task: Task,
        input_shape: tuple[int, ...],
        heteroscedastic: bool = False,
        tau: float | None = None,
        sample: SampleSelection = "all",
        ignore: Sequence[str] = (),
        device: str = "cpu",
        dtype: str = "float32",
        compile: bool = False,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        output_scale: Tensor | None = None,
        output_shift: Tensor | None = None,
        audit: AuditPolicy = "refuse",
        audit_samples: int = AUDIT_SAMPLES,
        class_axis: int | None = None,
    ) -> None:
        if task == "classification" and heteroscedastic:
            raise ValueError("a heteroscedastic head applies only to regression")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if dtype != "float32" and self.device.type != "cuda":
            raise ValueError(f"dtype {dtype} is only supported on a CUDA device")
        self.dtype = _DTYPES[dtype]
        self.input_shape = tuple(input_shape)
        self.chunk_elements = chunk_elements
        module = module.to(self.device, self.dtype).eval()
        self.program = prepare_program(module, self.input_shape, sample, self.dtype, ignore)
        self.output_shape = self._output_shape(module)
        shape = self.output_shape
        if class_axis is not None and task == "classification":
            if not -len(shape) <= class_axis < len(shape):
                raise ValueError(f"class_axis {class_axis} is not an axis of the model's "
                                 f"output {list(shape)} per row")  # fmt: skip
            class_axis %= len(shape)
        elif task == "classification" and len(shape) != 1:
            raise ValueError(
                f"classification: the model returns {list(shape)} per row; say which axis "
                "holds the classes (class_axis): one softmax over every value of a map "
                "(segmentation, per-token tagging) would be wrong, so it is refused"
            )
        if heteroscedastic and len(shape) != 1:
            raise ValueError(f"a heteroscedastic head needs flat outputs, not {list(shape)}")
        self.head = OutputHead(
            task,
            heteroscedastic,
            tau,
            None if output_scale is None else output_scale.to(self.device, torch.float64),
            None if output_shift is None else output_shift.to(self.device, torch.float64),
            shape=shape if len(shape) > 1 else (),
            class_axis=class_axis or 0,
        )
        self.audit = self._audit(module, audit, audit_samples, sample)
        if compile:
            self._compile()

    def _output_shape(self, module: nn.Module) -> tuple[int, ...]:
        """Per-row shape of the model's output: one forward of two zero rows, dropout off."""
        x = torch.zeros((2, *self.input_shape), dtype=self.dtype, device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), \
                TRACE_LOCK.running(), DropoutCalls(None):  # fmt: skip
            out = module(x)
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != 2:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the model must return a tensor [rows, ...]; for 2 rows it gave {got}"
            )
        return tuple(out.shape[1:])

    def _audit(
        self, module: nn.Module, policy: AuditPolicy, samples: int, sample: SampleSelection
    ) -> AuditReport:
        """Engine variance against the model's own training-mode passes, on zero probe rows."""
        if policy == "off" or sample != "all":  # mc.sample leaves sites out on purpose
            return AuditReport(None, 0.0, 0, "off")
        x = torch.zeros((AUDIT_ROWS, *self.input_shape), dtype=self.dtype, device=self.device)
        summary = self.run(x, MCOptions(samples=samples, seed=0, interval_levels=()))
        head = self.head
        if isinstance(summary, ClassificationSummary):
            engine_variance = summary.probabilities_std.square().flatten(1)
            axis = 1 + head.class_axis if head.shape else -1

            def features(out: Tensor) -> Tensor:
                return torch.softmax(out, dim=axis).reshape(len(out), -1)
        else:
            engine_variance = summary.epistemic_variance.flatten(1)
            d = engine_variance.shape[1]

            def features(out: Tensor) -> Tensor:
                mean = out.reshape(len(out), -1)[:, :d]
                return mean if head.scale is None else mean * head.scale

        branches = self.program.branches
        weight_masks = any(site.kind == "dropconnect" for site in self.sites)
        reference = training_mode_features(
            module, x, samples, features, branches.deterministic + branches.ignored, weight_masks
        )
        report = compare(engine_variance, reference, samples)
        if report.verdict == "shortfall":
            message = (
                f"sampling audit: the engine's variance is {report.ratio:.3f} of the model's own "
                f"training-mode passes (at least {1 - report.tolerance:.3f} expected with "
                f"{samples} samples): some stochastic op is not sampled; set mc.audit = 'warn' "
                "to serve it anyway"
            )
            if policy == "refuse":
                raise ValueError(message)
            log.warning(message)
        return report

    @property
    def sites(self) -> list[Site]:
        """The stochastic ops that sample, in execution order."""
        return self.program.sites

    def coverage(self) -> dict[str, Any]:
        """What samples and what does not, and why: the load report of metadata and `models`.

        {"program": "partitioned" | "whole", "whole_because": reason or None,
         "opaque": {path: why fx cannot trace it} (submodules run eagerly inside the graph),
         "sampled": [{"name", "kind", "p" | "op"}], "not_sampled": [{"name", "reason"}]}
        """
        program = self.program
        sampled = [{"name": s.name, "kind": s.kind, **({"op": s.op} if s.kind == "random"
                    else {"p": s.p})} for s in program.sites]  # fmt: skip
        branches = program.branches
        not_sampled = [{"name": n or "(the model)", "reason": "its training branch is "
                        "deterministic (e.g. batch statistics, a train-only head): kept in eval"}
                       for n in branches.deterministic]  # fmt: skip
        not_sampled += [{"name": n or "(the model)", "reason": "listed in mc.ignore: kept in "
                         "eval"} for n in branches.ignored]  # fmt: skip
        whole = isinstance(program, WholeProgram)
        return {
            "program": "whole" if whole else "partitioned",
            "whole_because": program.reason if isinstance(program, WholeProgram) else None,
            "opaque": {} if isinstance(program, WholeProgram) else dict(program.opaque),
            "sampled": sampled,
            "not_sampled": not_sampled,
            "unstacked_recurrent": list(program.rewritten),
            "audit": self.audit.as_dict(),
        }

    def _compile(self) -> None:
        """torch.compile the prefix and suffix (masks stay eager) and warm them up at load."""
        program = self.program
        if isinstance(program, PartitionedProgram):
            program.prefix = torch.compile(program.prefix, dynamic=True)
            program.suffix = torch.compile(program.suffix, dynamic=True)
        else:
            program.module = torch.compile(program.module, dynamic=True)
        warm = torch.zeros((2, *self.input_shape), dtype=self.dtype, device=self.device)
        self.run(warm, MCOptions(samples=BLOCK, seed=0))

    # -- running -------------------------------------------------------------------------

    def run(
        self, x: Tensor, options: MCOptions | None = None, targets: Tensor | None = None
    ) -> RegressionSummary | ClassificationSummary:
        """Sample the predictive distribution of rows x [B, *input_shape].

        targets [B, D] (regression, raw units) adds the MC-mixture log-likelihood per row.
        """
        return self.run_many([MCRequest(x, options or MCOptions(), targets)])[0]

    def run_many(
        self, requests: Sequence[MCRequest], checkpoint: Checkpoint | None = None
    ) -> list[RegressionSummary | ClassificationSummary]:
        """Run several compatible requests in one pass (see `batch_key`); one summary each.

        Each request draws from its own seed, so its answer does not depend on the others.
        `checkpoint`, if given, is called after every chunk: it may raise to abandon the run
        or run other work meanwhile (it never changes this run's numbers).
        """
        if not requests:
            return []
        opts = [r.options.validated() for r in requests]
        if len({batch_key(o) for o in opts}) != 1 or (
            len(requests) > 1 and opts[0].samples == "auto"
        ):
            raise ValueError(
                "requests in one run must share samples and mask_mode (and not be 'auto')"
            )
        for r in requests:
            self.check_request(r)
        if len(requests) > 1 and any(r.targets is not None for r in requests):
            raise ValueError("targets are only accepted for a single request")
        seeds = [secrets.randbits(63) if o.seed is None else o.seed for o in opts]
        with torch.inference_mode(), TRACE_LOCK.running():
            xs = [r.x.to(self.device, self.dtype) for r in requests]
            return self._run(xs, opts, seeds, requests[0].targets, checkpoint)

    def check_request(self, request: MCRequest) -> None:
        """Raise ValueError (naming the field) when rows or targets do not fit this model."""
        x = request.x
        if (
            x.dim() != len(self.input_shape) + 1
            or tuple(x.shape[1:]) != self.input_shape
            or not len(x)
        ):
            raise ValueError(
                f"input must have shape [rows, {', '.join(map(str, self.input_shape))}], "
                f"got {list(x.shape)}"
            )
        if request.targets is None:
            return
        if self.head.task != "regression":
            raise ValueError("targets are only used for regression log-likelihood")
        if self.head.tau is None and not self.head.heteroscedastic:
            raise ValueError("log-likelihood needs tau in the manifest or a heteroscedastic head")
        if request.targets.shape[0] != x.shape[0] or request.targets.dim() != 2:
            got = list(request.targets.shape)
            raise ValueError(f"targets must have shape [{x.shape[0]}, outputs], got {got}")

    def _run(
        self,
        xs: list[Tensor],
        opts: list[MCOptions],
        seeds: list[int],
        targets: Tensor | None,
        checkpoint: Checkpoint | None = None,
    ) -> list[RegressionSummary | ClassificationSummary]:
        sizes = [len(x) for x in xs]
        rows = sum(sizes)
        boundary = self._prefix(xs)
        keys = RowKeys(
            seeds=[s for s, n in zip(seeds, sizes, strict=True) for _ in range(n)],
            rows=[r for n in sizes for r in range(n)],
            shared_seeds=seeds,
            shared_index=None if len(xs) == 1 else torch.repeat_interleave(
                torch.arange(len(xs)), torch.tensor(sizes)),
        )  # fmt: skip
        first = opts[0]
        max_samples = first.max_samples if first.samples == "auto" else first.samples
        returned = max(o.return_samples for o in opts)
        intervals = any(o.interval_levels for o in opts)
        acc = Accumulators(
            self.head, rows, max_samples, returned, targets, self.device, intervals=intervals
        )
        done = 0
        for round_end in self._rounds(first):
            self._sweep(acc, boundary, keys, done, round_end, first.mask_mode, checkpoint)
            done = round_end
            if first.samples == "auto" and acc.converged(first.tolerance):
                break
        offsets = [0, *itertools.accumulate(sizes)]
        whole: dict[tuple[tuple[float, ...], int], Summary] = {}  # one per distinct option set
        answers = []
        for i, o in enumerate(opts):
            mine = slice(offsets[i], offsets[i + 1])
            key = (validate_levels(o.interval_levels), o.return_samples)
            if self.head.task == "regression":  # empirical intervals draw noise from the seed
                answers.append(acc.summary(mine, done, seeds[i], *key))
                continue
            if key not in whole:  # classification: summarise every row once, then slice
                whole[key] = acc.summary(slice(None), done, seeds[i], *key)
            answers.append(rows_of(whole[key], mine, seeds[i]))
        return answers

    def _sweep(
        self,
        acc: Accumulators,
        boundary: list[Any],
        keys: RowKeys,
        start: int,
        end: int,
        mask_mode: MaskMode,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        """Run samples start .. end-1 of every row through the suffix into `acc`.

        `checkpoint` runs after each chunk, between the accumulator update and the next draw.
        """
        for rows_slice, first, count in self._chunks(len(keys.rows), start, end, mask_mode):
            ctx = SamplingContext(
                self.sites, _slice_keys(keys, rows_slice), first, count, mask_mode, self.device
            )
            out = self.program.run_suffix(_rows_of(boundary, self.program.batched, rows_slice), ctx)
            acc.update(rows_slice, first, out.view(ctx.n_rows, count, -1), end)
            if checkpoint is not None:
                checkpoint()

    def run_shard(self, request: MCRequest, shard: Shard) -> PartialStats:
        """Statistics of samples shard.first .. shard.end-1 of one seeded, fixed-N request.

        Masks use the absolute sample indices, so they are exactly those the same samples
        get in a single run; merge_partials + finish then give that run's summary.
        """
        opts = request.options.validated()
        if opts.seed is None or not isinstance(opts.samples, int):
            raise ValueError("a shard needs a seeded request with a fixed sample count")
        if shard.end > opts.samples:
            raise ValueError(f"shard samples {shard.first}..{shard.end - 1} run past the "
                             f"request's {opts.samples}")  # fmt: skip
        self.check_request(request)
        rows = len(request.x)
        keys = RowKeys([opts.seed] * rows, list(range(rows)), [opts.seed], None)
        with torch.inference_mode(), TRACE_LOCK.running():
            boundary = self._prefix([request.x.to(self.device, self.dtype)])
            acc = Accumulators(
                self.head, rows, opts.samples, opts.return_samples, request.targets,
                self.device, start=shard.first, intervals=bool(opts.interval_levels),
            )  # fmt: skip
            self._sweep(acc, boundary, keys, shard.first, shard.end, opts.mask_mode)
            return PartialStats.from_accumulators(acc, shard)

    def _prefix(self, xs: list[Tensor]) -> list[Any]:
        """Prefix once per row, each request padded to a multiple of 8 rows and aligned.

        Padding keeps every row at the same position modulo 8 whatever shares the batch,
        so CPU kernels treat it identically; the padding rows are dropped afterwards.
        """
        parts: list[Tensor] = []
        real: list[int] = []
        offset = 0
        for x in xs:
            padded = round_up(len(x))
            parts.append(x)
            if padded != len(x):
                parts.append(x.new_zeros((padded - len(x), *x.shape[1:])))
            real.extend(range(offset, offset + len(x)))
            offset += padded
        values = self.program.run_prefix(torch.cat(parts) if len(parts) > 1 else parts[0])
        if len(real) == offset:
            return values
        index = torch.tensor(real, device=self.device)
        return [v.index_select(0, index) if batched else v
                for v, batched in zip(values, self.program.batched, strict=True)]  # fmt: skip

    def _rounds(self, opts: MCOptions) -> Iterator[int]:
        """Sample totals after each round: one round, or doubling rounds for 'auto'."""
        if opts.samples != "auto":
            yield opts.samples
            return
        total = min(AUTO_FIRST_ROUND, opts.max_samples)
        while True:
            yield total
            if total >= opts.max_samples:
                return
            total = min(total * 2, opts.max_samples)

    def chunk_count(self, rows: int, options: MCOptions) -> int:
        """Chunks `rows` rows of `options` take (samples='auto': if they run to max_samples).

        The unit of work by which the batching worker tells long requests from short ones.
        """
        total = done = 0
        for end in self._rounds(options):
            span, samples, row_step = self._chunk_shape(rows, done, end, options.mask_mode)
            if span > 0 and rows > 0:
                total += -(-span // samples) * -(-rows // row_step)
            done = end
        return total

    def _chunk_shape(
        self, rows: int, start: int, end: int, mask_mode: MaskMode
    ) -> tuple[int, int, int]:
        """(sample span, samples per chunk, rows per chunk) of `_chunks` over [start, end)."""
        per_row_sample = max(self.program.row_elements, 1)
        fit = max(self.chunk_elements // per_row_sample, BLOCK)  # (row, sample) pairs per chunk
        span = round_up(end) - start
        if mask_mode == "independent":
            samples = min(span, max(BLOCK, fit // BLOCK * BLOCK))
        else:
            samples = min(span, max(BLOCK, (fit // max(rows, 1)) // BLOCK * BLOCK))
        row_step = rows if samples * rows <= fit else max(1, fit // max(samples, 1))
        return span, samples, row_step

    def _chunks(
        self, rows: int, start: int, end: int, mask_mode: MaskMode
    ) -> Iterator[tuple[slice, int, int]]:
        """(rows, first sample, sample count) chunks covering samples [start, end) of all rows.

        Independent masks cost one keyed stream per (row, site, chunk), so chunks take as many
        samples of few rows as fit; shared masks are drawn once per chunk for all its rows, so
        chunks take as many rows as fit. Sample ranges are whole blocks (the last may run past
        `end`; those are ignored).
        """
        span, samples, row_step = self._chunk_shape(rows, start, end, mask_mode)
        for first in range(start, start + span, samples):
            count = min(samples, start + span - first)
            for r0 in range(0, rows, row_step):
                yield slice(r0, min(rows, r0 + row_step)), first, count


def _rows_of(boundary: list[Any], batched: Sequence[bool], rows: slice) -> list[Any]:
    """The boundary values of one row range (values without a batch dimension pass as is)."""
    return [b[rows] if is_batched else b for b, is_batched in zip(boundary, batched, strict=True)]


def _slice_keys(keys: RowKeys, rows: slice) -> RowKeys:
    index = None if keys.shared_index is None else keys.shared_index[rows]
    return RowKeys(keys.seeds[rows], keys.rows[rows], keys.shared_seeds, index)
