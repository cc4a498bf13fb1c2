"""Grow a canonical checkpoint offline, one tensor at a time (``megatron-msg grow``).

At 100B scale growth happens between jobs: stage k's canonical checkpoint is
grown into stage k+1's shape and the next job resumes from it at its own
TP/PP/DP. This module does that step:

- Every tensor of the grown model and its Adam state (exp_avg, exp_avg_sq,
  per-tensor step) is built from its source tensor with the growth operators'
  rules (:func:`~megatron_msg.growth.operators.plan_growth` decides everything
  from shapes; :meth:`GrowthPlan.build` makes one tensor) and the moment policy
  (:mod:`megatron_msg.growth.optimizer_state`), then streamed into the new
  store. A copied layer reads its source again, so peak memory is about the
  source and the grown copy of the largest tensor, never the model.
- New masks start at 0 and the ramp is scheduled in ``meta.masks["ramp"]``:
  the ``MaskRamp.state_dict()`` of a fresh ramp (``steps_done`` 0) over every
  unfolded mask, start values run-length encoded
  (``checkpoint.run_meta.encode_ramp``, as a converted training checkpoint
  stores its ramp), which ``megatron-msg train`` resumes.
- ``--load`` may also be a ``megatron-msg train`` checkpoint (DeepSpeed's
  native files, any TP/PP/DP and ZeRO stage): it is first converted with
  ``megatron-msg convert`` into a hidden directory next to ``--save``, which
  is removed afterwards (the stage checkpoint itself is only read).
- Nothing is written before every check passed (paths, configs, shapes, TP
  layout, disk space). The store is built under a hidden temporary name,
  verified there, and only then renamed to ``--save``; a failed check or
  verification removes it. The input is only ever read.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_msg.checkpoint.canonical import (
    DEFAULT_SHARD_BYTES,
    META_FILE,
    CanonicalMeta,
    CanonicalReader,
    CanonicalWriter,
)
from megatron_msg.checkpoint.run_meta import encode_ramp
from megatron_msg.checkpoint.safetensors_files import (
    DTYPE_SIZES,
    CanonicalCheckpointError,
    install_dir,
    temp_sibling,
)
from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth.grow_verify import (
    DEFAULT_MAX_FULL_PARAMS,
    VERIFY_DTYPES,
    VERIFY_MODES,
    GrowthVerificationError,
    VerifyReport,
    verify_growth,
)
from megatron_msg.growth.operators import (
    GrowthPlan,
    is_mask_name,
    plan_growth,
)
from megatron_msg.growth.optimizer_state import (
    DEFAULT_MOMENT_POLICY,
    MOMENTS,
    SquareMeans,
    carry_adam_steps,
    carry_tensor,
    check_policy,
    needs_square_means,
)
from megatron_msg.growth.unmapped_reader import UnmappedReader, torch_dtype

__all__ = [
    "SIZE_OPTIONS",
    "GrowOptions",
    "GrowReport",
    "grow_checkpoint",
]

# --hidden/--ffn/--heads/--layers -> ModelConfig fields.
SIZE_OPTIONS: dict[str, str] = {
    "hidden": "hidden_size",
    "ffn": "ffn_hidden_size",
    "heads": "num_heads",
    "layers": "num_layers",
}
DEFAULT_RAMP_STEPS = 100  # GrowthStage.ramp_steps, the in-run default


@dataclass(frozen=True)
class GrowOptions:
    """How to grow. ``verify``: "off" or one of ``grow_verify.VERIFY_MODES``."""

    init: str = "normal"
    depth_strategy: str = "stack"
    moment_policy: str = DEFAULT_MOMENT_POLICY
    ramp_steps: int = DEFAULT_RAMP_STEPS
    seed: int = 0
    tp: int = 1
    pp: int = 1
    verify: str = "auto"
    verify_dtype: str = "fp64"
    max_full_params: int = DEFAULT_MAX_FULL_PARAMS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    tag: str | None = None  # a training checkpoint's tag (default: its latest)
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        check_policy(self.moment_policy)
        for name in ("ramp_steps", "tp", "pp", "shard_bytes", "max_full_params"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.verify not in ("off", *VERIFY_MODES):
            raise ConfigError(f"verify must be 'off' or one of {VERIFY_MODES}, got {self.verify!r}")
        if self.verify_dtype not in VERIFY_DTYPES:
            raise ConfigError(
                f"verify_dtype must be one of {tuple(VERIFY_DTYPES)}, got {self.verify_dtype!r}"
            )


@dataclass(frozen=True)
class GrowReport:
    save: Path
    source: ModelConfig
    target: ModelConfig
    tensors: int  # tensors written, all kinds
    bytes_written: int
    bytes_read: int
    files: int
    grow_seconds: float
    verify_seconds: float
    verification: VerifyReport | None = None

    def __str__(self) -> str:
        s, t = self.source, self.target
        rate = self.bytes_written / max(self.grow_seconds, 1e-9) / 1e6
        verified = "skipped (--no-verify)" if self.verification is None else str(self.verification)
        return (
            f"grew (hidden, ffn, heads, layers) ({s.hidden_size}, {s.ffn_hidden_size}, "
            f"{s.num_heads}, {s.num_layers}) -> ({t.hidden_size}, {t.ffn_hidden_size}, "
            f"{t.num_heads}, {t.num_layers}) into {self.save}: {self.tensors} tensors, "
            f"{self.files} files, {self.bytes_written / 1e9:.3f} GB in {self.grow_seconds:.1f} s "
            f"({rate:.0f} MB/s)\nverification: {verified} ({self.verify_seconds:.1f} s)"
        )


def grow_checkpoint(
    *,
    load: str | Path,
    save: str | Path,
    target: ModelConfig | None = None,
    sizes: Mapping[str, int] | None = None,
    options: GrowOptions = GrowOptions(),
) -> GrowReport:
    """Grow the canonical checkpoint ``load`` into a new one at ``save``.

    The grown shape is ``target``, or the source config with ``sizes``
    (``SIZE_OPTIONS`` keys) replaced; give exactly one. Raises ConfigError or
    CanonicalCheckpointError (bad input; nothing written) or
    GrowthVerificationError (the grown model does not compute what the source
    did; nothing left at ``save``).
    """
    options.validate()
    load, save = Path(load), Path(save)
    _check_paths(load, save, overwrite=options.overwrite)
    with _canonical_source(load, save, options) as path, CanonicalReader(path) as reader:
        source = reader.meta.model
        target = _target(source, target, sizes)
        plan = _plan(reader, target, options)
        out_bytes = _output_bytes(reader, plan)
        _check_space(save, out_bytes)
        staging = temp_sibling(save, "grow")
        try:
            report = _grow_into(reader, plan, staging, save, out_bytes, options)
            install_dir(staging, save, overwrite=options.overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return report


@contextmanager
def _canonical_source(load: Path, save: Path, options: GrowOptions) -> Iterator[Path]:
    """``load`` when it is a canonical store; a training checkpoint converted to one in a
    hidden sibling of ``save`` (removed on exit) otherwise."""
    if (load / META_FILE).is_file() or not load.is_dir():
        yield load  # CanonicalReader names what is missing
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading DeepSpeed files needs no device
    from megatron_msg.checkpoint.deepspeed_files import DeepSpeedCheckpointError, find_tag_dir
    from megatron_msg.checkpoint.deepspeed_io import convert_to_canonical

    try:
        find_tag_dir(load, tag=options.tag)
    except DeepSpeedCheckpointError as err:
        raise CanonicalCheckpointError(
            f"{load}: neither a canonical checkpoint ({META_FILE} missing) nor a training "
            f"checkpoint ({err})"
        ) from None
    converted = temp_sibling(save, "convert")
    try:
        if options.progress:
            print(f"converting training checkpoint {load} to canonical form ...", file=sys.stderr)
        convert_to_canonical(
            load=load,
            save=converted,
            tag=options.tag,
            shard_bytes=options.shard_bytes,
            progress=options.progress,
        )
        yield converted
    finally:
        shutil.rmtree(converted, ignore_errors=True)


# ------------------------------------------------------------------ checks


def _check_paths(load: Path, save: Path, *, overwrite: bool) -> None:
    here, there = load.resolve(), save.resolve()
    if there == here or here in there.parents or there in here.parents:
        raise ConfigError(
            f"--save {save} and --load {load} overlap; the output must be a separate directory "
            "(the input is never modified)"
        )
    if save.exists() and not (overwrite and save.is_dir()):
        hint = "pass --overwrite to replace it" if not overwrite else "it is not a directory"
        raise ConfigError(f"output {save} already exists; {hint}")


def _target(
    source: ModelConfig, target: ModelConfig | None, sizes: Mapping[str, int] | None
) -> ModelConfig:
    if (target is None) == (not sizes):
        raise ConfigError(
            "give the grown shape either as a target config or as sizes "
            f"({', '.join('--' + k for k in SIZE_OPTIONS)}), not both and not neither"
        )
    if target is not None:
        return target
    sizes = sizes or {}
    unknown = sorted(set(sizes) - set(SIZE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown size option(s) {unknown}; known: {sorted(SIZE_OPTIONS)}")
    return source.replace(**{SIZE_OPTIONS[k]: v for k, v in sizes.items()})


def _plan(reader: CanonicalReader, target: ModelConfig, options: GrowOptions) -> GrowthPlan:
    source = reader.meta.model
    try:
        target.validate(tp_size=options.tp, pp_size=options.pp)
    except ConfigError as err:
        where = f"target ({_shape(target)}) at tp={options.tp}, pp={options.pp}"
        raise ConfigError(f"{where}: {err}") from None
    shapes = {n: reader.entry(n).shape for n in reader.names("weights")}
    plan = plan_growth(
        shapes,
        source,
        target,
        init=options.init,
        depth_strategy=options.depth_strategy,
        seed=options.seed,
        tp_size=options.tp,
    )
    if not any(m.grown for m in plan.maps.tensors.values()):
        raise ConfigError(
            f"the target shape equals the source's ({_shape(source)}); nothing to grow"
        )
    return plan


def _shape(c: ModelConfig) -> str:
    return (
        f"hidden {c.hidden_size}, ffn {c.ffn_hidden_size}, heads {c.num_heads}, "
        f"layers {c.num_layers}"
    )


def _has_moments(reader: CanonicalReader, source: str | None) -> bool:
    if source is None:
        return bool(reader.names("exp_avg"))  # brand new: moments iff the store keeps them
    return reader.has(source, kind="exp_avg")


def _output_bytes(reader: CanonicalReader, plan: GrowthPlan) -> int:
    """Bytes of tensor data the grown store holds (the progress bar's total)."""
    param_size = DTYPE_SIZES[reader.entry("embed.word.weight").dtype]
    total = 0
    for name, tmap in plan.maps.tensors.items():
        numel = int(torch.Size(tmap.new_shape).numel())
        if tmap.source is not None:
            size = DTYPE_SIZES[reader.entry(tmap.source).dtype]
        else:
            size = 4 if is_mask_name(name) else param_size
        total += numel * size
        if not is_mask_name(name) and _has_moments(reader, tmap.source):
            for moment in MOMENTS:
                kind_size = 4 if tmap.source is None else _entry_size(reader, tmap.source, moment)
                total += numel * kind_size
    return total


def _entry_size(reader: CanonicalReader, name: str, kind: str) -> int:
    return DTYPE_SIZES[reader.entry(name, kind=kind).dtype]


def _check_space(save: Path, needed: int) -> None:
    probe = save.absolute().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.01 + (1 << 20):
        raise ConfigError(
            f"not enough disk space for {save}: the grown checkpoint needs "
            f"{needed / 1e9:.2f} GB, {probe} has {free / 1e9:.2f} GB free"
        )


# ------------------------------------------------------------------ growing


def _grow_into(
    reader: CanonicalReader,
    plan: GrowthPlan,
    staging: Path,
    save: Path,
    out_bytes: int,
    options: GrowOptions,
) -> GrowReport:
    start = time.perf_counter()
    with CanonicalWriter(staging, shard_bytes=options.shard_bytes) as writer:
        with tqdm(
            total=out_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"grow {save.name}",
            file=sys.stderr,
            disable=not options.progress,
            mininterval=0.5,
        ) as bar:
            masks: dict[str, torch.Tensor] = {}
            counts = _stream(reader, plan, writer, options.moment_policy, bar, masks)
        writer.finalize(_grown_meta(reader, plan, options, masks))
    grow_seconds = time.perf_counter() - start
    verification = None
    if options.verify != "off":
        if options.progress:
            print(f"verifying {save.name} on a probe batch ...", file=sys.stderr)
        with CanonicalReader(staging) as grown:
            verification = verify_growth(
                reader,
                grown,
                layers=plan.maps.layers,
                mode=options.verify,
                max_full_params=options.max_full_params,
                seed=options.seed,
                dtype=options.verify_dtype,
            )
        if not verification.ok:
            raise GrowthVerificationError(verification)
    return GrowReport(
        save=save,
        source=reader.meta.model,
        target=plan.new_config,
        tensors=counts[0],
        bytes_written=counts[1],
        bytes_read=counts[2],
        files=sum(1 for p in staging.iterdir() if p.suffix == ".safetensors"),
        grow_seconds=grow_seconds,
        verify_seconds=time.perf_counter() - start - grow_seconds,
        verification=verification,
    )


class _Sink:
    """Writes tensors on one background thread, one at a time, so the next tensor is read
    and built while the previous one goes to disk (file writes and torch ops release the
    GIL). At most one tensor is in flight, so memory stays at about three tensors: the
    one being written, and the source and result of the one being built."""

    def __init__(self, writer: CanonicalWriter, bar: Any) -> None:
        self.writer, self.bar = writer, bar
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grow-writer")
        self.pending: Future[None] | None = None
        self.tensors = self.written = 0

    def add(self, name: str, tensor: torch.Tensor, kind: str) -> None:
        self.wait()
        self.pending = self.pool.submit(self._write, name, tensor, kind)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed write here

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # never leave a write running past the writer's abort

    def _write(self, name: str, tensor: torch.Tensor, kind: str) -> None:
        self.writer.add(name, tensor, kind=kind)
        self.tensors, self.written = self.tensors + 1, self.written + tensor.nbytes
        self.bar.update(tensor.nbytes)


def _stream(
    reader: CanonicalReader,
    plan: GrowthPlan,
    writer: CanonicalWriter,
    policy: str,
    bar: Any,
    masks: dict[str, torch.Tensor],
) -> tuple[int, int, int]:
    """Build and write every grown tensor and its moments; returns (tensors, written, read)
    and puts the grown masks into ``masks``."""
    source = UnmappedReader(reader)
    param_dtype = torch_dtype(reader.entry("embed.word.weight").dtype)
    means = None
    if needs_square_means(plan.maps, policy) and reader.names("exp_avg_sq"):
        means = SquareMeans.accumulate(
            (n, source.read(n, kind="exp_avg_sq")) for n in reader.names("exp_avg_sq")
        )
    read = 0
    sink = _Sink(writer, bar)
    try:
        for name, tmap in plan.maps.tensors.items():
            old = None if tmap.source is None else source.read(tmap.source)
            read += 0 if old is None else old.nbytes
            grown = plan.build(name, old, dtype=param_dtype, consume=True)
            sink.add(name, grown, "weights")
            del old  # a copied layer reads its source again instead of keeping it
            if is_mask_name(name):
                masks[name] = grown  # small; never modified, so no copy
                continue
            if not _has_moments(reader, tmap.source):
                continue
            for moment in MOMENTS:
                old = None if tmap.source is None else source.read(tmap.source, kind=moment)
                read += 0 if old is None else old.nbytes
                grown = carry_tensor(
                    name, tmap, old, policy=policy, moment=moment, means=means, consume=True
                )
                sink.add(name, grown, moment)
                del old, grown
        sink.wait()
    finally:
        sink.close()
    return sink.tensors, sink.written, read


def _grown_meta(
    reader: CanonicalReader,
    plan: GrowthPlan,
    options: GrowOptions,
    masks: Mapping[str, torch.Tensor],
) -> CanonicalMeta:
    old = reader.meta
    with_moments = {
        n
        for n, m in plan.maps.tensors.items()
        if not is_mask_name(n) and _has_moments(reader, m.source)
    }
    steps = carry_adam_steps(old.adam_step, plan.maps, step=old.step)
    history = list(old.extra.get("growth_history", []))
    history.append(
        {
            "from": str(reader.path.resolve()),
            "source_model": old.model.to_dict(),
            "source_step": old.step,
            "init": options.init,
            "depth_strategy": options.depth_strategy,
            "moment_policy": options.moment_policy,
            "seed": options.seed,
            "ramp_steps": options.ramp_steps,
        }
    )
    return CanonicalMeta(
        model=plan.new_config,
        step=old.step,
        stage=old.stage + 1,
        adam_step={n: s for n, s in steps.items() if n in with_moments},
        masks={
            "ramp": encode_ramp({"ramp_steps": options.ramp_steps, "steps_done": 0, "start": masks})
        },
        data=dict(old.data),
        lr=dict(old.lr),
        extra={**old.extra, "growth_history": history},
    )
