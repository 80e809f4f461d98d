"""Every settings object validates the same way and round-trips through JSON."""

import dataclasses
import json
import math

import pytest

import easier
from easier import (
    ConfigError,
    EditConfig,
    EntropyConfig,
    FineTune,
    FoldOptions,
    FrontConfig,
    LatencyConfig,
    Recovery,
    RunConfig,
    StopRule,
)

CONFIGS = [FineTune, StopRule, EntropyConfig, EditConfig, RunConfig, Recovery, FoldOptions,
           LatencyConfig, FrontConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_each_config_is_exported_frozen_and_round_trips_through_json(cls):
    assert getattr(easier, cls.__name__) is cls and issubclass(cls, easier.Config)
    c = cls()
    text = json.dumps(c.to_dict())  # plain JSON, no custom encoder
    assert cls.from_dict(json.loads(text)) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.__setattr__(dataclasses.fields(c)[0].name, None)
    with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} field\(s\) \['nope'\]"):
        cls.from_dict({**c.to_dict(), "nope": 1})


# (config, field, a bad value): every number field refuses NaN and infinities, every integer
# field refuses a float and a bool, every flag refuses a non-bool
NUMBERS = [(FineTune, "lr"), (FineTune, "momentum"), (FineTune, "weight_decay"),
           (FineTune, "gamma"), (FineTune, "grad_clip"), (StopRule, "delta"),
           (Recovery, "early_stop_margin"), (Recovery, "distill"), (Recovery, "temperature"),
           (LatencyConfig, "min_run_time"), (LatencyConfig, "margin"),
           (FrontConfig, "min_run_time")]
INTEGERS = [(FineTune, "epochs"), (FineTune, "batch_size"), (FineTune, "max_steps"),
            (StopRule, "max_removals"), (StopRule, "max_iterations"), (StopRule, "one_shot"),
            (EntropyConfig, "batches"), (RunConfig, "seed"), (Recovery, "early_stop_every"),
            (Recovery, "early_stop_batches"), (LatencyConfig, "rounds"), (FrontConfig, "rounds")]
FLAGS = [(StopRule, "run_all"), (EditConfig, "fold_ready"), (RunConfig, "amp"),
         (RunConfig, "keep_iterations"), (Recovery, "finish_on_reject"), (FoldOptions, "onnx"),
         (FoldOptions, "torchscript")]


@pytest.mark.parametrize(("cls", "name"), NUMBERS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1", True])
def test_number_fields_refuse_non_finite_values(cls, name, bad):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{name}="):
        cls(**{name: bad})


@pytest.mark.parametrize(("cls", "name"), INTEGERS)
@pytest.mark.parametrize("bad", [2.0, 1.5, True, "3", -1_000])
def test_integer_fields_refuse_floats_bools_and_negatives(cls, name, bad):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{name}="):
        cls(**{name: bad})


@pytest.mark.parametrize(("cls", "name"), FLAGS)
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_flags_refuse_anything_but_a_bool(cls, name, bad):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{name}="):
        cls(**{name: bad})


@pytest.mark.parametrize(("make", "where"), [
    (lambda: FineTune(lr=0.0), "FineTune.lr"),  # lr > 0, not >= 0
    (lambda: FineTune(optimizer="lbfgs"), "FineTune.optimizer"),
    (lambda: FineTune(milestones=(3, 0)), "FineTune.milestones"),
    (lambda: Recovery(distill=1.5), "Recovery.distill"),
    (lambda: Recovery(temperature=0.0), "Recovery.temperature"),
    (lambda: LatencyConfig(margin=1.0), "LatencyConfig.margin"),
    (lambda: LatencyConfig(rounds=2), "LatencyConfig.rounds"),
    (lambda: LatencyConfig(batch_sizes=(1, 0)), "LatencyConfig.batch_sizes"),
    (lambda: FrontConfig(batch_sizes=()), "FrontConfig.batch_sizes"),
    (lambda: FrontConfig(plan="fastest"), "FrontConfig.plan"),
    (lambda: FoldOptions(plan="fastest"), "FoldOptions.plan"),
    (lambda: EditConfig(linearize="relu"), "EditConfig.linearize"),
    (lambda: EntropyConfig(kinds="ReLU"), "EntropyConfig.kinds"),
    (lambda: RunConfig(device="gpu7"), "RunConfig.device"),
])
def test_ranges_and_choices_are_refused_naming_the_field(make, where):
    with pytest.raises(ConfigError, match=rf"^{where}="):
        make()


def test_values_are_normalised_the_way_json_reads_them_back():
    ft = FineTune(milestones=[2, 4], schedule="multistep")
    assert ft.milestones == (2, 4) and FineTune.from_dict(json.loads(json.dumps(
        ft.to_dict()))) == ft
    assert LatencyConfig(batch_sizes=[64, 1, 64]).batch_sizes == (64, 1)  # duplicates dropped
    # callbacks are not data: left out of the file, and a config without them still compares
    lat = LatencyConfig(timer=lambda job, fns: [[1.0], [1.0]])
    assert "timer" not in lat.to_dict()
    assert "log" not in RunConfig(log=print).to_dict()


def test_settings_live_on_the_config_they_concern():
    assert {f.name for f in dataclasses.fields(EditConfig)} == {"linearize", "fold_ready"}
    assert not {"linearize", "fold_ready"} & {f.name for f in dataclasses.fields(EntropyConfig)}
