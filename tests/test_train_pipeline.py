"""The CLI's --parallel pipeline: same losses as one process, bad input caught before workers."""

import json

import pytest
import torch

from course_utils.train import RunConfig, UsageError, run


@pytest.mark.parametrize("model,schedule", [("cnn", "1f1b"), ("rnn", "gpipe")])
def test_pipeline_run_has_the_losses_of_one_process(model, schedule):
    common = dict(model=model, batch_size=32, steps=4, seed=1)
    single = run(RunConfig(**common), progress=False)["losses"]
    piped = run(
        RunConfig(**common, parallel="pipeline", nproc=2, microbatches=4, schedule=schedule),
        progress=False,
    )
    assert piped["nproc"] == 2 and piped["backend"] == "gloo"
    torch.testing.assert_close(piped["losses"], single, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(microbatches=5), "does not divide --batch-size 64"),
        (dict(nproc=5), "at most 4 pipeline stages"),
    ],
)
def test_bad_pipeline_input_is_one_clear_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        run(RunConfig(**{"model": "cnn", "parallel": "pipeline", "nproc": 2, **kwargs}))


def test_the_cli_writes_the_contract_for_a_pipeline(tmp_path, cli):
    out = tmp_path / "p.json"
    args = ["--model", "cnn", "--parallel", "pipeline", "--nproc", "2", "--microbatches", "2"]
    proc = cli(*args, "--steps", "3", "--eval", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 3 and sum(result["stage_sizes"]) == 4  # every unit, once
    # --eval gathers the stages into one model: it scores as the same model trained in one piece
    none = run(RunConfig(model="cnn", steps=3, eval=True), progress=False)
    assert result["test_accuracy"] == pytest.approx(none["test_accuracy"], abs=2e-3)
    bad = cli("--model", "cnn", "--parallel", "pipeline", "--nproc", "2", "--microbatches", "5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "train: error:" in bad.stderr
