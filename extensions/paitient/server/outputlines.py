"""What a client's JupyterLab shows of each output area's stream line, followed from message to message.

A stream's message goes on from where the area's last one left its cursor, so the gate reads each message
with the line it continues (:func:`paitient.rules.shown.follow_stream`). :class:`OutputLines` keeps those
lines for one websocket connection: per output area (a cell's, by its request's ``msg_id``, or an Output
widget's), and which widget captures which cell's output.

A connection knows an area's line only from the messages it sent there itself. Where it does not, the
browser may still show one that the next message goes on from:

- an area the connection did not start: JupyterLab's "Reconnect to Kernel" (or a dropped network
  connection) opens a new websocket, and a running cell, or an Output widget made before, goes on with the
  line it shows;
- an area whose line was let go of: at most :data:`MAX_STREAMS` lines and captures are kept, and a kernel
  that makes more lets go of the ones it used longest ago (a capture let go of leaves the captured cell's
  area unknown too: JupyterLab goes on showing its output in the widget).

So a stream message to an area whose line is unknown goes to the browser after a line feed
(:meth:`OutputLines.unknown`): in JupyterLab a backspace or a carriage return does not cross a line's end,
so the browser's line starts there, where the gate's does. Nothing is withheld for it; the output shows
one line break more.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from paitient.rules.shown import StreamLine, follow_stream

NEW_OUTPUTS = frozenset({"display_data", "execute_result", "error", "input_request", "withheld"})
"""What starts a new output in a cell's output area, after which a stream's message starts one too."""
MAX_STREAMS = 1024
"""Output areas whose stream's last line a connection keeps, and Output widgets whose capture it follows
(the one longest without output first): a kernel that makes more has the ones it used longest ago let go."""
MAX_FRESH = 65_536
"""Areas a connection knows to show no stream line (it started them, or another output followed), the
latest kept (their keys only); one let go of is unknown again, and costs a line break at most."""


def cell_area(msg_id: str) -> str:
    """A cell's output area: where JupyterLab shows the output of its request ``msg_id``."""
    return f"cell {msg_id}"


def widget_area(comm_id: str) -> str:
    """An Output widget's own output area: one for the widget, whichever cell it captures."""
    return f"widget {comm_id}"


class OutputLines:
    """One connection's view of its kernel's output areas, as far as the gate follows it."""

    def __init__(self) -> None:
        self.streams: OrderedDict[str, StreamLine] = OrderedDict()
        """Per output area: the last line its stream output shows, which the next message of that stream
        goes on from."""
        self.fresh: OrderedDict[str, None] = OrderedDict()
        """Areas known to show no stream line: started on this connection, or another output came last."""
        self.captures: OrderedDict[str, str] = OrderedDict()
        """Output widgets (comm id) capturing a cell's output (its request's msg_id): JupyterLab shows what
        that cell sends meanwhile in the widget, not in the cell."""

    def area(self, parent_id: str) -> str:
        """The output area JupyterLab shows a message of the cell ``parent_id`` in: that of the Output widget
        that captures it last, or the cell's own."""
        widgets = [comm for comm, captured in self.captures.items() if captured == parent_id]
        return widget_area(widgets[-1]) if widgets else cell_area(parent_id)

    def requested(self, msg_id: str) -> None:
        """The client sent a request ``msg_id`` (one the kernel had not had): its output area shows nothing
        yet."""
        self.started(cell_area(msg_id))

    def started(self, area: str) -> None:
        """A new output area (a request's, a widget the kernel opened): nothing is shown there yet."""
        if area not in self.streams:
            self._fresh(area)

    def unknown(self, area: str) -> bool:
        """Whether the browser may show a line in ``area`` that this connection did not follow."""
        return area not in self.streams and area not in self.fresh

    def shown(self, area: str, msg_type: str, content: dict[str, Any]) -> tuple[str, StreamLine | None]:
        """For a stream message the browser would get: what it makes the area's stream output show around
        what it changed (empty where that is its own text), and the output's last line after it. None for
        any other message: an output of another kind starts a new one in JupyterLab."""
        name, text = content.get("name"), content.get("text")
        if msg_type != "stream" or not isinstance(name, str) or not isinstance(text, str):
            return "", None
        return follow_stream(self.streams.get(area), name, text)

    def note_output(self, area: str, sent_type: str, line: StreamLine | None) -> None:
        """Keep the output area's stream line after a stream message it got; forget it after an output that
        starts a new one in JupyterLab (a display, a result, an error, a notice of what was withheld); other
        messages (replies, comms) change nothing of what the area shows."""
        if line is not None and sent_type == "stream":
            self._keep(area, line)
        elif sent_type in NEW_OUTPUTS:
            self.cleared(area)

    def cleared(self, area: str) -> None:
        """The area shows no stream line now (cleared, or another output started)."""
        self.streams.pop(area, None)
        self._fresh(area)

    def note_widget(self, msg_type: str, content: dict[str, Any]) -> None:
        """After an Output widget's state reached the browser: which cell's output it captures (the kernel
        sets its ``msg_id`` for ``with out:`` and clears it after; JupyterLab notices a change only, so one
        sent again unchanged keeps its place), and what its own output area shows when the kernel sets its
        ``outputs`` (JupyterLab rebuilds the area from them, and a captured stream goes on at their end)."""
        comm_id = content.get("comm_id")
        if not isinstance(comm_id, str) or msg_type not in ("comm_open", "comm_msg", "comm_close"):
            return
        if msg_type == "comm_close":
            self.captures.pop(comm_id, None)
            self.cleared(widget_area(comm_id))
            return
        if msg_type == "comm_open":
            self.started(widget_area(comm_id))
        data = content.get("data")
        state = data.get("state") if isinstance(data, dict) else None
        if not isinstance(state, dict):
            return
        if "msg_id" in state and self.captures.get(comm_id) != state["msg_id"]:
            self.captures.pop(comm_id, None)
            if isinstance(state["msg_id"], str) and state["msg_id"]:
                self.captures[comm_id] = state["msg_id"]
                while len(self.captures) > MAX_STREAMS:
                    # JupyterLab goes on showing that cell's output in the widget: the gate no longer
                    # knows the line it goes on from
                    self._let_go(cell_area(self.captures.popitem(last=False)[1]))
        outputs = state.get("outputs")
        if isinstance(outputs, list):
            area, last = widget_area(comm_id), outputs[-1] if outputs else None
            self.cleared(area)
            if isinstance(last, dict) and last.get("output_type") == "stream":
                _, line = self.shown(area, "stream", last)
                if line is not None:
                    self._keep(area, line)

    def _keep(self, area: str, line: StreamLine) -> None:
        self.streams.pop(area, None)
        self.fresh.pop(area, None)
        self.streams[area] = line
        while len(self.streams) > MAX_STREAMS:  # the areas longest without output first
            self.streams.popitem(last=False)

    def _fresh(self, area: str) -> None:
        self.fresh.pop(area, None)
        self.fresh[area] = None
        while len(self.fresh) > MAX_FRESH:
            self.fresh.popitem(last=False)

    def _let_go(self, area: str) -> None:
        self.streams.pop(area, None)
        self.fresh.pop(area, None)
