"""One table says what each objective needs (config/objectives.py); one mapping builds it (objectives.BUILDERS).
Both name the same objectives, and the config schema accepts exactly those."""

from __future__ import annotations

from typing import get_args

import pytest

from tunesmith.config import config_from_dict
from tunesmith.config.objectives import OBJECTIVES, objectives_where
from tunesmith.config.schema import Objective
from tunesmith.errors import ConfigError
from tunesmith.objectives import BUILDERS, build_objective


def test_the_table_the_builders_and_the_schema_name_the_same_objectives():
    assert list(OBJECTIVES) == list(BUILDERS) == list(get_args(Objective))


def test_what_the_table_says_of_each_family():
    assert objectives_where(data="preference") == ("reward", "dpo", "simpo", "orpo")
    assert objectives_where(generates=True) == ("grpo", "ppo")
    assert objectives_where(next_token_loss=True) == ("sft", "clm")
    assert [n for n, s in OBJECTIVES.items() if s.chat_template] == ["sft", "reward", "dpo", "simpo", "orpo", "kto",
                                                                     "grpo", "ppo"]
    assert [n for n, s in OBJECTIVES.items() if s.stops_at_end_of_turn] == ["sft", "dpo", "simpo", "orpo", "kto",
                                                                            "grpo", "ppo"]
    assert OBJECTIVES["dpo"].rows_per_example == 2 and OBJECTIVES["kto"].rows_per_example == 1


@pytest.mark.parametrize(("name", "kl_beta", "needed"), [("grpo", 0.0, False), ("grpo", 0.04, True),
                                                         ("dpo", 0.0, True), ("ppo", 0.0, True),
                                                         ("simpo", 0.1, False), ("sft", 0.1, False)])
def test_a_reference_model_is_needed_where_the_table_says(name, kl_beta, needed):
    assert OBJECTIVES[name].needs_reference(kl_beta) is needed


def test_an_unknown_objective_is_refused_by_the_config_and_by_the_builder():
    with pytest.raises(ConfigError, match="train.objective"):
        config_from_dict({"train": {"objective": "rlhf"}})
    with pytest.raises(ValueError, match="unknown objective 'rlhf'"):
        build_objective("rlhf")


def test_sft_and_clm_build_the_same_next_token_loss():
    sft, clm = build_objective("sft", padding_free=True), build_objective("clm", padding_free=True)
    assert sft.loss.func is clm.loss.func and sft.collate is clm.collate
