"""The one base of every lesson panel: controls, a Run button, a status line and an output area.

A panel is thin. It reads its controls, asks :meth:`Panel.check` whether the setting can run,
calls :meth:`Panel.compute` (a measurement a lesson has already taught, from the strategy
modules) and draws every result so far with :meth:`Panel.draw` (a figure from
:mod:`course_utils.plots`). Results are cached per setting, so a repeat is instant. Tests drive a
panel without a browser: set ``panel.controls[...].value``, call ``panel.run_button.click()``,
read ``panel.results``, ``panel.status.value`` and ``panel.last_error``.
"""

from __future__ import annotations

import html
import traceback
from typing import Any

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display


class Panel:
    """Controls + a Run button + a status line + an output area; results cached per setting.

    Subclasses pass ``controls`` (name → widget; the names are the keyword arguments of
    ``compute``) and implement ``compute(**settings) -> dict`` and ``draw(results) -> Figure``;
    optionally ``check(**settings)``, which returns the one line that says why a setting can't
    run (shown in the status line, with no traceback), or None. ``on_change``: what moving a
    control does at once: ``None`` (wait for Run), ``"run"`` (run it: cheap panels) or
    ``"redraw"`` (redraw, e.g. a simulation, and leave measuring to Run)."""

    button_label = "Run"
    on_change: str | None = None

    def __init__(self, controls: dict[str, widgets.ValueWidget], title: str = ""):
        self.controls = controls
        self.title = title
        for control in controls.values():  # long descriptions ("microbatches") stay readable
            control.style.description_width = "initial"
        self.results: list[dict] = []  # one dict per distinct setting, in the order measured
        self.cache: dict[tuple, dict] = {}  # setting → its result, so a repeat click is instant
        self.last_error: str | None = None  # why the last run failed (a traceback, or one line)
        self._live: dict | None = None  # the setting being measured (for progress())
        self.figure = None  # the last figure drawn
        self.run_button = widgets.Button(description=self.button_label, button_style="primary")
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self.run_button.on_click(self._on_click)
        header = [widgets.HTML(f"<b>{html.escape(title, quote=False)}</b>")] if title else []
        self.widget = widgets.VBox(
            [*header, *controls.values(), widgets.HBox([self.run_button, self.status]), self.output]
        )
        if self.on_change:
            for control in controls.values():
                control.observe(self._on_control, names="value")

    def settings(self) -> dict[str, Any]:
        """The controls' current values, by name."""
        return {name: control.value for name, control in self.controls.items()}

    @staticmethod
    def key(settings: dict[str, Any]) -> tuple:
        """The cache key of a setting."""
        return tuple(sorted(settings.items()))

    def current(self) -> dict | None:
        """The result for the controls' current values, if it has been computed."""
        return self.cache.get(self.key(self.settings()))

    def check(self, **settings) -> str | None:
        return None

    def compute(self, **settings) -> dict:
        raise NotImplementedError

    def draw(self, results: list[dict]):
        raise NotImplementedError

    def run(self) -> dict:
        """Measure the current setting (or take it from the cache), record it and redraw.
        Raises :class:`Refused` when :meth:`check` refuses the setting."""
        settings = self.settings()
        refusal = self.check(**settings)
        if refusal:
            raise Refused(refusal)
        key = self.key(settings)
        cached = key in self.cache and not self.cache[key].get("partial")
        if not cached:
            self._live = settings
            try:
                self._record(key, {**settings, **self.compute(**settings)})
            except BaseException:
                self._forget(key)  # no half-measured point survives a failure
                raise
            finally:
                self._live = None
        self.status.value = "cached" if cached else "measured"
        self.redraw()
        return self.cache[key]

    def progress(self, partial: dict, message: str) -> None:
        """From inside :meth:`compute`: show what is measured so far (a provisional point, e.g.
        after the first of several repeats) and say what is still running."""
        if getattr(self, "_live", None) is None:
            return  # compute() called directly (a test): nothing to show
        key = self.key(self._live)
        self._record(key, {**self._live, **partial, "partial": True})
        self.status.value = message
        self.redraw()

    def _record(self, key: tuple, point: dict) -> None:
        self._forget(key)
        self.cache[key] = point
        self.results.append(point)

    def _forget(self, key: tuple) -> None:
        old = self.cache.pop(key, None)
        if old is not None:
            self.results.remove(old)

    def redraw(self) -> None:
        """Draw every result so far into the output area (the figure is shown once, there)."""
        if self.figure is not None:
            plt.close(self.figure)
        self.figure = self.draw(self.results)
        self.output.clear_output(wait=True)
        with self.output:
            display(self.figure)
        plt.close(self.figure)  # not shown again by the notebook's inline backend

    def show_error(self, error: Exception) -> None:
        """An error in the status line; a traceback below it unless the setting was refused.
        (An exception in a widget callback would otherwise only reach the kernel's log.)"""
        if isinstance(error, Refused):
            self.last_error, prefix = str(error), "can't run this setting"
        else:
            self.last_error, prefix = traceback.format_exc(), "error"
            with self.output:
                print(self.last_error)
        message = html.escape(f"{prefix}: {error}", quote=False)
        self.status.value = f"<span style='color:red'>{message}</span>"

    def _on_click(self, _button=None) -> None:
        self.run_button.disabled = True
        self.status.value = "running..."  # at once: a run takes seconds
        try:
            self.run()
            self.last_error = None
        except Exception as error:
            self.show_error(error)
        finally:
            self.run_button.disabled = False

    def _on_control(self, _change=None) -> None:
        if self.on_change == "run":
            self._on_click()
            return
        try:
            refusal = self.check(**self.settings())
            self.redraw()
            if self.current() and not self.current().get("partial"):
                self.status.value = "cached"
            elif refusal:
                self.status.value = f"can't run this setting: {html.escape(refusal, quote=False)}"
            else:
                self.status.value = "press Run to measure"
            self.last_error = None
        except Exception as error:
            self.show_error(error)

    def _ipython_display_(self) -> None:
        display(self.widget)


class Refused(ValueError):
    """A setting the panel can't run (e.g. a batch that does not divide): one line, no traceback."""
