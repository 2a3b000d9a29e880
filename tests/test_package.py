"""The package outside the repository: a wheel carries the data and every subpackage, and the
course trains from it in another folder."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_the_wheel_carries_the_data_and_trains_from_another_folder(tmp_path):
    dist_dir, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist_dir), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist_dir.glob("course_utils-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "course_utils/datasets/mnist_5k.npz",
        "course_utils/launch/runner.py",
        "course_utils/pipeline/engine.py",
        "course_utils/plots/core.py",
        "course_utils/widgets/base.py",
    ):
        assert needed in names, needed
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's copy comes first
    for name in ("COURSE_DATA_DIR", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    where = subprocess.run(
        [sys.executable, "-c", "import course_utils; print(course_utils.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    args = ["--parallel", "ddp", "--nproc", "2", "--steps", "3", "--eval", "--json", "out.json"]
    proc = subprocess.run(
        [sys.executable, "-m", "course_utils.train", *args],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((elsewhere / "out.json").read_text())
    assert len(result["losses"]) == 3 and result["nproc"] == 2 and "test_accuracy" in result
    # Then a lesson as Colab (or a learner without the repository) runs it: a copy of the notebook
    # in another folder, the course from the wheel (`make notebooks-spawn` covers spawned workers)
    for name in ("04_communication.ipynb",):
        shutil.copy(ROOT / "notebooks" / name, elsewhere / name)
        lesson = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", name],
            cwd=elsewhere,
            env={**env, "COURSE_FAST": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert lesson.returncode == 0, (lesson.stdout + lesson.stderr)[-3000:]
