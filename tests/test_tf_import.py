"""The binaries' start-up: no cuInit errors from accelerator probes that cannot succeed."""
import os
import subprocess
import sys

from cpm2_jax.tf_import import jax_platforms_for


def test_tensorflow_gpu_probe_prints_no_cuinit_error_and_stderr_is_restored():
    # TF_CPP_MIN_LOG_LEVEL=1: TensorFlow's warnings and errors are shown (not hidden by a level).
    probe = ("from cpm2_jax.tf_import import quiet_tensorflow_import; quiet_tensorflow_import(); "
             "from cpm2_jax.tasks import pipeline; import sys; print('after the probe', file=sys.stderr)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1", JAX_PLATFORMS="cpu")
    err = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stderr
    assert "cuInit" not in err and "cuda drivers" not in err, err
    assert "after the probe" in err  # stderr is back once TensorFlow is imported


def test_deferred_quiet_import_is_as_quiet_and_a_command_without_data_never_imports_tensorflow():
    """`cpm2` installs the quiet import as a hook: TensorFlow is imported (quietly, GPUs hidden)
    only when something imports it - `cpm2 convert --help` never does."""
    probe = ("import sys; from cpm2_jax.tf_import import quiet_tensorflow_on_import; quiet_tensorflow_on_import(); "
             "from cpm2_jax import cli; cli.build_parser(); print('tensorflow' in sys.modules); "
             "from cpm2_jax.tasks import pipeline; import tensorflow as tf; "
             "print(tf.config.get_visible_devices('GPU')); print('after the import', file=sys.stderr)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "[]"], done.stdout  # not before the data; then no GPU for TensorFlow
    assert "cuInit" not in done.stderr and "cuda drivers" not in done.stderr, done.stderr
    assert "after the import" in done.stderr


def test_jax_platforms_default_only_when_a_cuda_plugin_cannot_find_a_gpu():
    assert jax_platforms_for({}, nvidia_present=False, tpu_present=False, cuda_plugin=True) == "cpu"
    assert jax_platforms_for({}, nvidia_present=False, tpu_present=True, cuda_plugin=True) == "tpu,cpu"
    assert jax_platforms_for({}, nvidia_present=True, tpu_present=False, cuda_plugin=True) is None
    assert jax_platforms_for({}, nvidia_present=False, tpu_present=False, cuda_plugin=False) is None
    assert jax_platforms_for({"JAX_PLATFORMS": "cuda"}, nvidia_present=False, tpu_present=False,
                             cuda_plugin=True) is None  # the user's choice wins
