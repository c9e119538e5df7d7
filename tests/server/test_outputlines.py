"""What a connection knows of the lines its client's JupyterLab shows (:mod:`paitient.server.outputlines`)."""

from paitient.server import outputlines
from paitient.server.outputlines import OutputLines, cell_area, widget_area


def _print(lines: OutputLines, area: str, text: str, name: str = "stdout") -> str:
    """A stream message to ``area`` as the connection follows it; what it makes the area show around it."""
    shown, line = lines.shown(area, "stream", {"name": name, "text": text})
    lines.note_output(area, "stream", line)
    return shown


def test_an_area_is_known_once_the_client_asked_for_it_or_the_kernel_opened_it():
    lines = OutputLines()
    cell = lines.area("m1")
    assert cell == cell_area("m1") and lines.unknown(cell) and lines.unknown(widget_area("w"))
    lines.requested("m1")
    lines.note_widget("comm_open", {"comm_id": "w", "data": {"state": {}}})
    assert not lines.unknown(cell) and not lines.unknown(widget_area("w"))
    assert _print(lines, cell, "ro") == ""  # its own text, on a line of its own
    assert _print(lines, cell, "\bw:7,1.5\n") == "rw:7,1.5\n"  # read with the line it goes on from


def test_a_request_cannot_name_a_widgets_area():
    lines = OutputLines()
    lines.requested("widget w")
    assert lines.unknown(widget_area("w"))


def test_the_line_let_go_of_longest_ago_is_unknown_and_the_rest_are_followed():
    lines = OutputLines()
    for n in range(outputlines.MAX_STREAMS + 1):
        lines.started(f"cell-{n}")
        _print(lines, f"cell-{n}", f"x{n}")
    assert len(lines.streams) == outputlines.MAX_STREAMS
    assert lines.unknown("cell-0")
    assert not lines.unknown("cell-1") and _print(lines, "cell-1", "\b9") == "x9"


def test_lines_a_kernel_sets_as_widget_outputs_are_bounded_too():
    lines = OutputLines()
    for n in range(outputlines.MAX_STREAMS + 10):
        state = {"outputs": [{"output_type": "stream", "name": "stdout", "text": f"x{n}"}]}
        lines.note_widget("comm_open", {"comm_id": f"w{n}", "data": {"state": state}})
    assert len(lines.streams) == outputlines.MAX_STREAMS
    assert lines.unknown(widget_area("w0")) and not lines.unknown(widget_area("w20"))
    assert lines.streams[widget_area("w20")].head == "x20"


def test_a_capture_let_go_of_leaves_the_captured_cells_area_unknown():
    """JupyterLab goes on showing the cell's output in the widget; the gate no longer knows that."""
    lines = OutputLines()
    lines.requested("m0")
    lines.note_widget("comm_msg", {"comm_id": "w0", "data": {"state": {"msg_id": "m0"}}})
    assert lines.area("m0") == widget_area("w0")
    for n in range(1, outputlines.MAX_STREAMS + 1):
        lines.requested(f"m{n}")
        lines.note_widget("comm_msg", {"comm_id": f"w{n}", "data": {"state": {"msg_id": f"m{n}"}}})
    assert lines.area("m0") == cell_area("m0") and lines.unknown(cell_area("m0"))
    assert lines.area("m1") == widget_area("w1") and not lines.unknown(cell_area("m1"))


def test_another_output_or_a_clear_makes_an_unknown_area_known_again():
    lines = OutputLines()
    lines.note_output("cell-0", "display_data", None)
    lines.cleared("cell-1")
    assert not lines.unknown("cell-0") and not lines.unknown("cell-1")
    lines.note_output("cell-2", "dropped", None)  # nothing reached the browser: it shows what it showed
    assert lines.unknown("cell-2")


def test_the_areas_known_to_be_empty_are_bounded():
    lines = OutputLines()
    for n in range(outputlines.MAX_FRESH + 5):
        lines.started(f"request-{n}")
    assert len(lines.fresh) == outputlines.MAX_FRESH
    assert lines.unknown("request-0") and not lines.unknown(f"request-{outputlines.MAX_FRESH + 4}")
