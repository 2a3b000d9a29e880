"""course_utils.debugging: the frames of a stack dump, from a dump written by hand and from a real
hang caught by the launcher's timeout."""

import time

import pytest
import torch
import torch.distributed as dist

import course_utils as cu
from course_utils import debugging

DUMP = """Thread 0x00007f0000000001 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f0000000002 (most recent call first):
  File "/venv/torch/distributed/distributed_c10d.py", line 3252 in all_reduce
  File "/tmp/ipykernel_1/123.py", line 17 in train
  File "/repo/course_utils/launch/worker.py", line 185 in child_main
  File "/usr/lib/python3.11/multiprocessing/process.py", line 108 in run
"""


def test_the_frames_of_a_dump_are_the_main_threads_down_to_the_workers_function():
    frames = debugging.frames(DUMP)
    assert [(f.function, f.line) for f in frames] == [("all_reduce", 3252), ("train", 17)]
    assert str(frames[1]) == "123.py, line 17, in train"
    no_mark = DUMP.replace("Current thread", "Thread")  # then the oldest thread: listed last
    assert [f.function for f in debugging.frames(no_mark)] == ["all_reduce", "train"]
    assert debugging.frames("") == []


def skip_the_collective():
    """Rank 0 all-reduces; rank 1 never does (it sleeps)."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(4))
    else:
        time.sleep(60)


def test_a_real_hang_shows_each_rank_where_it_waits():
    with pytest.raises(cu.launch.LaunchTimeout) as caught:
        cu.launch.run(skip_the_collective, 2, timeout=3, group_timeout=30, threads=1, device="cpu")
    where = {rank: debugging.frames(dump) for rank, dump in caught.value.stacks.items()}
    assert where[0][0].function == "all_reduce" and where[0][-1].function == "skip_the_collective"
    assert where[1][0].function == "skip_the_collective"  # in time.sleep, a C function: no frame
