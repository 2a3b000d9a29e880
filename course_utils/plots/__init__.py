"""Every figure of the course, one module per lesson group, all importable from here:
``cu.plots.curves(...)``, ``cu.plots.gantt(...)``. Each function takes ``ax=None`` (or draws its
own grid) and returns the figure; importing this package changes no global matplotlib state.

- :mod:`~course_utils.plots.core`: lessons 01-02 (curves, images, step times);
- :mod:`~course_utils.plots.measured`: measured points with their spread (min-max bars, noisy
  points marked): :func:`measurements`, which every panel uses, and :func:`throughput`;
- :mod:`~course_utils.plots.diagrams` and :mod:`~course_utils.plots.scaling_laws`: lesson 03;
- :mod:`~course_utils.plots.communication`: lesson 04; :mod:`~course_utils.plots.data_parallel`:
  lesson 05; :mod:`~course_utils.plots.pipeline`: lessons 06-07;
- :mod:`~course_utils.plots.sharding`: lesson 08 (memory per rank under ZeRO, traffic by stage);
- :mod:`~course_utils.plots.tensor_parallel`: lesson 09 (Megatron's split, a device mesh, the
  measured tensor-parallel speedup and communication share);
- :mod:`~course_utils.plots.long_context`: lesson 10 (attention's memory, the ring's timeline,
  the ranks' balance, the bytes of ring and Ulysses, the experts' load, a cluster's layout);
- :mod:`~course_utils.plots.profiling`: lesson 11 (timelines and memory from traces).
- :mod:`~course_utils.plots.challenges`: lessons 12-13 (the cost model against measurements, the
  decision guide, attribution maps);
- :mod:`~course_utils.plots.many_machines`: lesson 14 (the one-machine cluster, step times at
  each link rate, the bytes on a link over time, an elastic job's timeline).
"""

from course_utils.plots.challenges import *  # noqa: F403
from course_utils.plots.communication import *  # noqa: F403
from course_utils.plots.core import *  # noqa: F403
from course_utils.plots.data_parallel import *  # noqa: F403
from course_utils.plots.diagrams import *  # noqa: F403
from course_utils.plots.long_context import *  # noqa: F403
from course_utils.plots.many_machines import *  # noqa: F403
from course_utils.plots.measured import *  # noqa: F403
from course_utils.plots.pipeline import *  # noqa: F403
from course_utils.plots.profiling import *  # noqa: F403
from course_utils.plots.scaling_laws import *  # noqa: F403
from course_utils.plots.sharding import *  # noqa: F403
from course_utils.plots.slow_link import *  # noqa: F403
from course_utils.plots.tensor_parallel import *  # noqa: F403
