"""Every figure of the course, one module per lesson group, all importable from here:
``cu.plots.curves(...)``, ``cu.plots.gantt(...)``. Each function takes ``ax=None`` (or draws its
own grid) and returns the figure; importing this package changes no global matplotlib state."""

from course_utils.plots.basics import *  # noqa: F403
from course_utils.plots.communication import *  # noqa: F403
from course_utils.plots.core import *  # noqa: F403
from course_utils.plots.core import _axes, _smooth  # noqa: F401
from course_utils.plots.data_parallel import *  # noqa: F403
from course_utils.plots.faq import *  # noqa: F403
from course_utils.plots.pipeline import *  # noqa: F403
