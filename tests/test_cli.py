"""The training entry point's contract (docs/architecture.md): JSON keys, bad input, determinism."""

import json

import pytest
import torch

from course_utils import data, loop, models, train

CONTRACT_KEYS = {
    "model",
    "parallel",
    "nproc",
    "batch_size",
    "steps",
    "losses",
    "samples_per_s",
    "wall_s",
    "backend",
    "device",
}


@pytest.mark.parametrize("model", ["cnn", "rnn"])
def test_cli_writes_the_contract_json(cli, tmp_path, model):
    out, ckpt = tmp_path / "out.json", tmp_path / "ckpt"
    proc = cli(
        "--model", model, "--parallel", "none", "--steps", "50", "--json", str(out), "--eval",
        "--checkpoint", str(ckpt),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert CONTRACT_KEYS | {"test_accuracy"} <= result.keys()
    assert result["model"] == model and result["nproc"] == 1 and result["steps"] == 50
    assert len(result["losses"]) == 50 and result["samples_per_s"] > 0
    assert result["losses"][-1] < result["losses"][0]  # it learns
    # --eval is the accuracy of the trained model (saved at the end) on the held-out digits
    trained = models.build(model)
    trained.load_state_dict(torch.load(ckpt / "latest.pt", weights_only=True)["model"])
    X_test, y_test = data.mnist("test")
    expected = loop.evaluate(trained, models.prepare_input(model, X_test), y_test)
    assert result["test_accuracy"] == expected and expected > 0.2  # above chance (0.1)
    assert f"{model}: final loss" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet"], "invalid choice"),
        (["--nproc", "0", "--parallel", "ddp"], "--nproc must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be in"),
        (["--batch-size", "100000"], "--batch-size must be in"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--steps", "ten"], "invalid int value"),
        (["--nproc", "2"], "--parallel none runs one process"),
        (["--bogus"], "unrecognized arguments"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero_exit(cli, args, message):
    proc = cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("train: error:") and message in lines[0]
    assert proc.stdout == ""


def test_same_seed_gives_same_losses_and_another_seed_does_not():
    def losses(seed):
        cfg = train.RunConfig(model="cnn", steps=6, batch_size=32, seed=seed, threads=1)
        return train.run(cfg, progress=False)["losses"]

    assert losses(1) == losses(1)
    assert losses(1) != losses(2)


def test_rnn_is_deterministic_too():
    cfg = train.RunConfig(model="rnn", steps=5, batch_size=16, seed=0, threads=1)
    assert train.run(cfg, progress=False)["losses"] == train.run(cfg, progress=False)["losses"]


def test_every_option_has_a_one_line_help_that_gives_its_default():
    from course_utils import config

    options = [a for a in config.parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(options) == len(config.fields(config.RunConfig))
    for action in options:
        assert action.help and "\n" not in action.help, action.option_strings
        if action.nargs != 0:  # a flag with a value (not a switch) says what it is without one
            assert "default" in action.help, (action.option_strings, action.help)
