"""The a_t schedules of knowledge inheritance and their bad values."""
import pytest

from cpm2_jax.errors import ConfigError
from cpm2_jax.inheritance.schedule import InheritanceConfig, alpha_at


def test_linear_decay_to_zero_at_n():
    values = [float(alpha_at(s, schedule="linear", alpha=0.8, inherit_steps=10)) for s in (0, 5, 10, 20)]
    assert values == pytest.approx([0.8, 0.4, 0.0, 0.0])


def test_constant():
    assert [float(alpha_at(s, schedule="constant", alpha=0.3, inherit_steps=1)) for s in (0, 7, 10**6)] == \
        pytest.approx([0.3, 0.3, 0.3])


def test_inherit_then_train():
    values = [float(alpha_at(s, schedule="inherit_then_train", inherit_steps=4)) for s in (0, 3, 4, 9)]
    assert values == [1.0, 1.0, 0.0, 0.0]


def test_default_is_linear_with_temperature_two():
    cfg = InheritanceConfig(teacher_checkpoint="x", inherit_steps=4).validate()
    assert cfg.schedule == "linear" and cfg.temperature == 2.0
    assert float(cfg.alpha_at(1)) == pytest.approx(0.75)
    # N unset: 44% of the run, as the reference KI run.
    assert InheritanceConfig(teacher_checkpoint="x").resolved(1000).validate().inherit_steps == 440


@pytest.mark.parametrize("fields,named", [
    ({"inherit_steps": 0}, "inherit_steps (N) must be > 0"),
    ({"inherit_steps": -3, "schedule": "inherit_then_train"}, "inherit_steps (N) must be > 0"),
    ({"temperature": 0.0}, "temperature (T) must be > 0"),
    ({"temperature": -1.0}, "temperature (T) must be > 0"),
    ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
    ({"alpha": 1.5}, "alpha (a_0) must be in [0, 1]"),
    ({"teacher_checkpoint": None}, "set teacher_checkpoint (TEACHER_CHECKPOINT_PATH) or teacher_outputs"),
])
def test_bad_values_name_the_field(fields, named):
    cfg = InheritanceConfig(**{"teacher_checkpoint": "ckpt", "inherit_steps": 10, **fields})
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cfg.validate()
