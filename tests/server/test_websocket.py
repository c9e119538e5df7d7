"""What the audit record of an execute_request holds of its ``user_expressions`` (the pure part)."""

from paitient.server.websocket import audited_expressions


def test_each_expression_is_recorded_by_its_name():
    assert audited_expressions({"a": "1 + 1", "b": "open('x').read()"}, 1000) == (
        {"a": "1 + 1", "b": "open('x').read()"},
        False,
    )
    assert audited_expressions({}, 1000) == ({}, False)
    assert audited_expressions(None, 1000) == ({}, False)


def test_what_is_not_text_is_recorded_as_its_repr():
    assert audited_expressions({"a": 3}, 100) == ({"a": "3"}, False)
    assert audited_expressions(["x"], 100) == ({"(not a mapping)": "['x']"}, False)


def test_expressions_share_the_room_left_by_the_code_and_a_cut_is_flagged():
    recorded, cut = audited_expressions({"a": "x" * 60, "b": "y" * 60}, 100)
    assert cut and recorded["a"] == "x" * 60 and recorded["b"] == "y" * 38
    recorded, cut = audited_expressions({f"k{i}": "" for i in range(1000)}, 50)
    assert cut and sum(len(k) for k in recorded) <= 52
