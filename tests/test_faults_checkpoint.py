"""Faults and hostile inputs, tried on purpose: checkpoints and output files (issue 23).

1. A checkpoint from someone else runs no code: a payload (a pickle whose ``__reduce__`` writes a
   marker file) planted in every file a resume opens, its SHA-256 values recomputed, never runs;
   the run falls back to the previous good checkpoint or refuses in one line.
2. No temporary name is predictable: symlinks planted where the old names were are never
   followed, and a target that is not a regular file (a symlink, a FIFO) is refused.
3. One run per checkpoint folder; workers load only what was checked; a checkpoint of other
   data, or of other shapes, is refused.
4. A save that fails (a full disk) is one line, with nothing left behind; a FIFO where a
   checkpoint goes is refused without hanging; a finished run says there was nothing to train.
"""

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from faults import HANG_GUARD_S, mnist_folder, write_idx
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from course_utils import checkpoint, data, files, launch, parallelize, train
from course_utils.config import RunConfig

SMALL = dict(batch_size=16, steps=2, checkpoint_every=1)  # latest: step 2, previous: step 1
FSDP = dict(SMALL, parallel="fsdp", nproc=2, threads=1)


class Payload:
    """What an attacker's pickle does: runs code when it is loaded (here, writes ``marker``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def record(cfg: RunConfig) -> dict:
    return checkpoint.record(cfg.record(), *data.load("train", data_dir=cfg.data_dir))


def forged_pickle(state: dict, key: str, marker: Path) -> dict:
    """``state`` with a payload at ``key``, its checksum that of what the payload leaves (None)."""
    forged = {**state, key: None}
    forged["sha256"] = checkpoint.checksum(forged)
    forged[key] = Payload(marker)
    return forged


def rehash(folder: Path) -> None:
    """Recompute the course's SHA-256 values of a DCP folder after its files were changed."""
    meta = torch.load(folder / "course.pt", weights_only=True)
    meta["files"] = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.name != "course.pt"
    }
    meta["sha256"] = checkpoint.checksum(meta)
    torch.save(meta, folder / "course.pt")


def resave_with_payload(folder: Path, slot: tuple, marker: Path, tmp: Path) -> None:
    """Rewrite a DCP folder with DCP itself, a payload in place of the item at ``slot`` (it is
    then stored as pickled bytes), and the course's layout and checksums made to match."""
    dcp_to_torch_save(folder, tmp / "whole.pt")
    state = torch.load(tmp / "whole.pt", weights_only=True)
    holder = state
    for key in slot[:-1]:
        holder = holder[key]
    holder[slot[-1]] = Payload(marker)
    meta = torch.load(folder / "course.pt", weights_only=True)
    shutil.rmtree(folder)
    metadata = dcp.save(state, checkpoint_id=folder, no_dist=True)
    if "layout" in meta:
        from course_utils.checkpoint import sharded

        meta["layout"] = sharded.describe(metadata)
    torch.save(meta, folder / "course.pt")
    rehash(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-step checkpoint of each kind: ``pt`` (one file) and ``dcp`` (fsdp on 2 ranks)."""
    tmp = tmp_path_factory.mktemp("saved")
    train.run(RunConfig(**SMALL, checkpoint=str(tmp / "pt")), progress=False)
    train.run(RunConfig(**FSDP, checkpoint=str(tmp / "dcp")), progress=False)
    return tmp


def copy_of(saved: Path, kind: str, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(saved / kind, folder, symlinks=True)
    return folder


# --- 1. a checkpoint from someone else runs no code ------------------------------------------


def test_a_payload_in_latest_pt_runs_nothing_and_the_previous_resumes(saved, tmp_path):
    folder, marker = copy_of(saved, "pt", tmp_path), tmp_path / "marker"
    forged = forged_pickle(torch.load(folder / "latest.pt", weights_only=True), "losses", marker)
    torch.save(forged, folder / "latest.pt")
    cfg = RunConfig(**{**SMALL, "steps": 3}, checkpoint=str(folder))
    resumed, skipped = checkpoint.check(folder, record(cfg))
    assert resumed["step"] == 1 and "latest.pt is unreadable" in skipped[0]
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):  # a worker told to
        checkpoint.load(folder, ("latest.pt", forged["sha256"]))  # load it refuses it too
    assert not marker.exists()


PLANTED = {  # where in latest.dcp: the step the check then resumes from
    "course.pt": 1,  # refused: the previous one
    ".metadata": 2,  # never unpickled (the course's own layout stands in for it)
    "a shard's tensor": 1,
    "a bytes item": 1,
    "a tensor stored as bytes": 1,
}


def replace_item(folder: Path, fqn: str, raw: bytes) -> None:
    """Put ``raw`` where a DCP folder's item ``fqn`` lies in its shard file (the items after it
    moved along), with the course's layout and checksums made to match."""
    meta = torch.load(folder / "course.pt", weights_only=True)
    items = meta["layout"]["items"]
    item = next(i for i in items if i[0] == fqn)
    name, start, length = item[2:]
    blob = (folder / name).read_bytes()
    (folder / name).write_bytes(blob[:start] + raw + blob[start + length :])
    for other in items:
        if other[2] == name and other[3] > start:
            other[3] += len(raw) - length
    item[4] = len(raw)
    torch.save(meta, folder / "course.pt")
    rehash(folder)


