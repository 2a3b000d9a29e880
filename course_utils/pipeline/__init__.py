"""Pipeline parallelism (lessons 06 and 07): each worker holds some consecutive layers (a *stage*), and
microbatches flow through the stages, forward then backward. One module per idea:

- :mod:`~course_utils.pipeline.schedules`: GPipe and 1F1B on paper, simulated timelines, the bubble
  (pure Python); :mod:`~course_utils.pipeline.zero_bubble`: the zero-bubble family (ZB-H1, ZB-V,
  DualPipeV) with backward split into the inputs' and the weights' gradients;
- :mod:`~course_utils.pipeline.stages`: cutting the CNN and the RNN into stages, balancing them;
- :mod:`~course_utils.pipeline.hand`: the hand-written engine (``dist.send``/``dist.recv``);
- :mod:`~course_utils.pipeline.torch_engine`: ``torch.distributed.pipelining``'s engine;
- :mod:`~course_utils.pipeline.worker`: a rank at work: its :class:`Pipeline`, a measured run
  (:func:`profile`) and its part in ``--parallel pipeline`` (:func:`role`);
- :mod:`~course_utils.pipeline.sweeps`: the measured experiments of lessons 06 and 07 (runs on
  CPU workers, sweeps in turns with their baselines, what a recorded timeline says).
"""

from course_utils.pipeline import hand, schedules, stages, sweeps, torch_engine, worker, zero_bubble

__all__ = ["hand", "schedules", "stages", "sweeps", "torch_engine", "worker", "zero_bubble"]
