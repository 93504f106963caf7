"""gin at the edge: a misspelt macro flag is an error, macros the files set stay free."""
import gin
import pytest

from cpm2_jax import gin_utils
from cpm2_jax import train as train_bin
from cpm2_jax.errors import ConfigError

RUN = ["models/tiny.gin", "runs/pretrain.gin"]
MACROS = ["MIXTURE_OR_TASK_NAME = 'en_zh'", "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 8}",
          "TRAIN_STEPS = 1", "MODEL_DIR = '/tmp/run'"]


@pytest.fixture(autouse=True)
def _clean_gin():
    train_bin.configurable_train()
    yield
    gin.clear_config()


def test_a_misspelt_macro_flag_names_the_closest_macro():
    with pytest.raises(ConfigError, match=r"--gin.LEARNIN_RATE sets macro LEARNIN_RATE, which no gin file or "
                                          r"binding of this run reads \(did you mean 'LEARNING_RATE'\?\)"):
        gin_utils.parse_gin(RUN, MACROS + ["LEARNIN_RATE = 1e9"])


def test_macros_read_by_the_files_or_other_macros_are_accepted():
    # EVAL_BATCH_SIZE is read by a binding; BATCH_SIZE only through the macro EVAL_BATCH_SIZE = %BATCH_SIZE
    # (and the train DatasetConfig); TASK_FEATURE_LENGTHS inside a dict-valued binding of two scopes.
    gin_utils.parse_gin(RUN, MACROS + ["LEARNING_RATE = 1e-2", "EVAL_BATCH_SIZE = 4", "BATCH_SIZE = 8"])
    assert {"LEARNING_RATE", "EVAL_BATCH_SIZE", "BATCH_SIZE", "MODEL_CONFIG"} <= gin_utils.referenced_macros()
    with gin.config_scope("validation"):
        from cpm2_jax.datasets import DatasetConfig

        assert DatasetConfig().batch_size == 4
