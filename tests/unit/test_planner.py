"""The growth planner: exact parameter counts, FLOPs, memory per GPU, checks, CLI."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from megatron_msg.config import ConfigError, ModelConfig
from megatron_msg.growth import planner
from megatron_msg.growth.planner import (
    GIB,
    count_parameters,
    hostfile_slots,
    layer_activation_bytes,
    load_stages,
    params_per_gpu,
    plan_all,
    plan_stage,
    training_flops,
)

ROOT = Path(__file__).resolve().parents[2]
FLM = ROOT / "examples" / "flm101b"
FLM_STAGES = [
    (FLM / "stage1_16b.yaml", 16e9),
    (FLM / "stage2_51b.yaml", 51e9),
    (FLM / "stage3_101b.yaml", 101e9),
]
SMALL = ModelConfig(
    vocab_size=100, hidden_size=16, ffn_hidden_size=24, num_heads=3, head_dim=8,
    num_layers=4, max_seq_len=32,
)  # fmt: skip


def _one(path: Path, *overrides: str):
    (stage,) = load_stages(path, overrides)
    return stage


@pytest.mark.parametrize(("path", "nominal"), FLM_STAGES)
def test_flm_stages_are_within_3_percent_of_nominal(path: Path, nominal: float) -> None:
    params = count_parameters(_one(path).model)
    assert abs(params / nominal - 1) < 0.03, (path.name, params)


@pytest.mark.parametrize(("path", "nominal"), FLM_STAGES)
def test_flm_layouts_fit_in_80gb_with_zero1_bf16_recompute(path: Path, nominal: float) -> None:
    stage = _one(path)
    assert stage.train.parallel.zero_stage == 1 and stage.train.train.dtype == "bf16"
    assert stage.train.train.recompute == "full" and stage.plan.gpu_memory_gb == 80
    plan = plan_stage(stage)
    assert plan.layout["gpus"] == 192 == plan.layout["tp"] * plan.layout["pp"] * plan.layout["dp"]
    m = plan.memory
    assert m.total == pytest.approx(m.weights + m.grads + m.optimizer + m.activations + m.overhead)
    assert plan.fits and m.total <= 80 * GIB
    # bf16 weights and grads: 2 + 2 bytes per local parameter; ZeRO-1 shards 16 bytes over DP.
    assert m.weights == m.grads == 2 * plan.params_per_gpu
    assert m.optimizer == pytest.approx(16 * plan.params_per_gpu / plan.layout["dp"])
    # Without recomputation the same layouts would hold far more activations.
    assert m.activations_by_mode["none"] > 3 * m.activations_by_mode["full"]
    assert not [c for c in plan.checks if c.level == "error"]


def test_flm_plan_cli_shows_breakdown_and_growth_io(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code = planner.main([str(p) for p, _ in FLM_STAGES] + ["--strict"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert code == 0, out
    assert elapsed < 10
    for row in (
        "weights (bf16)",
        "grads (bf16)",
        "optimizer (fp32 master",
        "activations (recompute full)",
    ):
        assert out.count(row) == 3, row
    assert out.count("-> fits") == 3
    assert "grow stage1_16b.yaml -> stage2_51b.yaml" in out
    assert "MSG can grow hidden_size, ffn_hidden_size, num_heads" in out
    assert "MSG can grow num_layers" in out


def test_growth_io_counts_fp32_weights_and_two_moments() -> None:
    stages = [_one(p) for p, _ in FLM_STAGES]
    plans, moves = plan_all(stages)
    for move, src, dst in zip(moves, plans, plans[1:]):
        assert move.read_bytes == 12 * src.params and move.write_bytes == 12 * dst.params
        assert [c.level for c in move.checks] == ["ok"]
    bad = stages[0].model.replace(head_dim=64, num_heads=88)
    smaller = stages[1].model.replace(num_layers=20)
    move = planner.growth_io(plans[0], bad, plans[1], smaller)
    texts = " | ".join(c.text for c in move.checks)
    assert "growth cannot change head_dim: 64 -> 128" in texts
    assert "growth cannot shrink: num_heads 88 -> 80, num_layers 40 -> 20" in texts


def test_layout_that_cannot_fit_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(FLM / "stage3_101b.yaml"), "--set", "parallel.tp=1", "--set", "parallel.pp=1",
            "--set", "parallel.dp=192", "--set", "batch.grad_accum=0", "--set", "batch.global_batch_size=2304"]  # fmt: skip
    assert planner.main(args) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "1/1/192   395.7 GiB  NO" in out
    assert planner.main([*args, "--strict"]) == 1
    capsys.readouterr()
    data_code = planner.main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data_code == 0 and data["ok"] is False
    (stage,) = data["stages"]
    assert stage["fits"] is False and stage["memory"]["total"] > 80 * GIB
    assert any(c["text"].startswith("DOES NOT FIT") for c in stage["checks"])


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_embeddings": False},
        {"activation": "swiglu", "norm": "rmsnorm", "position_embedding": "rope"},
        {"use_bias": False, "tie_embeddings": False, "norm": "layernorm"},
    ],
)
def test_parameter_count_equals_real_model_canonical_state(changes: dict) -> None:
    from megatron_msg.model import GPTModel
    from megatron_msg.parallel.groups import ProcessGroups

    config = SMALL.replace(**changes)
    state = GPTModel(config, groups=ProcessGroups.single(), init_seed=0).to_canonical()
    assert count_parameters(config) == sum(t.numel() for t in state.values())
    model = GPTModel(config, groups=ProcessGroups.single(), init_seed=0)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_params_per_gpu_partition_the_model(tie: bool) -> None:
    config = SMALL.replace(tie_embeddings=tie)
    total = count_parameters(config)
    per_stage = [params_per_gpu(config, tp=1, pp=2, stage=i) for i in range(2)]
    copy = config.padded_vocab_size() * config.hidden_size if tie else 0
    assert sum(per_stage) == total + copy  # tied: the last stage holds a copy of the embedding
    assert params_per_gpu(config, tp=1, pp=1, stage=0) == total
    # TP splits everything but norms, row-parallel biases and positions.
    replicated = sum(
        math.prod(s.shape) for s in planner.parameter_specs(config).values() if s.split_dim is None
    )
    assert params_per_gpu(config, tp=2, pp=1, stage=0) == (total - replicated) // 2 + replicated


def test_activation_formula_matches_korthikanti_for_gpt_shapes() -> None:
    # A = h, f = 4h, GELU, with dropout: 34 sbh + 5 a s^2 b per layer (Korthikanti et al. 2022).
    cfg = ModelConfig(vocab_size=1000, hidden_size=1024, ffn_hidden_size=4096, num_heads=16,
                      head_dim=64, num_layers=2, max_seq_len=2048, dropout=0.1)  # fmt: skip
    s, b, h, a = 2048, 2, 1024, 16

    def act(mode: str, tp: int, sp: bool) -> float:
        kw = {"seq_len": s, "micro_batch": b, "tp": tp, "sp": sp, "flash": False}
        return layer_activation_bytes(cfg, mode=mode, **kw)

    for t in (1, 2, 8):
        assert act("none", t, False) == pytest.approx(
            s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
        )
        assert act("none", t, True) == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
        assert act("selective", t, True) == pytest.approx(34 * s * b * h / t)
        assert act("selective", t, False) == pytest.approx(s * b * h * (10 + 24 / t))
        assert act("full", t, False) == 2 * s * b * h
    # Without dropout the masks and the dropped-out softmax copy are not kept.
    plain = cfg.replace(dropout=0.0)
    kw = {"seq_len": s, "micro_batch": b, "tp": 1, "sp": False, "flash": False}
    assert layer_activation_bytes(plain, mode="none", **kw) == pytest.approx(
        s * b * h * 32 + 2 * a * s * s * b
    )


def test_first_pipeline_stage_holds_pp_micro_batches_in_flight() -> None:
    stage = _one(FLM / "stage3_101b.yaml")
    first = planner.activation_bytes(stage, mode="full", pipeline_stage=0)
    layer = layer_activation_bytes(stage.model, seq_len=2048, micro_batch=1, tp=4, sp=False,
                                   mode="full", flash=True)  # fmt: skip
    working = layer_activation_bytes(stage.model, seq_len=2048, micro_batch=1, tp=4, sp=False,
                                     mode="none", flash=True)  # fmt: skip
    assert first == pytest.approx(20 * 4 * layer + working)  # 20 layers x 4 micro-batches
    second = planner.activation_bytes(stage, mode="full", pipeline_stage=1)
    assert second == pytest.approx(20 * 3 * layer + working)


def test_flops_per_token() -> None:
    config = SMALL
    seq = 32
    matmul = (
        sum(
            math.prod(s.shape)
            for n, s in planner.parameter_specs(config).items()
            if n.endswith(".weight") and ("attn." in n or "mlp." in n)
        )
        + config.padded_vocab_size() * config.hidden_size
    )  # the logits matmul
    attention = 12 * config.num_layers * seq * config.num_heads * config.head_dim
    model, hw = training_flops(config, seq_len=seq, recompute="none")
    assert model == hw == 6 * matmul + attention
    _, full = training_flops(config, seq_len=seq, recompute="full")
    logits = 6 * config.padded_vocab_size() * config.hidden_size
    assert full - model == pytest.approx((model - logits) / 3)  # one more forward of the layers
    _, selective = training_flops(config, seq_len=seq, recompute="selective")
    assert selective - model == pytest.approx(attention / 3)


def test_days_follow_from_tokens_flops_and_utilisation() -> None:
    stage = _one(FLM / "stage1_16b.yaml")
    plan = plan_stage(stage)
    assert plan.tokens == stage.train.train.steps * 2304 * 2048
    assert plan.hfu == pytest.approx(stage.plan.hfu)
    expected = plan.tokens * plan.hw_flops_per_token / (192 * 312e12 * stage.plan.hfu) / 86400
    assert plan.days == pytest.approx(expected)
    mfu = plan_stage(_one(FLM / "stage1_16b.yaml", "plan.hfu=0", "plan.mfu=0.5"))
    assert mfu.days == pytest.approx(
        plan.tokens * plan.flops_per_token / (192 * 312e12 * 0.5) / 86400
    )


def test_hostfile_slots_and_world_size_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hostfile_slots(FLM / "hostfile.example") == 192
    small = tmp_path / "hosts"
    small.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8  # spare\n\n")
    assert hostfile_slots(small) == 16
    assert planner.main([str(FLM / "stage1_16b.yaml"), "--hostfile", str(small), "--strict"]) == 1
    assert "needs TP (2) x PP (1) x DP (96) = 192 to equal the GPUs (16)" in capsys.readouterr().out
    small.write_text("node-a slots=eight\n")
    with pytest.raises(ConfigError, match=r"hosts:1: expected 'HOST slots=N'"):
        hostfile_slots(small)


def test_bad_configs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text((FLM / "stage1_16b.yaml").read_text())
    assert planner.main([str(path), "--set", "plan.gpu_memroy_gb=40"]) == 2
    assert "plan.gpu_memroy_gb" in capsys.readouterr().err
    assert planner.main([str(path), "--set", "train.recompute=some"]) == 2
    assert "train.recompute must be one of" in capsys.readouterr().err
    assert planner.main([str(path), "--set", "model.num_heads=45", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "needs num_heads (45) divisible by TP (2)" in out
    assert planner.main([str(tmp_path / "missing.yaml")]) == 2


def test_in_run_growth_stages_are_planned_each(tmp_path: Path) -> None:
    path = tmp_path / "inrun.yaml"
    path.write_text(
        "model: {vocab_size: 100, hidden_size: 16, ffn_hidden_size: 24, num_heads: 2,"
        " head_dim: 8, num_layers: 2, max_seq_len: 32}\n"
        "data: {source: synthetic, seq_len: 32}\n"
        "train: {steps: 100}\n"
        "growth:\n  - {start_step: 10, hidden_size: 32, ramp_steps: 5}\n"
        "  - {start_step: 50, num_layers: 4, ramp_steps: 5}\n"
    )
    stages = load_stages(path)
    assert [s.label for s in stages] == [f"inrun.yaml[stage {i}]" for i in range(3)]
    assert [s.model.hidden_size for s in stages] == [16, 32, 32]
    plans, moves = plan_all(stages)
    assert plans[0].params < plans[1].params < plans[2].params
    assert all(p.fits for p in plans) and len(moves) == 2


def test_exact_count_for_flm_101b_by_hand() -> None:
    # 80 layers of 12 h^2 + 13 h (LayerNorm with bias, GELU, f = 4h, n d = h),
    # a tied 100352 x h embedding and the final norm.
    h, v = 10240, 100352
    expected = 80 * (12 * h * h + 13 * h) + v * h + 2 * h
    assert count_parameters(_one(FLM / "stage3_101b.yaml").model) == expected
