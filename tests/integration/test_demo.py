"""`megatron-msg demo` end to end with few steps: every growth preserves the function."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_msg import demo
from megatron_msg.growth.operators import grow


def test_demo_reports_function_preserving_growths(capsys):
    assert demo.main(["--steps", "8", "--ramp-steps", "4"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(
        r"^\s+(\d)\s+\((\d+), (\d+), (\d+), (\d+)\)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$",
        out,
        flags=re.MULTILINE,
    )
    assert [int(r[0]) for r in rows] == list(range(len(demo.STAGES)))
    assert [tuple(int(x) for x in r[1:5]) for r in rows] == demo.STAGES
    params = [int(r[5].replace(",", "")) for r in rows]
    assert params == sorted(params) and len(set(params)) == len(params)
    for row in rows[1:]:
        before, after, delta = float(row[6]), float(row[7]), float(row[8])
        assert delta <= 1e-5, row
        assert abs(before - after) <= 1e-5, row
    initial = float(re.search(r"eval loss (\d+\.\d+)", out).group(1))
    assert float(rows[-1][9]) < initial - 0.5  # it learned the Markov chain somewhat
    assert "every growth function-preserving" in out
    assert re.search(r"grown; \d+ masks ramp to 1 over 4 steps", out)


def test_optimizer_moments_are_carried_over():
    config = demo.stage_config(demo.STAGES[0])
    data = demo.MarkovStream(seed=0)
    model = demo.GPTModel(config, groups=demo.ProcessGroups.single(), init_seed=0)
    opt = demo.make_optimizer(model, lr=1e-3)
    demo.train(model, opt, data, steps=2, ramp=None, log_every=0)
    new_config = demo.stage_config(demo.STAGES[3])
    result = grow(model.to_canonical(), config, new_config)
    grown = demo.GPTModel.from_canonical(result.state, new_config, groups=model.groups)
    new_opt = demo.carry_optimizer(model, opt, grown, result.maps, lr=1e-3)
    old_params = dict(model.named_parameters())
    for name, param in grown.named_parameters():
        tmap = result.maps.tensors[name]
        state = new_opt.state[param]
        old_state = opt.state[old_params[tmap.source]]
        assert torch.equal(state["exp_avg"][tmap.index], old_state["exp_avg"]), name
        assert state["exp_avg_sq"].sum() == pytest.approx(old_state["exp_avg_sq"].sum().item())
        assert float(state["step"]) == 2.0
    demo.train(grown, new_opt, data, steps=1, ramp=None, log_every=0)  # the state is usable


def test_bad_arguments_exit_with_usage_error():
    with pytest.raises(SystemExit) as info:
        demo.main(["--steps", "0"])
    assert info.value.code == 2
