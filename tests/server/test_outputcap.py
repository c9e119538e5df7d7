"""The output cap as plain logic: per message, per execution, forged parents, protocol messages, and the
headers a kernel's messages go on with."""

from paitient.rules.outputcap import KERNEL_INFO, TRACKED_REQUESTS, OutputCap, Verdict, message_type, replacement


def cap() -> OutputCap:
    c = OutputCap(message_bytes=1000, execution_bytes=3000)
    c.note_execute("e1")
    return c


def test_small_messages_pass_until_the_execution_budget_is_spent():
    c = cap()
    assert [c.charge("stream", "e1", 900) for _ in range(3)] == [Verdict.FORWARD] * 3
    assert c.charge("stream", "e1", 900) is Verdict.NOTICE
    assert c.charge("stream", "e1", 10) is Verdict.DROP
    assert c.charge("display_data", "e1", 10) is Verdict.DROP


def test_protocol_messages_are_stripped_not_dropped_after_the_budget():
    c = cap()
    c.charge("stream", "e1", 3500)  # cut: counts as about half a message
    for _ in range(5):
        c.charge("stream", "e1", 900)
    assert c.charge("status", "e1", 50) is Verdict.STRIP
    assert c.charge("execute_reply", "e1", 50) is Verdict.STRIP


def test_an_oversized_message_is_cut_and_charged_at_its_cut_size():
    c = cap()
    assert c.charge("stream", "e1", 10_000_000) is Verdict.CUT
    assert c.executions["e1"] < 3000


def test_forged_parent_ids_are_charged_to_the_latest_real_execution():
    c = cap()
    verdicts = [c.charge("stream", f"forged-{i}", 900) for i in range(5)]
    assert verdicts == [Verdict.FORWARD] * 3 + [Verdict.NOTICE, Verdict.DROP]
    assert set(c.executions) == {"e1"}


def test_a_new_execute_request_opens_a_new_budget():
    c = cap()
    for _ in range(4):
        c.charge("stream", "e1", 900)
    c.note_execute("e2")
    assert c.charge("stream", "e2", 900) is Verdict.FORWARD
    assert c.charge("stream", "e1", 10) is Verdict.DROP  # e1 stays spent


def test_tracked_executions_are_bounded():
    c = cap()
    for i in range(1000):
        c.note_execute(f"x{i}")
    assert len(c.executions) == 256


def test_cut_stream_keeps_its_head_and_says_why():
    c = cap()
    kind, content = replacement(Verdict.CUT, "stream", {"name": "stdout", "text": "a" * 5000}, c)
    assert kind == "stream" and content["text"].startswith("a" * 500)
    assert content["text"].split("\n")[0] == "a" * 500 and "exceeded 1,000 bytes" in content["text"]


def test_cut_rich_output_becomes_a_plain_notice():
    c = cap()
    kind, content = replacement(
        Verdict.CUT,
        "execute_result",
        {"data": {"text/html": "x" * 5000}, "metadata": {"a": 1}, "execution_count": 3},
        c,
    )
    assert kind == "execute_result" and set(content["data"]) == {"text/plain"}
    assert content["execution_count"] == 3 and content["metadata"] == {}


def test_execution_notice_is_a_stderr_stream():
    kind, content = replacement(Verdict.NOTICE, "display_data", {"data": {}}, cap())
    assert kind == "stream" and content["name"] == "stderr" and "exceeded 3,000 bytes" in content["text"]


def test_stripped_messages_keep_only_protocol_fields():
    c = cap()
    assert replacement(Verdict.STRIP, "status", {"execution_state": "idle", "loot": "x" * 100}, c) == (
        "status",
        {"execution_state": "idle"},
    )
    kind, content = replacement(
        Verdict.STRIP, "execute_reply", {"status": "ok", "execution_count": 2, "payload": [{"text": "x" * 100}]}, c
    )
    assert content == {"status": "ok"}  # an execution count is a number the kernel chose
    _, forged = replacement(Verdict.STRIP, "status", {"execution_state": "x" * 100}, c)
    assert forged == {"execution_state": "idle"}
    _, info = replacement(Verdict.STRIP, "kernel_info_reply", {"status": "ok", "language_info": {"x": "y" * 99}}, c)
    assert info == KERNEL_INFO and info["language_info"]["name"] == "python"


def test_over_the_budget_replies_are_stripped_and_everything_else_dropped():
    c = cap()
    c.charge("stream", "e1", 3500)
    for _ in range(5):
        c.charge("stream", "e1", 900)
    assert c.charge("comm_close", "e1", 50) is Verdict.DROP  # its comm id is the kernel's
    assert c.charge("comm_msg", "e1", 50) is Verdict.DROP
    assert c.charge("x_reply", "e1", 50) is Verdict.STRIP


