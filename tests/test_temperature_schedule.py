"""Annealed gate temperature (``--search.temperature_final``): a schedule that is a function of the step."""
from __future__ import annotations

import pytest

from conftest import crash_then_resume
from rankalloc.config import DataConfig, ModelConfig, SearchConfig, SearchParams
from rankalloc.errors import ConfigError
from rankalloc.rank_map import RankMap
from rankalloc.search import gate_temperature, run_search


def test_the_temperature_is_constant_without_a_final_value_and_geometric_with_one():
    steps = 30
    constant = SearchParams(warmup_steps=10, temperature=0.5)
    assert {gate_temperature(s, constant, steps) for s in range(steps)} == {0.5}
    annealed = SearchParams(warmup_steps=10, temperature=0.5, temperature_final=0.05)
    values = [gate_temperature(s, annealed, steps) for s in range(steps)]
    assert values[:11] == [0.5] * 11  # unchanged until the first gate step
    assert values[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(values[10:], values[11:]))  # strictly falling over the gate steps
    middle = values[10 + (steps - 1 - 10) // 2]  # geometric: halfway in steps, the geometric mean in value
    assert 0.1 < middle < 0.2


def _config(tmp_path, name: str, final: float | None = 0.1, **top) -> SearchConfig:
    return SearchConfig(
        budget="20k", seed=0, device="cpu", out=str(tmp_path / name), model=ModelConfig(num_layers=1),
        data=DataConfig(task="tweets", max_length=24, max_train_examples=160, max_eval_examples=32, batch_size=16),
        search=SearchParams(steps=8, warmup_steps=2, gap_batches=2, r_max=8, temperature=0.5,
                            temperature_final=final, budget_warmup=0.5, checkpoint_every=4), **top)


def test_an_annealed_search_ends_at_the_final_temperature_and_resumes_exactly(tmp_path, one_thread):
    result = run_search(_config(tmp_path, "run"), command="test")
    rm = RankMap.load(result.out / "rank_map.json")
    assert 0.99 * 20_000 <= rm.total_params <= 20_000
    gated_rows = [row for row in result.history if row["val_loss"] is not None]
    assert len(gated_rows) == 6

    resumed = crash_then_resume(lambda **top: _config(tmp_path, "crashed", **top), crash_at_step=6)
    assert resumed.history == result.history  # the temperature after a resume is the one the schedule gives
    assert resumed.rank_map.ranks == rm.ranks
    constant = run_search(_config(tmp_path, "constant", final=None), command="test")
    assert [r["cost_ratio"] for r in constant.history] != [r["cost_ratio"] for r in result.history]


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_a_non_positive_final_temperature_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as err:
        SearchParams(temperature_final=bad).validate()
    assert "\n" not in str(err.value) and "--search.temperature_final" in str(err.value)
