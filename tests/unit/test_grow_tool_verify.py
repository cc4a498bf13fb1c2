"""The growth tool's verification gate: full-model and layer-by-layer checks, and that they
catch a growth that is not function-preserving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_msg.checkpoint.canonical import CanonicalReader, load_canonical, save_canonical
from megatron_msg.growth import grow_tool
from megatron_msg.growth.grow_tool import GrowOptions, grow_checkpoint
from megatron_msg.growth.grow_verify import GrowthVerificationError, VerifyReport, verify_growth
from megatron_msg.growth.operators import GrowthPlan, LayerMap
from tests.unit.grow_tool_sources import GROWN_SIZES, SMALL_VARIANT, siblings, write_source

STACKED = (LayerMap(0, False), LayerMap(1, False), LayerMap(0, True), LayerMap(1, True))


def _verify(src: Path, dst: Path, mode: str, dtype: str = "fp64") -> VerifyReport:
    with CanonicalReader(src) as small, CanonicalReader(dst) as big:
        return verify_growth(small, big, layers=STACKED, mode=mode, dtype=dtype)


def _broken_copy(grown: Path, out: Path, name: str, value: float) -> None:
    """``grown`` with every entry of mask ``name`` set to ``value`` (a broken growth)."""
    state = load_canonical(grown)
    state.weights[name] = torch.full_like(state.weights[name], value)
    save_canonical(
        out,
        weights=state.weights,
        exp_avg=state.exp_avg,
        exp_avg_sq=state.exp_avg_sq,
        meta=state.meta,
    )


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grown")
    write_source(root / "src")
    options = GrowOptions(progress=False, verify="off")
    grow_checkpoint(load=root / "src", save=root / "dst", sizes=GROWN_SIZES, options=options)
    return root / "src", root / "dst"


@pytest.mark.parametrize(("dtype", "tolerance"), [("fp64", 1e-10), ("fp32", 1e-5)])
def test_layer_by_layer_check_passes_and_agrees_with_full(
    grown: tuple[Path, Path], dtype: str, tolerance: float
) -> None:
    src, dst = grown
    layers = _verify(src, dst, "layers", dtype)
    full = _verify(src, dst, "full", dtype)
    assert layers.ok and full.ok
    assert layers.tolerance == full.tolerance == tolerance
    labels = [name for name, _ in layers.deviations]
    assert labels == [
        "embedding",
        "layer 0",
        "layer 1",
        "layer 2 (new)",
        "layer 3 (new)",
        "logits",
        "loss",
    ]
    assert all(d <= tolerance for _, d in layers.deviations)
    assert dict(full.deviations)["logits"] <= tolerance


@pytest.mark.parametrize(
    ("mask", "value", "where"),
    [
        ("layers.0.masks.ffn", 1.0, "layer 0"),  # new FFN neurons switched on
        ("layers.3.masks.depth", 1.0, "layer 3 (new)"),  # a new layer switched on
        ("masks.hidden", 1.0, "embedding"),  # new hidden channels switched on
    ],
)
def test_checks_catch_a_broken_growth(
    grown: tuple[Path, Path], tmp_path: Path, mask: str, value: float, where: str
) -> None:
    src, dst = grown
    _broken_copy(dst, tmp_path / "broken", mask, value)
    for dtype in ("fp64", "fp32"):
        layers = _verify(src, tmp_path / "broken", "layers", dtype)
        assert not layers.ok
        assert layers.failed[0][0] == where, layers
        assert layers.worst[1] > 1e-3  # a real defect is far beyond either tolerance
        assert not _verify(src, tmp_path / "broken", "full", dtype).ok


def test_auto_mode_picks_by_parameter_count(grown: tuple[Path, Path]) -> None:
    src, dst = grown
    with CanonicalReader(src) as small, CanonicalReader(dst) as big:
        assert verify_growth(small, big, layers=STACKED).mode == "full"
        forced = verify_growth(small, big, layers=STACKED, max_full_params=1000)
        assert forced.mode == "layers"


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_gate_rejects_broken_growth_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    write_source(tmp_path / "src", SMALL_VARIANT)
    real_build = GrowthPlan.build

    def broken_build(self: GrowthPlan, name: str, *args: object, **kwargs: object) -> torch.Tensor:
        out = real_build(self, name, *args, **kwargs)  # type: ignore[arg-type]
        return torch.ones_like(out) if name == "layers.1.masks.heads" else out

    monkeypatch.setattr(grow_tool.GrowthPlan, "build", broken_build)
    options = GrowOptions(progress=False, verify=mode, max_full_params=1000)
    with pytest.raises(GrowthVerificationError, match="not function-preserving") as err:
        grow_checkpoint(
            load=tmp_path / "src", save=tmp_path / "dst", sizes=GROWN_SIZES, options=options
        )
    assert err.value.report.mode == mode
    if mode == "layers":
        assert err.value.report.failed[0][0] == "layer 1"
    assert siblings(tmp_path / "dst") == []
    # Without the gate the same broken growth would have been written.
    off = GrowOptions(progress=False, verify="off")
    grow_checkpoint(load=tmp_path / "src", save=tmp_path / "dst", sizes=GROWN_SIZES, options=off)
    assert (tmp_path / "dst" / "meta.json").is_file()