def test_a_reply_goes_on_once_and_only_to_a_request_a_client_sent():
    c = cap()
    c.note_request({"msg_id": "m1", "msg_type": "execute_request"})
    assert not c.first_reply("m1", "x_reply") and not c.first_reply("m1", "kernel_info_reply")
    assert c.first_reply("m1", "execute_reply") and not c.first_reply("m1", "execute_reply")
    assert not c.first_reply("never-asked", "execute_reply") and not c.first_reply("", "execute_reply")
    for i in range(TRACKED_REQUESTS):
        c.note_request({"msg_id": f"n{i}"})
    assert "m1" not in c.answered  # forgotten with its request


def test_cut_reply_becomes_an_error_reply():
    _, content = replacement(Verdict.CUT, "inspect_reply", {"status": "ok", "data": {"text/plain": "x" * 9000}}, cap())
    assert content["status"] == "error" and "data" not in content


def test_the_parent_of_a_kernel_message_is_the_clients_own_request_header_and_nothing_the_kernel_added():
    c = cap()
    request = {"msg_id": "m1", "msg_type": "execute_request", "session": "s", "username": "u", "date": "d",
               "version": "5.3", "extra": "from the client, not kept", "date2": 1}  # fmt: skip
    c.note_request(request)
    forged = {**request, "stash": "row:1,2\n" * 100, "session": "row:1,2"}
    assert c.parent(forged) == {k: request[k] for k in ("msg_id", "msg_type", "session", "username", "date", "version")}
    # a request no client sent, or a parent that is not a mapping: no parent at all
    assert c.parent({"msg_id": "row:1,2"}) == {}
    assert c.parent("row:1,2") == {} and c.parent({"msg_id": 7}) == {}
    # a client's over-long field is not kept, and a header without a message id is not noted
    c.note_request({"msg_id": "m2", "session": "x" * 257})
    assert c.parent({"msg_id": "m2"}) == {"msg_id": "m2"}
    c.note_request({"session": "s"})
    c.note_request("not a header")
    assert list(c.requests) == ["m1", "m2"]


def test_tracked_requests_are_bounded_and_the_latest_kept():
    c = cap()
    for i in range(TRACKED_REQUESTS + 10):
        c.note_request({"msg_id": f"m{i}"})
    assert len(c.requests) == TRACKED_REQUESTS
    assert c.parent({"msg_id": "m0"}) == {} and c.parent({"msg_id": f"m{TRACKED_REQUESTS + 9}"})


def test_only_a_plain_type_name_is_a_message_type():
    assert message_type({"msg_type": "comm_msg"}) == "comm_msg"
    assert message_type({"msg_type": "x" * 64}) == "x" * 64
    for bad in ("x" * 65, "Stream", "stream row:1,2", "stream\n", "", "1stream", None, 3):
        assert message_type({"msg_type": bad}) is None, bad
    assert message_type("stream") is None


def _sent(c: OutputCap, channel: str, *ids: str) -> None:
    for msg_id in ids:
        header = {"msg_id": msg_id, "msg_type": "execute_request", "session": "s"}
        c.note_request(header)
        c.forwarded(channel, header)


def test_a_status_goes_on_once_per_request_and_state_in_the_order_the_requests_were_sent():
    c = cap()
    _sent(c, "shell", "a", "b", "c")
    _sent(c, "control", "x")
    assert c.status("k1", "a", "busy") and not c.status("k2", "a", "busy")  # one busy each
    assert not c.status("k3", "a", "starting")  # a state of no request's
    assert c.status("k4", "x", "busy") and c.status("k5", "x", "idle")  # another channel: its own order
    assert c.status("k6", "a", "idle") and not c.status("k7", "a", "idle")  # one idle, then the request is done
    assert c.status("k8", "c", "busy")  # passes over b, which gets none now
    assert not c.status("k9", "b", "busy") and not c.status("k10", "b", "idle")
    assert not c.status("k11", "nobody-sent-this", "busy")
    # a clear_output: of the latest execution, of what the kernel works on now, or of none; not of another request
    assert c.may_clear("e1") and c.may_clear("c") and c.may_clear("")
    assert not c.may_clear("b") and not c.may_clear("a")


def test_each_status_message_is_decided_once_for_every_connection():
    c = cap()
    _sent(c, "shell", "a", "b")
    assert c.status("k1", "a", "busy")
    assert c.status("k1", "a", "busy")  # the same message, seen by a second connection: the same decision
    assert not c.status("k1", "b", "busy")  # the same message id again with another parent: nowhere
    assert not c.status("", "a", "idle")  # a status without an id cannot be decided once


def test_of_no_request_only_a_start_goes_on_and_it_ends_what_the_last_process_left():
    c = cap()
    _sent(c, "shell", "a")
    assert not c.status("k1", "", "busy") and not c.status("k2", "", "idle")
    assert c.status("k3", "", "starting")
    assert not c.status("k4", "a", "busy")  # the kernel that had it is gone
    assert all(c.status(f"s{i}", "", "starting") for i in range(63))
    assert not c.status("s63", "", "starting")  # at most MAX_STARTS
