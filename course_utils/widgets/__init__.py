"""Interactive panels for the lessons, one module per panel over the small
:class:`~course_utils.widgets.base.Panel` base: a few controls, a Run button, a status line and
an output area, wired to a measurement from the strategy modules and a figure from
:mod:`course_utils.plots`."""

from course_utils.widgets.base import Panel, Refused
from course_utils.widgets.pipeline import PipelinePanel
from course_utils.widgets.scaling_laws import ScalingLawsPanel
from course_utils.widgets.speedup import SpeedupPanel
from course_utils.widgets.throughput import ThroughputPanel

__all__ = [
    "Panel",
    "PipelinePanel",
    "Refused",
    "ScalingLawsPanel",
    "SpeedupPanel",
    "ThroughputPanel",
]
