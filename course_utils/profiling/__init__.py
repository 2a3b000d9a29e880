"""Seeing inside a parallel run: ``torch.profiler`` traces, one per rank, and what they say
(``--profile DIR``, lesson 11).

Every training step of the course is labelled with ``record_function`` ("forward", "backward",
"optimizer"; a pipeline's steps per microbatch), so a trace shows the phases of each rank. The
collectives show up by themselves: gloo runs them on its own threads as ``gloo:all_reduce``,
``gloo:broadcast`` ... events (NCCL as ``nccl...`` kernels on the GPU). From a trace,
:func:`summary` measures per step:

- **compute**: the time inside forward, backward and the optimizer on the rank's main thread;
- **communication**: the time some collective was running (the union of their intervals);
- **overlap**: the share of the communication inside the backward span (DDP's buckets start
  all-reducing before backward ends: lesson 05). Under DDP that span also holds the wait for the
  last bucket, so **hidden** is the stricter measure: the share that ran while autograd was
  computing gradients (its ``evaluate_function`` spans, less ``AccumulateGrad``), hidden rather
  than added to the step.

Two modules, one per half:

- :mod:`~course_utils.profiling.recorder`: recording. :class:`Recorder` profiles a few steps
  after a warm-up and writes ``DIR/trace_rank<r>.json`` (:func:`trace_path`; Chrome / Perfetto
  format: open it at https://ui.perfetto.dev or in chrome://tracing), memory events included;
  :func:`label` names a span of your own;
- :mod:`~course_utils.profiling.trace`: reading. Every function that interprets a trace: its
  events, what counts as a phase, a collective and backward's arithmetic, the summary and its
  pieces, one profiled step, its collectives and when each rank reached them, its memory by
  phase, every rank's trace in one file, and their tables.

A hang leaves stacks, not a trace: :mod:`course_utils.debugging`. The lesson's overlap experiment
is :mod:`course_utils.overlap`.
"""

from course_utils.profiling import trace
from course_utils.profiling.recorder import Recorder, label, trace_path
from course_utils.profiling.trace import *  # noqa: F403  (every reader, by its own name)

__all__ = ["Recorder", "label", "trace_path", "trace", *trace.__all__]
