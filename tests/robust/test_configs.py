"""Issue 15 items 2 and 12: every config is validated on construction, with the same helpers.

A bad field raises ValueError (right type, wrong value) or TypeError (wrong type) whose message
starts with the field's name; nothing is silently accepted to fail (or to produce NaN) later.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl import ModelConfig
from refimpl._validate import check_bool, check_choice, check_integer, check_real
from refimpl.distill.pipelines import GKDConfig
from refimpl.model.train import TrainConfig
from refimpl.rl.trainer import GRPOConfig

TINY = ModelConfig.preset("tiny")
BAD_NUMBERS = [math.nan, math.inf, -math.inf, "1", None, True, [1]]


def _raises_naming(field, make):
    with pytest.raises((ValueError, TypeError)) as e:
        make()
    assert str(e.value).startswith(field), (field, str(e.value))


@pytest.mark.parametrize("change", [
    dict(num_experts_per_tok=2.0), dict(n_group=4.0), dict(topk_group=2.0), dict(hidden_size=True),
    dict(routed_scaling_factor=math.nan), dict(routed_scaling_factor="2.5"), dict(routed_scaling_factor=-1.0),
    dict(rope_theta=0.0), dict(rope_theta=-5.0), dict(rms_norm_eps="1e-6"), dict(rms_norm_eps=None),
    dict(aux_loss_alpha=math.nan), dict(initializer_range=-0.1), dict(max_position_embeddings=0),
    dict(norm_topk_prob=1), dict(q_lora_rank=1.5), dict(vocab_size=64.0),
])
def test_model_config_field_errors(change):
    field = next(iter(change))
    _raises_naming(field, lambda: TINY.replace(**change))
    _raises_naming(field, lambda: ModelConfig.from_dict({**TINY.to_dict(), **change}))


@pytest.mark.parametrize("key, value", [("beta_fast", 0), ("beta_slow", -1.0), ("original_max_position_embeddings", 0),
                                        ("factor", math.nan), ("mscale", "x"), ("factor", 0.5)])
def test_yarn_fields_are_checked(key, value):
    rs = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
    with pytest.raises((ValueError, TypeError), match="rope_scaling"):
        TINY.replace(rope_scaling={**rs, key: value})


@pytest.mark.parametrize("d", [[1, 2], "config", None, 3])
def test_from_dict_needs_a_dict(d):
    _raises_naming("d", lambda: ModelConfig.from_dict(d))


@pytest.mark.parametrize("change", [
    dict(weight_decay=math.nan), dict(bias_update_speed=math.inf), dict(steps=-1), dict(steps=1.5),
    dict(mtp_lambda=-1.0), dict(mtp_lambda=math.nan), dict(min_lr=-1.0), dict(lr=math.nan), dict(min_lr=1.0),
    dict(warmup_steps=200), dict(betas=(0.9,)), dict(betas=(0.9, 1.0)), dict(max_grad_norm=0.0),
    dict(balance="aux"), dict(backend="cuda"),
])
def test_train_config_field_errors(change):
    field = next(iter(change))
    _raises_naming(field, lambda: TrainConfig(**change))


@pytest.mark.parametrize("cls, fields", [
    (TrainConfig, ["steps", "lr", "min_lr", "weight_decay", "max_grad_norm", "bias_update_speed", "mtp_lambda"]),
    (GRPOConfig, ["num_generations", "steps", "lr", "temperature", "top_p", "epsilon", "beta", "max_grad_norm",
                  "weight_decay", "entropy_coef", "dynamic_sampling"]),
    (GKDConfig, ["lmbda", "beta", "temperature", "top_p", "lr", "steps", "batch_size", "weight_decay",
                 "max_grad_norm", "seq_kd"]),
])
@given(bad=st.sampled_from(BAD_NUMBERS))
def test_every_config_rejects_non_finite_and_wrong_types(cls, fields, bad):
    for field in fields:
        if isinstance(bad, bool) and field in ("dynamic_sampling", "seq_kd"):
            continue   # a valid value there
        _raises_naming(field, lambda field=field: cls(**{field: bad}))


@given(v=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                   st.text(max_size=3), st.just(np.int64(3)), st.just(np.float32(0.5))))
def test_scalar_helpers_accept_or_name_the_argument(v):
    for helper, kw in ((check_integer, dict(low=0)), (check_real, dict(low=0.0, high=1.0)), (check_bool, {}),
                       (check_choice, dict(choices=("a", None)))):
        try:
            out = helper("field_x", v, **kw)
        except (ValueError, TypeError) as e:
            assert str(e).startswith("field_x:")
            continue
        if helper is check_integer:
            assert type(out) is int and out >= 0 and not isinstance(v, bool)
        elif helper is check_real:
            assert type(out) is float and 0.0 <= out <= 1.0 and math.isfinite(out) and not isinstance(v, bool)
        elif helper is check_bool:
            assert out is bool(v) and isinstance(v, bool | np.bool_)
        else:
            assert out in ("a", None)
