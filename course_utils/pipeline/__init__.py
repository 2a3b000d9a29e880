"""Pipeline parallelism (lessons 06 and 07): each worker holds some consecutive layers (a *stage*), and
microbatches flow through the stages, forward then backward.

The room's face, what :mod:`course_utils.parallelize` calls (the same as every strategy's):
:func:`role` (``role(cfg, me) -> (loop.Role, whole_model)``) and :func:`config_error`, both in
:mod:`~course_utils.pipeline.strategy`. Behind it, one module per idea:

- :mod:`~course_utils.pipeline.schedules`: GPipe and 1F1B on paper, simulated timelines, the bubble
  (pure Python); :mod:`~course_utils.pipeline.zero_bubble`: the zero-bubble family (ZB-H1, ZB-V,
  DualPipeV) with backward split into the inputs' and the weights' gradients;
- :mod:`~course_utils.pipeline.stages`: cutting the CNN and the RNN into stages, balancing them;
- :mod:`~course_utils.pipeline.hand`: the hand-written engine (``dist.send``/``dist.recv``);
- :mod:`~course_utils.pipeline.torch_engine`: ``torch.distributed.pipelining``'s engine;
- :mod:`~course_utils.pipeline.engine`: a rank's stages and their engine
  (:class:`~course_utils.pipeline.engine.Pipeline`), and the plan of stages measured before the
  first step;
- :mod:`~course_utils.pipeline.strategy`: ``--parallel pipeline``, :func:`config_error` and
  :func:`role`;
- :mod:`~course_utils.pipeline.measured`: one measured run on workers
  (:func:`~course_utils.pipeline.measured.profile`) and its one-process baseline;
- :mod:`~course_utils.pipeline.sweeps`: the measured experiments of lessons 06 and 07 (runs on
  CPU workers, sweeps in turns with their baselines, what a recorded timeline says).
"""

from course_utils.pipeline import (
    engine,
    hand,
    measured,
    schedules,
    stages,
    strategy,
    sweeps,
    torch_engine,
    zero_bubble,
)
from course_utils.pipeline.strategy import config_error, role

__all__ = [
    "config_error",
    "engine",
    "hand",
    "measured",
    "role",
    "schedules",
    "stages",
    "strategy",
    "sweeps",
    "torch_engine",
    "zero_bubble",
]
