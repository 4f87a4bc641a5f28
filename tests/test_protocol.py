"""The protocol's contents and the wire's checks, without processes.

Property-based (hypothesis): whatever arrives, parsing either gives a structure whose
every field is in range, or raises TypeError/ValueError (MessageError on the wire) naming
what is wrong; it never raises anything else, and never lets a bad value through.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_engine import protocol, wire

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
FLAG_VALUES = (
    JSON
    | st.sampled_from([float("nan"), float("inf"), -1, -0.5, 0, 1e12, "5", True, [1, "a"]])
    | st.lists(st.integers(-3, 3), max_size=4)
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flag_metadata() -> st.SearchStrategy[dict[str, Any]]:
    keys = ["targets", "after", "follow", "timeout", "retries", "time_limit", "label"]
    return st.dictionaries(st.sampled_from(keys), FLAG_VALUES, max_size=7)


def _assert_in_range(flags: protocol.TaskFlags) -> None:
    for value in (flags.timeout, flags.time_limit):
        assert value is None or (isinstance(value, float) and math.isfinite(value) and value >= 0)
    assert flags.time_limit is None or flags.time_limit > 0
    assert isinstance(flags.retries, int) and not isinstance(flags.retries, bool)
    assert 0 <= flags.retries <= protocol.MAX_RETRIES
    assert flags.targets is None or all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in flags.targets
    )
    for dep in (flags.after, flags.follow):
        assert dep is None or (dep.msg_ids and all(isinstance(m, str) for m in dep.msg_ids))
    assert flags.label is None or isinstance(flags.label, str)


@SETTINGS
@given(_flag_metadata())
def test_task_flags_are_in_range_or_refused(md):
    try:
        flags = protocol.TaskFlags.from_content(md)
    except (TypeError, ValueError) as exc:
        named = [k for k in md if k in str(exc)]
        assert named, f"the error does not name the bad flag: {exc}"
        return
    _assert_in_range(flags)


@pytest.mark.parametrize(
    ("md", "error", "field"),
    [
        ({"time_limit": "5"}, TypeError, "time_limit"),
        ({"time_limit": float("nan")}, ValueError, "time_limit"),
        ({"time_limit": 0}, ValueError, "time_limit"),
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"retries": "two"}, TypeError, "retries"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": True}, TypeError, "retries"),
        ({"targets": ["a"]}, TypeError, "targets"),
        ({"targets": 3}, TypeError, "targets"),
        ({"after": 5}, TypeError, "after"),
        ({"after": {"msg_ids": [1]}}, TypeError, "after.msg_ids"),
        ({"follow": {"msg_ids": ["a"], "all": "yes"}}, TypeError, "follow.all"),
        ({"label": 3}, TypeError, "label"),
    ],
)
def test_each_bad_flag_is_named(md, error, field):
    with pytest.raises(error, match=field.replace(".", r"\.")):
        protocol.TaskFlags.from_content(md)


def test_a_missing_dependency_list_means_no_dependency():
    flags = protocol.TaskFlags.from_content({"after": {"msg_ids": []}, "retries": None})
    assert flags.after is None and flags.retries == 0


@st.composite
def task_flags(draw: Any) -> protocol.TaskFlags:
    ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3)
    dep = st.none() | st.builds(
        protocol.DependencySpec,
        ids.map(tuple),
        st.booleans(),
        st.just(True),
        st.booleans(),
    )
    seconds = st.none() | st.floats(0.001, 1e6)
    return protocol.TaskFlags(
        targets=draw(st.none() | st.lists(st.integers(0, 99), max_size=4).map(tuple)),
        after=draw(dep),
        follow=draw(dep),
        timeout=draw(seconds),
        retries=draw(st.integers(0, 10)),
        time_limit=draw(seconds),
        label=draw(st.none() | st.text(max_size=20)),
    )


@SETTINGS
@given(task_flags())
def test_task_flags_round_trip_through_json(flags):
    encoded = wire.dumps_json(flags.to_content())
    assert protocol.TaskFlags.from_content(wire.loads_json(encoded)) == flags


@SETTINGS
@given(
    st.sampled_from(sorted(protocol.HUB_REQUESTS)),
    st.dictionaries(
        st.sampled_from(
            ["targets", "msg_ids", "engine_ids", "signum", "hub", "query", "keys", "n"]
        ),
        JSON,
        max_size=4,
    ),
)
def test_hub_requests_parse_or_refuse(msg_type, content):
    structure = protocol.HUB_REQUESTS[msg_type]
    try:
        request = structure.from_content(content)
    except (TypeError, ValueError):
        return
    again = structure.from_content(wire.loads_json(wire.dumps_json(request.to_content())))
    assert again == request


@SETTINGS
@given(st.dictionaries(st.sampled_from(["submitted", "completed", "done", "x"]), JSON))
def test_direct_notices_parse_or_refuse(content):
    try:
        notice = protocol.DirectNotice.from_content(content)
    except (TypeError, ValueError):
        return
    for sub in [*notice.submitted, *(s for s, _ in notice.done)]:
        assert isinstance(sub.msg_id, str) and isinstance(sub.engine_id, int)
    for done in [*notice.completed, *(d for _, d in notice.done)]:
        assert done.status in ("ok", "error", "aborted")
        assert done.sizes is None or all(isinstance(n, int) and n >= 0 for n in done.sizes)
    for sub, done in notice.done:
        assert sub.msg_id == done.msg_id and sub.engine_id == done.engine_id
    again = protocol.DirectNotice.from_content(
        wire.loads_json(wire.dumps_json(notice.to_content()))
    )
    assert again == notice


def test_a_request_sent_and_answered_goes_as_one_entry():
    """``done``: one object with both entries' fields, read back as the pair; a field of
    either entry that is wrong refuses the notice."""
    sub = protocol.DirectSubmitted("m1", "apply_request", "2026-12-03T10:00:00Z", 3, "lbl")
    done = protocol.DirectCompleted("m1", 3, "ok", "2026-12-03T10:00:01Z", None, (5, 2))
    content = protocol.DirectNotice(done=((sub, done),)).to_content()
    assert content["done"] == [{**done.to_content(), **sub.to_content()}]
    assert protocol.DirectNotice.from_content(content).done == ((sub, done),)
    for wrong in ({"engine_id": None}, {"status": "bad"}, {"msg_type": 7}, {"sizes": [-1]}):
        with pytest.raises((TypeError, ValueError)):
            protocol.DirectNotice.from_content({"done": [{**content["done"][0], **wrong}]})


@pytest.mark.parametrize(
    ("structure", "content", "field"),
    [
        (protocol.SignalRequest, {"signum": "INT"}, "signum"),
        (protocol.SignalRequest, {"signum": 999}, "signum"),
        (protocol.ShutdownRequest, {"hub": "yes"}, "hub"),
        (protocol.QueueRequest, {"targets": "all"}, "targets"),
        (protocol.PurgeRequest, {"msg_ids": [3]}, "msg_ids"),
        (protocol.StartRequest, {"n": 0}, "n"),
        (protocol.StartRequest, {"n": 10**9}, "n"),
        (protocol.DbRequest, {"query": []}, "query"),
        (protocol.EngineSetup, {"engine_id": "0"}, "engine_id"),
    ],
)
def test_bad_request_fields_are_named(structure, content, field):
    with pytest.raises((TypeError, ValueError), match=field):
        structure.from_content(content)


def test_routes_and_identities():
    assert protocol.parse_route(protocol.route_frame("shell", 12)) == ("shell", 12)
    assert protocol.parse_route(b"lb") == ("lb", None)
    stem = protocol.client_identity(b"\x01" * 8)
    assert protocol.reply_identity(stem + b":s") == stem + b":r"
    assert protocol.reply_identity(stem + b":r") == stem + b":r"


def test_curve_is_on_off_loopback():
    assert not protocol.curve_wanted("127.0.0.1")
    assert protocol.curve_wanted("10.77.0.1")
    assert protocol.curve_wanted("127.0.0.1", True)
    assert not protocol.curve_wanted("10.77.0.1", False)


# ----- the wire


def frames_of(frames: list[Any]) -> list[zmq.Frame]:
    return [zmq.Frame(bytes(f)) for f in frames]


@SETTINGS
@given(st.lists(st.binary(max_size=80), max_size=12))
def test_random_frames_are_refused_cleanly(frames):
    w = wire.Wire(b"key")
    with pytest.raises(wire.MessageError):
        w.recv(frames_of(frames))


FINITE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


def test_nan_is_never_sent():
    with pytest.raises(ValueError):
        wire.dumps_json({"time_limit": float("nan")})


@SETTINGS
@given(
    st.dictionaries(st.text(max_size=8), FINITE_JSON),
    st.lists(st.binary(max_size=30), max_size=3),
    st.integers(0, 200),
    st.integers(0, 255),
)
def test_signed_messages_round_trip_and_any_change_breaks_them(content, buffers, at, byte):
    w = wire.Wire(b"key")
    header, frames = w.pack("x_request", content, buffers=buffers)
    msg = w.recv(frames_of(frames))
    assert msg.msg_id == header["msg_id"]
    assert msg.content == json.loads(wire.dumps_json(content))
    assert [bytes(b) for b in msg.buffers] == buffers
    signed = b"".join(frames[2:6])
    at %= len(signed)
    if signed[at] == byte:
        return
    tampered = bytearray(signed)
    tampered[at] = byte
    parts, pos = [], 0
    for f in frames[2:6]:
        parts.append(bytes(tampered[pos : pos + len(f)]))
        pos += len(f)
    with pytest.raises(wire.MessageError):
        w.recv(frames_of([*frames[:2], *parts, *frames[6:]]))


def test_headers_must_name_a_message():
    w = wire.Wire(b"key")
    for header in ([1], {"msg_id": 3, "msg_type": "x"}, {"msg_id": "a", "msg_type": ""}):
        frames = [wire.DELIM, b"", wire.dumps_json(header), b"{}", b"{}", b"{}"]
        frames[1] = w.sign(frames[2:6])
        with pytest.raises(wire.MessageError, match="header"):
            w.recv(frames_of(frames))


def test_json_that_python_would_accept_but_json_does_not():
    for bad in (b"NaN", b'{"a": Infinity}', b"[" * 100_000 + b"]" * 100_000, b"\xff"):
        with pytest.raises(wire.MessageError):
            wire.loads_json(bad)
    w = wire.Wire(b"key")
    _, frames = w.pack("x", b'{"time_limit": NaN}')
    msg = w.recv(frames_of(frames))
    with pytest.raises(wire.MessageError):
        msg.content  # noqa: B018


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _strict(text: str) -> Any:
    """The reference: Python's JSON parser, without its NaN and infinities, an empty
    frame read as an empty object."""

    def reject(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text or "{}", parse_constant=reject)


@settings(max_examples=300, deadline=None)
@given(
    value=_JSON,
    before=st.sampled_from(["", " ", "\n\t "]),
    after=st.sampled_from(["", " ", "\r\n", "x", "}", "{}", " 1", ",", "\x00"]),
    separators=st.sampled_from([(",", ":"), (", ", ": ")]),
)
def test_a_json_frame_reads_as_pythons_parser_reads_it(value, before, after, separators):
    """The parse that skips the whitespace scan when there is none reads every frame as
    Python's parser does: the same value, or an error for what that parser refuses
    (data left over, a frame of whitespace)."""
    text = before + json.dumps(value, separators=separators) + after
    try:
        expected = _strict(text)
    except ValueError:
        with pytest.raises(wire.MessageError, match="not valid JSON"):
            wire.loads_json(text.encode())
        return
    assert wire.loads_json(text.encode()) == expected
    assert wire.loads_json(memoryview(text.encode())) == expected


@pytest.mark.parametrize(
    "frame, expected",
    [(b"", {}), (b"{}", {}), (b" {} ", {}), (b"[]", []), (b"1", 1), (b'"a"', "a")],
)
def test_json_frames_at_the_edges(frame, expected):
    assert wire.loads_json(frame) == expected


@pytest.mark.parametrize("frame", [b" ", b"{} x", b"{}{}", b"{", b"1 2", b"\xff", b"-"])
def test_json_frames_left_unfinished_or_followed_by_more_are_refused(frame):
    with pytest.raises(wire.MessageError, match="not valid JSON"):
        wire.loads_json(frame)


def small_inline(n: int) -> Any:
    """Make frames of ``n`` bytes or more travel on their own in batches (restored on
    exit), so that small test frames exercise both kinds."""

    class Swap:
        def __enter__(self) -> None:
            self.old, wire.INLINE_BELOW = wire.INLINE_BELOW, n

        def __exit__(self, *exc: Any) -> None:
            wire.INLINE_BELOW = self.old

    return Swap()


FRAMES = st.lists(st.binary(max_size=24), min_size=1, max_size=6)
MESSAGES = st.lists(FRAMES, min_size=1, max_size=8)


@SETTINGS
@given(MESSAGES)
def test_a_batch_gives_back_its_messages_frame_for_frame(messages):
    big = [[zmq.Frame(f) if len(f) >= 16 else f for f in m] for m in messages]
    with small_inline(16):
        frames = wire.pack_batch(big)
    own = sum(len(f) >= 16 for m in messages for f in m)
    assert wire.is_batch(frames) and len(frames) == 3 + own
    got = wire.unpack_batch(frames)
    assert [[wire.as_bytes(f) for f in m] for m in got] == messages
    for sent, back in zip(big, got):
        for f, g in zip(sent, back):
            if isinstance(f, zmq.Frame):
                assert g is f  # (a big frame is passed on as it is: no copy)
            else:  # (a Part reads as a zmq.Frame does)
                assert isinstance(g, wire.Part) and g.bytes == f and bytes(g.buffer) == f


def test_batches_carry_messages_in_order_and_never_one_too_long_for_a_batch():
    small = [[b"%d" % i, b"x"] for i in range(7)]
    long = [b"long", *[b"y"] * (wire.MAX_MESSAGE_FRAMES + 1)]
    messages = [small[0], long, *small[1:3], long, small[3], *small[4:]]
    sent = wire.batches(messages, limit=2)
    got: list[list[Any]] = []
    for frames in sent:
        got += wire.unpack_batch(frames) if wire.is_batch(frames) else [frames]
    assert got == messages
    assert [wire.is_batch(f) for f in sent] == [False, False, True, False, True, True]
    assert wire.batches([]) == [] and wire.batches([small[0]]) == [small[0]]


def test_a_task_is_never_too_long_for_a_batch():
    """A client's batch holds its tasks whole (none is sent alone): pickles take
    serialize.MAX_OOB_BUFFERS buffers at most, the rest in band."""
    from kernel_engine import serialize

    np = pytest.importorskip("numpy")
    arrays = [np.zeros(4) for _ in range(3 * serialize.MAX_OOB_BUFFERS)]  # (out of band)
    _, frames = wire.Wire(b"key").pack(
        "apply_request", {}, None, {}, serialize.pack_apply(len, (arrays,), {})
    )
    assert serialize.MAX_OOB_BUFFERS < len(frames) <= wire.MAX_MESSAGE_FRAMES


def _index(*values: int) -> bytes:
    return b"".join(v.to_bytes(8, "little", signed=True) for v in values)


@SETTINGS
@given(MESSAGES, st.lists(st.tuples(st.integers(0, 60), st.integers(-(2**63), 2**63 - 1))))
def test_a_batch_whose_index_lies_is_refused_whole_or_read_consistently(messages, lies):
    with small_inline(16):
        frames = wire.pack_batch(messages)
    index = bytearray(frames[1])
    for at, value in lies:  # (int64s of the index replaced by anything)
        if 8 * at < len(index):
            index[8 * at : 8 * at + 8] = value.to_bytes(8, "little", signed=True)
    frames[1] = bytes(index)
    try:
        got = wire.unpack_batch(frames, limit=8, least=1)
    except wire.MessageError:
        return
    assert 0 < len(got) <= 8 and all(0 < len(m) <= wire.MAX_MESSAGE_FRAMES for m in got)
    inline = sum(len(f) for m in got for f in m if isinstance(f, wire.Part))
    assert inline == len(frames[2])  # (every byte read once, none beyond the frame)
    assert [f for m in got for f in m if not isinstance(f, wire.Part)] == frames[3:]


def test_a_lying_batch_index_is_refused_without_unpacking():
    joined = b"abc"
    lies = [
        _index(1, 2, 1),  # lengths for fewer frames than counted
        _index(0),  # no message
        _index(2, 1, 1, 3, 0),  # more messages than limit=1 allows (below)
        _index(1, -1, 3),  # a negative frame count
        _index(1, 1, 4),  # lengths beyond the joined frame
        _index(1, 1, 2),  # lengths short of it
        _index(1, 2, 3, -1),  # a frame of its own that is not there
        _index(1, 1, -2),  # a length below -1
        _index(1, wire.MAX_MESSAGE_FRAMES + 1) + _index(0) * wire.MAX_MESSAGE_FRAMES,
        _index(1, 1, 3)[:-1],  # not a whole number of int64s
        b"",
        json.dumps([1]).encode(),  # the old format's counts
    ]
    for i, index in enumerate(lies):
        with pytest.raises(wire.MessageError):
            wire.unpack_batch([wire.BATCH, index, joined], limit=1 if i == 2 else 8)
    with pytest.raises(wire.MessageError):  # (too few frames for its kind: tasks need 5)
        wire.unpack_batch([wire.BATCH, _index(1, 1, 3), joined], least=5)
    with pytest.raises(wire.MessageError):  # an index bigger than its limit allows
        wire.unpack_batch([wire.BATCH, _index(1, 1, 3) + b"\0" * 8 * 2000, joined], limit=1)
    assert wire.unpack_batch([wire.BATCH, _index(1, 1, 3), joined]) == [[b"abc"]]


def test_seen_window_refuses_replays_and_stays_bounded():
    window = wire.SeenWindow(3)
    assert all(window.add(m) for m in "abc")
    assert not window.add("a")
    assert window.add("d") and "a" not in window and len(window) == 3
    assert not window.add("d")


def test_drop_log_writes_a_line_per_interval(caplog):
    drops = wire.DropLog(logging.getLogger("test-drops"), "lane", interval=3600)
    with caplog.at_level(logging.WARNING, "test-drops"):
        for _ in range(10_000):
            drops.drop("invalid HMAC signature")
        drops.flush()
    lines = [r for r in caplog.records if r.name == "test-drops"]
    assert len(lines) == 2  # the first drop at once, the other 9,999 in one summary
    assert "9999" in lines[1].getMessage() and drops.total == 10_000


class _CutAt:
    """A socket whose ``send`` raises before its ``n``-th frame (a signal handler's
    exception between two frames), or, with ``after``, once that frame has gone."""

    def __init__(self, sock: Any, n: int, after: bool = False):
        self.sock, self.n, self.after, self.sent = sock, n, after, 0

    def send(self, frame: Any, flags: int = 0, copy: bool = True) -> Any:
        i = self.sent
        self.sent += 1
        if i == self.n and not self.after:
            raise KeyboardInterrupt
        got = self.sock.send(frame, flags, copy=copy)
        if i == self.n:
            raise KeyboardInterrupt
        return got


def test_a_message_cut_short_is_refused_wherever_it_was_cut():
    """An exception between two frames of a send leaves a fragment that every receiver
    refuses, never a shorter message that passes (buffers are not signed: a fragment ended
    with an empty frame ran with an argument missing) nor one glued to the next."""
    w = wire.Wire(b"key")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://cut")
        b.connect("inproc://cut")
        b.rcvtimeo = 2000
        _, frames = w.pack("apply_request", {}, None, {}, [b"f" * 10, b"a" * 10, b"b" * 10])
        for n in range(len(frames) + 1):
            after = n == len(frames)  # (the exception after the last frame went)
            with pytest.raises(KeyboardInterrupt):
                wire.send_frames(_CutAt(a, len(frames) - 1 if after else n, after), frames)
            got = b.recv_multipart()
            if after:  # (the message went whole, then CUT alone)
                assert len(w.recv(got).buffers) == 3
                got = b.recv_multipart()
            assert got[-1] == wire.CUT
            with pytest.raises(wire.MessageError):
                w.recv(got)
            wire.send_frames(a, frames)  # (the next message is whole and passes)
            assert len(w.recv(b.recv_multipart()).buffers) == 3
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def _checked_submitted(item: Any) -> protocol.DirectSubmitted:
    """A direct notice's submitted item checked field by field (what ``from_content``
    answers, whichever way it checks)."""
    item = protocol._mapping("submitted", item)
    return protocol.DirectSubmitted(
        protocol.check_msg_id("msg_id", item.get("msg_id")),
        protocol.check_msg_id("msg_type", item.get("msg_type")),
        protocol.check_msg_id("date", item.get("date")),
        protocol.check_int("engine_id", item.get("engine_id")),
        protocol.check_label("label", item.get("label")),
    )


def _checked_completed(item: Any) -> protocol.DirectCompleted:
    item = protocol._mapping("completed", item)
    msg_id = protocol.check_msg_id("msg_id", item.get("msg_id"))
    eid, status = item.get("engine_id"), item.get("status")
    if status not in ("ok", "error", "aborted"):
        raise ValueError("status")
    return protocol.DirectCompleted(
        msg_id,
        None if eid is None else protocol.check_int("engine_id", eid),
        status,
        protocol.check_label("started", item.get("started")),
        protocol.check_label("completed", item.get("completed")),
        protocol.check_ids("sizes", item.get("sizes")),
    )


class _Str(str):
    pass


class _Int(int):
    pass


_EDGE_TEXT = ["", "a", "a" * 256, "a" * 257, "a" * 1025, "é", "\udc80", _Str("s"), None, 3, []]
_EDGE_INT = [0, -1, 999_999, 1_000_000, 1_000_001, True, 1.0, "1", None, _Int(2)]
_EDGE_SIZES = [None, [], (), (1, 2), "12", {}, [0, 5], [-1], [True], [1.0], [_Int(3)], [10**12]]
_MISSING = object()
_SUBMITTED = {"msg_id": "m", "msg_type": "apply_request", "date": "2026-01-01", "engine_id": 1}
_COMPLETED = {"msg_id": "m", "engine_id": 1, "status": "ok", "sizes": [3, 4]}
_SUBMITTED_EDGES = [
    *((f, v) for f in ("msg_id", "msg_type", "date", "label") for v in [*_EDGE_TEXT, _MISSING]),
    *(("engine_id", v) for v in [*_EDGE_INT, _MISSING]),
]
_COMPLETED_EDGES = [
    *((f, v) for f in ("msg_id", "started", "completed") for v in [*_EDGE_TEXT, _MISSING]),
    *(("engine_id", v) for v in [*_EDGE_INT, _MISSING]),
    *(("status", v) for v in ["error", "aborted", "unknown", _Str("ok"), None, 1, _MISSING]),
    *(("sizes", v) for v in [*_EDGE_SIZES, _MISSING]),
]


def _outcome(check, item):
    try:
        return check(item)
    except (TypeError, ValueError) as exc:
        return type(exc)


def _same(got, expected):
    assert got == expected
    if not isinstance(got, type):
        assert [type(getattr(got, f)) for f in got.__slots__] == [
            type(getattr(expected, f)) for f in expected.__slots__
        ]


def _with(base, field, value):
    item = dict(base)
    if value is _MISSING:
        item.pop(field, None)
    else:
        item[field] = value
    return item


@pytest.mark.parametrize(("field", "value"), _SUBMITTED_EDGES)
def test_a_direct_submission_is_checked_as_each_field_check_would(field, value):
    """The quick check of the common case takes what the field-by-field one takes (the
    same values) and nothing it refuses: a client with the key is refused as before."""
    item = _with(_SUBMITTED, field, value)
    _same(
        _outcome(protocol.DirectSubmitted.from_content, item),
        _outcome(_checked_submitted, item),
    )


@pytest.mark.parametrize(("field", "value"), _COMPLETED_EDGES)
def test_a_direct_completion_is_checked_as_each_field_check_would(field, value):
    item = _with(_COMPLETED, field, value)
    _same(
        _outcome(protocol.DirectCompleted.from_content, item),
        _outcome(_checked_completed, item),
    )


@SETTINGS
@given(JSON)
def test_any_direct_notice_item_is_checked_as_each_field_check_would(item):
    _same(
        _outcome(protocol.DirectSubmitted.from_content, item),
        _outcome(_checked_submitted, item),
    )
    _same(
        _outcome(protocol.DirectCompleted.from_content, item),
        _outcome(_checked_completed, item),
    )


def test_interrupt_marks_are_bounded_and_taken_once():
    marks = wire.SeenWindow(3)
    for m in "abcd":
        marks.add(m)
    assert len(marks) == 3 and not marks.take("a")  # (the oldest went)
    assert marks.take("b") and not marks.take("b")
    marks.add("c")  # (again: no second place)
    for m in "ef":
        marks.add(m)
    assert len(marks) == 3 and [marks.take(m) for m in "cdef"] == [False, True, True, True]


def test_seconds_and_ints_of_numpy_types_are_taken_as_python_numbers():
    """``view.time_limit = np.float32(1)`` was refused (np.float64, a float, was taken);
    an integer flag of numpy's, as chunksize, is an int. Bools stay refused."""
    np = pytest.importorskip("numpy")
    for value in (np.float32(1.5), np.float64(1.5), np.int32(2)):
        got = protocol.check_seconds("time_limit", value, positive=True)
        assert type(got) is float and got == float(value)
    assert type(protocol.check_int("chunksize", np.int64(3), 1)) is int
    for bad in (np.bool_(True), True):
        with pytest.raises(TypeError, match="time_limit"):
            protocol.check_seconds("time_limit", bad)
    with pytest.raises(ValueError, match="time_limit"):
        protocol.check_seconds("time_limit", np.float32("nan"))