@pytest.mark.parametrize("where", PLANTED)
def test_a_payload_anywhere_in_a_dcp_checkpoint_runs_nothing(saved, tmp_path, where):
    folder, marker = copy_of(saved, "dcp", tmp_path), tmp_path / "marker"
    latest = folder / "latest.dcp"
    if where == "course.pt":
        meta = torch.load(latest / "course.pt", weights_only=True)
        torch.save(forged_pickle(meta, "losses", marker), latest / "course.pt")
    elif where == ".metadata":
        (latest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        rehash(latest)
    elif where == "a shard's tensor":
        raw = io.BytesIO()
        torch.save(Payload(marker), raw)
        replace_item(latest, "model.conv1.weight", raw.getvalue())
    else:
        slot = ("optimizer", "param_groups", 0, "lr")
        slot = slot if where == "a bytes item" else ("model", "conv1.weight")
        resave_with_payload(latest, slot, marker, tmp_path)
    cfg = RunConfig(**{**FSDP, "steps": 3}, checkpoint=str(folder))
    resumed, skipped = checkpoint.check(folder, record(cfg))
    assert resumed["step"] == PLANTED[where]
    if PLANTED[where] == 1:  # set aside for what it holds, and a worker told to load it refuses
        assert "unreadable" in skipped[0] or "not plain data" in skipped[0], skipped
        with pytest.raises(checkpoint.CheckpointError, match="unreadable|not plain data"):
            checkpoint.load(folder, ("latest.dcp", "the SHA-256 a fooled check would pass"))
    assert not marker.exists()


def test_resuming_fsdp_from_a_planted_dcp_folder_runs_nothing_in_any_worker(saved, tmp_path):
    folder, marker = copy_of(saved, "dcp", tmp_path), tmp_path / "marker"
    latest = folder / "latest.dcp"
    resave_with_payload(latest, ("optimizer", "param_groups", 0, "lr"), marker, tmp_path)
    (latest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rehash(latest)
    result = train.run(RunConfig(**{**FSDP, "steps": 3}, checkpoint=str(folder)), False)
    assert result["resumed_from_step"] == 1  # the previous good one
    assert not marker.exists()


# --- 2. no predictable temporary names; only regular files replaced --------------------------


DEAD = 2**22 + 1  # above Linux's largest PID: a writer that is gone


def plant(folder: Path, victim: Path, old_names: list[str], folders: bool) -> dict[str, str]:
    """Symlinks to ``victim`` at ``old_names`` (the predictable temporary names), and what a
    writer leaves: a dead one's temporary file or folder (to be swept), a live one's (kept)."""
    folder.mkdir()
    for name in old_names:
        (folder / name).symlink_to(victim)
    kind = "dcp" if folders else "pt"
    left = {
        f".latest.{kind}.{DEAD}.a1b2.tmp": "swept",
        f".latest.{kind}.{os.getpid()}.c3d4.tmp": "kept",
    }
    for name in left:
        if folders:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(b"half written")
    (folder / f".latest.{kind}.{DEAD}.link.tmp").symlink_to(victim)  # a dead name, as a link
    return left


def test_symlinks_at_the_old_temporary_names_are_never_followed_and_live_writers_kept(tmp_path):
    folder, victim = tmp_path / "ckpt", tmp_path / "victim.txt"
    victim.write_text("the victim's own file")
    pids = range(max(os.getpid() - 50, 1), os.getpid() + 300)  # this process among them
    left = plant(folder, victim, [f".latest.pt.{pid}.tmp" for pid in pids], folders=False)
    train.run(RunConfig(steps=1, batch_size=16, checkpoint=str(folder)), progress=False)
    assert victim.read_text() == "the victim's own file"
    latest = folder / "latest.pt"
    assert latest.is_file() and not latest.is_symlink()
    for name, fate in left.items():
        assert (folder / name).exists() == (fate == "kept"), name


def test_fsdp_never_writes_through_a_symlink_at_its_old_temporary_name(tmp_path):
    folder, victim = tmp_path / "ckpt", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("the victim's own file")
    left = plant(folder, victim, [f".latest.dcp.step{s}.tmp" for s in (1, 2)], folders=True)
    train.run(RunConfig(**{**FSDP, "steps": 1}, checkpoint=str(folder)), progress=False)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]  # no shards written in there
    latest = folder / "latest.dcp"
    assert latest.is_dir() and not latest.is_symlink() and (latest / "course.pt").is_file()
    for name, fate in left.items():
        assert (folder / name).exists() == (fate == "kept"), name


def test_json_never_writes_through_a_symlink_at_its_old_temporary_name(tmp_path):
    out, victim = tmp_path / "out.json", tmp_path / "victim.txt"
    victim.write_text("the victim's own file")
    for pid in range(max(os.getpid() - 50, 1), os.getpid() + 300):
        tmp_path.joinpath(f"out.json.{pid}.tmp").symlink_to(victim)
    train.write_json(str(out), {"losses": [1.0]})
    assert victim.read_text() == "the victim's own file"
    assert out.is_file() and not out.is_symlink()


@pytest.mark.parametrize("target", ["symlink", "FIFO"])
def test_json_onto_a_symlink_or_a_fifo_is_refused_in_one_line(
    tmp_path, monkeypatch, capsys, target
):
    out, victim = tmp_path / "out.json", tmp_path / "victim.txt"
    victim.write_text("the victim's own file")

    def planted_during_the_run(*_args, **_kwargs):  # after every check before the run
        if target == "symlink":
            out.symlink_to(victim)
        else:
            os.mkfifo(out)
        return {"losses": [1.0], "samples_per_s": 5.0}

    monkeypatch.setattr(train, "run", planted_during_the_run)
    assert train.main(["--steps", "1", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--json {out} is a {target}" in err, err
    assert out.is_symlink() if target == "symlink" else not out.is_file()
    assert victim.read_text() == "the victim's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "victim.txt"]  # no .tmp


# --- 3. one run per folder, only what was checked, the same data, the same shapes ------------


def test_a_second_run_into_a_held_checkpoint_folder_is_refused_in_one_line(saved, tmp_path, capsys):
    folder = copy_of(saved, "pt", tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with files.locked(folder, "the checkpoint folder"):  # the first run, still running
        code = train.main(["--steps", "4", "--batch-size", "16", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"another run is using the checkpoint folder {folder}" in err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_checkpoint_swapped_after_the_check_is_refused_by_the_worker(
    tmp_path, monkeypatch, capsys
):
    folder, other = tmp_path / "ckpt", tmp_path / "other"
    train.run(RunConfig(**SMALL, checkpoint=str(folder)), progress=False)
    train.run(RunConfig(**SMALL, lr=0.02, checkpoint=str(other)), progress=False)
    real = train.train_worker

    def swapped_then_worker(*args, **kwargs):  # another run's checkpoint, after the check
        shutil.copy(other / "latest.pt", folder / "latest.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_worker", swapped_then_worker)
    code = train.main(["--steps", "4", "--batch-size", "16", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "changed after the run checked it" in err, err


def test_a_checkpoint_of_other_data_is_refused_naming_data_dir(tmp_path, capsys):
    first, other = mnist_folder(tmp_path / "first"), mnist_folder(tmp_path / "other")
    labels = data.read_idx(other / "train-labels-idx1-ubyte")
    write_idx(other / "train-labels-idx1-ubyte", ((labels + 1) % 10).astype(np.uint8))
    common = ["--batch-size", "4", "--checkpoint", str(tmp_path / "ckpt")]
    assert train.main(["--steps", "1", "--data-dir", str(first), *common]) == 0
    assert train.main(["--steps", "2", "--data-dir", str(other), *common]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("train: error: ") and "trained on other data" in err
    assert "--data-dir" in err
    assert train.main(["--steps", "2", "--data-dir", str(first), *common]) == 0  # its own: fine


def cut_conv1(state: dict) -> dict:
    """The checkpoint's first layer cut to one filter of one channel, its checksum recomputed."""
    state["model"]["conv1.weight"] = state["model"]["conv1.weight"][:1, :1].clone()
    state["sha256"] = checkpoint.checksum(state)
    return state


def test_a_wrongly_shaped_weight_is_refused_not_broadcast(saved, tmp_path, capsys):
    folder = copy_of(saved, "pt", tmp_path)
    for name in ("latest.pt", "previous.pt"):
        state = torch.load(folder / name, weights_only=True)
        torch.save(cut_conv1(state), folder / name)
    code = train.main(["--steps", "3", "--batch-size", "16", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "conv1.weight has shape [1, 1, 5, 5], the model's [32, 1, 5, 5]" in err
    part, _ = parallelize.role(RunConfig(), launch.worker("cpu"))  # a worker's own copy refuses
    with pytest.raises(checkpoint.CheckpointError, match="conv1.weight is \\[1, 1, 5, 5\\]"):
        checkpoint.load_into(part, state)


def load_into_fsdp(folder: str):
    cfg = RunConfig(parallel="fsdp", nproc=1)
    part, _ = parallelize.role(cfg, launch.worker("cpu"))
    state, _ = checkpoint.latest(folder)
    checkpoint.load_into(part, state)


def test_a_wrongly_shaped_sharded_weight_is_refused_by_the_check_and_by_dcp(saved, tmp_path):
    folder = copy_of(saved, "dcp", tmp_path)
    latest = folder / "latest.dcp"
    dcp_to_torch_save(latest, tmp_path / "whole.pt")
    state = torch.load(tmp_path / "whole.pt", weights_only=True)
    meta = torch.load(latest / "course.pt", weights_only=True)
    shutil.rmtree(latest)
    cut_conv1(state)
    from course_utils.checkpoint import sharded

    meta["layout"] = sharded.describe(dcp.save(state, checkpoint_id=latest, no_dist=True))
    torch.save(meta, latest / "course.pt")
    rehash(latest)
    cfg = RunConfig(**{**FSDP, "steps": 3}, checkpoint=str(folder))
    with pytest.raises(checkpoint.CheckpointError, match="conv1.weight has shape \\[1, 1, 5, 5\\]"):
        checkpoint.check(folder, record(cfg))
    with pytest.raises(launch.WorkerError) as info:  # and a worker's own load, in one line
        launch.run(load_into_fsdp, 1, str(folder), device="cpu", threads=1)
    assert info.value.kind == "CheckpointError" and "model.conv1.weight" in info.value.message


# --- 4. a save that fails, a FIFO, a finished run ---------------------------------------------


def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(
    saved, tmp_path, monkeypatch, capsys
):
    folder = copy_of(saved, "pt", tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "sha256" in obj:  # the checkpoint, not a tensor inside
            f.write(b"half a checkpoint")
            no_space()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    code = train.main(["--steps", "3", "--batch-size", "16", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .tmp, none moved


@pytest.mark.skipif(
    launch.runner.default_start_method() != "fork", reason="the failing writer is patched in"
)
def test_a_full_disk_under_fsdp_is_one_line_and_leaves_no_folder(
    saved, tmp_path, monkeypatch, capsys
):
    folder = copy_of(saved, "dcp", tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    from torch.distributed.checkpoint import filesystem

    monkeypatch.setattr(filesystem, "_write_item", no_space)  # in the forked workers too
    args = ["--parallel", "fsdp", "--nproc", "2", "--threads", "1", "--batch-size", "16"]
    code = train.main([*args, "--steps", "3", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before  # no stray temporary folder


def test_a_fifo_where_the_checkpoint_goes_is_refused_without_hanging(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.mkfifo(folder / "latest.pt")
    cfg = RunConfig(steps=2, batch_size=16, checkpoint=str(folder))
    outcome = []

    def check():
        try:
            checkpoint.check(folder, record(cfg))
        except checkpoint.CheckpointError as err:
            outcome.append(str(err))

    reader = threading.Thread(target=check, daemon=True)
    reader.start()
    reader.join(HANG_GUARD_S / 6)
    if reader.is_alive():  # a reader blocked in open(): let it go (a writer opens, closes)
        os.close(os.open(folder / "latest.pt", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("checking a FIFO at latest.pt hangs")
    assert outcome and "latest.pt is a FIFO, not a regular file" in outcome[0]
    assert train.main(["--steps", "2", "--batch-size", "16", "--checkpoint", str(folder)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_resuming_a_finished_run_says_nothing_was_left_to_train(saved, tmp_path, capsys):
    folder, out = copy_of(saved, "pt", tmp_path), tmp_path / "out.json"
    args = ["--steps", "2", "--batch-size", "16", "--checkpoint", str(folder), "--json", str(out)]
    assert train.main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "nothing left to train" in line and "samples/s" not in line, line
    result = json.loads(out.read_text())
    assert result["samples_per_s"] is None and len(result["losses"]) == 2
    assert result["resumed_from_step"] == 2
