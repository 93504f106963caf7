"""`cpm2 infer --prompt FILE ...`: many tuned tasks over one backbone in one batch, each input's
`task` picking its prompt and placement; one-line errors (exit 2) for bad prompts and tasks."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpm2_jax import cli, decoding
from cpm2_jax.config import get_config
from cpm2_jax.model import EncoderDecoder
from cpm2_jax.prompts import PromptConfig, files

PROMPT = PromptConfig(length=3, num_tasks=2, placement=("front", "front:1+middle:2"), init="normal",
                      decoder_length=2)  # each file also holds its task's decoder prompt
BACKBONE = get_config("tiny", vocab_size=64, init_std=0.3, num_encoder_layers=1, num_decoder_layers=1)
TUNED = BACKBONE.replace(prompt=PROMPT)
MAX_NEW = 4
ROWS = [([5, 6, 3, 7, 1], "qa"), ([9, 3, 4, 1], 1), ([12, 13, 14, 1], 0), ([20, 3, 21, 22, 23, 1], "pair")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cpm2_jax.convert import native

    ones = jnp.ones((1, 4), jnp.int32)
    variables = jax.jit(EncoderDecoder(TUNED).init)(jax.random.PRNGKey(1), ones, ones)
    params = jax.device_get(nn.unbox(variables["params"]))
    root = tmp_path_factory.mktemp("serving")
    backbone = {k: v for k, v in params.items() if k != "prompt"}
    ckpt = native.save_params(backbone, BACKBONE, root / "backbone")
    prompts = files.save_tuned_prompts(params, TUNED, root, task_names=["qa", "pair"])
    return params, ckpt, prompts, root


def _run(capsys, *flags):
    code = cli.main(["infer", *flags])
    return code, capsys.readouterr().err


def _write_inputs(path, rows):
    path.write_text("".join(json.dumps({"inputs": ids, "task": task}) + "\n" for ids, task in rows))
    return path


def test_mixed_task_batch_equals_each_task_alone(setup, tmp_path, capsys):
    params, ckpt, prompts, _ = setup
    inputs, out = _write_inputs(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    code, err = _run(capsys, f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.INPUT_FILE='{inputs}'",
                     f"--gin.OUTPUT_FILE='{out}'", f"--gin.infer.max_new_tokens={MAX_NEW}", "--gin.infer.batch_size=4",
                     f"--prompt={prompts[0]}", f"--prompt={prompts[1]}")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tasks = {"qa": 0, "pair": 1, 0: 0, 1: 1}
    for (ids, task), record in zip(ROWS, records):
        enc = np.zeros((1, 8), np.int32)
        enc[0, :len(ids)] = ids
        alone = decoding.greedy(params, enc, config=TUNED, max_new_tokens=MAX_NEW,
                                task_index=np.asarray([tasks[task]]))
        row = [int(t) for t in np.asarray(alone.tokens[0])]
        assert record["output_ids"] == (row[:row.index(1)] if 1 in row else row)
        assert record["score"] == pytest.approx(float(alone.scores[0]), abs=1e-4)
        assert record["task"] == task  # the input's fields are copied through


@pytest.mark.parametrize("rows, message", [
    ([([5, 6, 1], "summary")], r"in.jsonl line 1: unknown task 'summary'; tasks are qa, pair"),
    ([([5, 6, 1], 0), ([5, 6, 1], 7)], r"in.jsonl line 2: task index 7 is outside the prompt table's 2 task"),
    ([([5, 6, 1], "pair")], r"in.jsonl line 1: row 0 \(task 1, placement 'front:1\+middle:2'\) has no <sep>"),
])
def test_bad_tasks_are_one_line_each(setup, tmp_path, capsys, rows, message):
    _, ckpt, prompts, _ = setup
    inputs = _write_inputs(tmp_path / "in.jsonl", rows)
    code, err = _run(capsys, f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.INPUT_FILE='{inputs}'",
                     f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", f"--prompt={prompts[0]}", f"--prompt={prompts[1]}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_prompt_for_another_backbone_is_refused(setup, tmp_path, capsys):
    params, ckpt, _, root = setup
    other = dict(params, token_embedder={"embedding": params["token_embedder"]["embedding"] + 1.0})
    foreign, = files.save_tuned_prompts(other, TUNED.replace(prompt=PromptConfig(length=3, init="normal")),
                                        tmp_path, task_names=["foreign"])
    inputs = _write_inputs(tmp_path / "in.jsonl", [([5, 6, 1], 0)])
    code, err = _run(capsys, f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.INPUT_FILE='{inputs}'",
                     f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", f"--prompt={foreign}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "foreign.prompt.npz' was tuned on another backbone: its parameter fingerprint" in err
