"""The wire and serialization, without processes."""

from __future__ import annotations

import os
import pickle
import threading

import numpy as np
import pytest
import zmq

from kernel_engine import protocol, serialize, wire
from kernel_engine.errors import SerializationError
from kernel_engine.wire import (
    DELIM,
    MessageError,
    SignatureError,
    Wire,
    is_batch,
    pack_batch,
    unpack_batch,
)


def frames_of(frames):
    return [zmq.Frame(bytes(f) if not isinstance(f, bytes) else f) for f in frames]


def test_pack_unpack_roundtrip():
    wire = Wire(b"secret")
    header, frames = wire.pack(
        "apply_request", {"a": 1}, {"msg_id": "p"}, {"m": 2}, [b"buf"], idents=[b"id1"]
    )
    msg = wire.recv(frames_of(frames))
    assert msg.idents == [b"id1"]
    assert msg.msg_id == header["msg_id"]
    assert msg.msg_type == "apply_request"
    assert msg.content == {"a": 1}
    assert msg.parent_header == {"msg_id": "p"}
    assert msg.metadata == {"m": 2}
    assert bytes(msg.buffers[0]) == b"buf"


def test_msg_ids_sort_in_order_made_and_differ_in_a_forked_child():
    ids = [wire.new_msg_id() for _ in range(300)]
    assert ids == sorted(ids) and len(set(ids)) == 300
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # (the child only writes its ids and leaves)
        os.write(write, "".join(wire.new_msg_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        child = f.read()
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    assert len(child_ids) == 300 and not child_ids & {*ids, wire.new_msg_id()}


def test_wrong_key_is_rejected():
    _, frames = Wire(b"one").pack("x", {})
    with pytest.raises(SignatureError):
        Wire(b"two").recv(frames_of(frames))


def test_tampered_content_is_rejected():
    wire = Wire(b"k")
    _, frames = wire.pack("x", {"a": 1})
    frames[-1] = b'{"a":2}'
    with pytest.raises(SignatureError):
        wire.recv(frames_of(frames))


def test_malformed_messages_are_rejected():
    wire = Wire(b"k")
    with pytest.raises(ValueError):
        wire.recv(frames_of([b"no delimiter here"]))
    with pytest.raises(MessageError):
        wire.recv(frames_of([DELIM, b"sig"]))


def test_session_compatible_signature():
    """ipykernel's jupyter_client.Session accepts what we sign, and vice versa."""
    from jupyter_client.session import Session

    session = Session(key=b"k")
    wire = Wire(b"k")
    _, frames = wire.pack("execute_request", {"code": "1"})
    msg = session.deserialize(frames[1:] if frames[0] == DELIM else frames)
    assert msg["content"] == {"code": "1"}
    serialized = session.serialize(session.msg("kernel_info_request"))
    assert wire.recv(frames_of(serialized)).msg_type == "kernel_info_request"


def test_batch_roundtrip():
    messages = [[b"a", b"b"], [b"c"], [b"d", b"e", b"f"]]
    frames = pack_batch(messages)
    assert is_batch(frames)
    assert (
        unpack_batch(frames_of(frames)) == [[zmq.Frame(x) for x in m] for m in messages]
        or [[bytes(x) for x in m] for m in unpack_batch(frames_of(frames))] == messages
    )


def test_routes():
    assert protocol.parse_route(protocol.route_frame("lane", 3)) == ("lane", 3)
    assert protocol.parse_route(b"hub") == ("hub", None)
    assert protocol.reply_identity(b"0123456789abcdef:s") == b"0123456789abcdef:r"
    assert protocol.reply_identity(b"plain") == b"plain"
    # only a client's identity has a twin: zmq's own identities (a zero byte first) and
    # anything else a peer picks are answered on the socket that sent
    assert protocol.reply_identity(b"\x00\x8b\x45:s") == b"\x00\x8b\x45:s"
    assert protocol.reply_identity(b"px-controller:s") == b"px-controller:s"
    for bad in (b"lane:", b"lane:x", b"nope:1", b"lane:-1", b"lane:1234567890", b""):
        with pytest.raises(ValueError):
            protocol.parse_route(bad)


def test_large_arrays_travel_out_of_band_and_arrive_read_only():
    a = np.arange(1_000_000, dtype=np.float64)
    frames = serialize.dumps({"a": a, "small": np.arange(3)})
    assert len(frames) == 3  # the pickle and one frame per array
    assert frames[1].nbytes == a.nbytes
    back = serialize.loads([frames[0], *(zmq.Frame(f) for f in frames[1:])])
    assert np.array_equal(back["a"], a)
    assert not back["a"].flags.writeable
    assert back["small"].tolist() == [0, 1, 2] and not back["small"].flags.writeable


def test_many_small_arrays_stay_in_band_past_the_limit():
    frames = serialize.dumps([np.arange(2) for _ in range(serialize.MAX_OOB_BUFFERS + 10)])
    assert len(frames) == 1 + serialize.MAX_OOB_BUFFERS


def test_large_bytes_travel_out_of_band():
    data = b"x" * (1 << 20)
    frames = serialize.pack_apply(len, (data,), {})
    assert len(frames) == 3  # the function, the arguments, the buffer
    _f, args, _kwargs = serialize.unpack_apply(frames, {})
    assert args == [data] and isinstance(args[0], bytes)


def test_unpicklable_argument_is_named():
    lock = threading.Lock()
    with pytest.raises(SerializationError, match=r"argument 1 \(lock\)"):
        serialize.pack_apply(print, (1, lock), {})
    with pytest.raises(SerializationError, match=r"keyword argument 'k'"):
        serialize.pack_apply(print, (), {"k": lock})


def test_unpicklable_result_is_a_serialization_error():
    with pytest.raises(SerializationError, match="lock"):
        serialize.dumps(threading.Lock())


def test_reference_resolves_in_namespace():
    ns = {"a": 5, "obj": type("O", (), {"x": 7})()}
    assert serialize.Reference("a").resolve(ns) == 5
    assert serialize.Reference("obj.x").resolve(ns) == 7
    assert serialize.Reference("[a, obj.x][1] + 1").resolve(ns) == 8  # any expression
    with pytest.raises(NameError, match="'missing'"):
        serialize.Reference("missing").resolve(ns)
    with pytest.raises(ValueError, match="expression"):
        serialize.Reference("not a name")
    with pytest.raises(ValueError, match="expression"):
        serialize.Reference("if")  # (a name's shape, but a keyword: still refused)
    assert serialize.Reference("match").resolve({"match": 1}) == 1  # (a soft keyword is a name)
    with pytest.raises(TypeError):
        serialize.Reference(3)


def test_a_reference_of_a_name_finds_what_code_naming_it_finds():
    """A name was looked up in the namespace alone: ``pull('True')``, ``pull('len')`` and
    ``pull('\ufb01')`` after a cell ran ``\ufb01 = 1`` (Python reads the name normalized:
    'fi') raised NameError on the engine, where IPython Parallel's pull (an eval) gives
    the value."""
    ns: dict[str, object] = {"fi": 1, "len": "shadowed"}
    assert serialize.Reference("True").resolve(ns) is True
    assert serialize.Reference("None").resolve(ns) is None
    assert serialize.Reference("abs").resolve(ns) is abs
    assert serialize.Reference("len").resolve(ns) == "shadowed"  # (the namespace's first)
    assert serialize.Reference("\ufb01").resolve(ns) == 1
    with pytest.raises(NameError, match="'absent' is not defined on this engine"):
        serialize.Reference("absent").resolve(ns)


def test_references_and_interactive_functions_are_found_inside_arguments():
    ns = {"g": [10, 20], "a": 1}

    def f():
        return a  # noqa: F821 (the engine's a)

    f.__module__ = "__main__"
    args = ([serialize.Reference("g[0]"), (serialize.Reference("a"),)], {"k": f})
    resolved = serialize._resolve(args, ns)
    assert resolved[0] == [10, (1,)] and resolved[1]["k"]() == 1
    big = [serialize.Reference("a")] * (serialize.RESOLVE_ITEMS + 1)
    assert serialize._resolve(big, ns) is big  # long sequences are data: not searched


def test_interactive_functions_use_the_engine_namespace():
    @serialize.interactive
    def helper(x):
        return x + offset  # noqa: F821 - defined in the engine's namespace

    @serialize.interactive
    def f(x):
        return helper(x) * 2

    frames = serialize.pack_apply(f, (1,), {})
    ns = {"offset": 10}
    g, args, _ = serialize.unpack_apply(frames, ns)
    assert g(*args) == 22
    # data the client has is not injected: a name only the engine lacks fails
    ns2: dict = {}
    g2, args2, _ = serialize.unpack_apply(frames, ns2)
    with pytest.raises(NameError):
        g2(*args2)


def test_pickle_protocol_five_used():
    frames = serialize.dumps([1, 2])
    assert pickle.loads(frames[0]) == [1, 2]


def test_plain_arguments_use_the_fast_pickler_and_code_falls_back():
    frames = serialize.pack_apply(abs, ([1, "a", {"b": 2.0}],), {})
    assert serialize.unpack_apply(frames, {})[1] == [[1, "a", {"b": 2.0}]]

    @serialize.interactive
    def inner(x):
        return x + 1

    frames = serialize.pack_apply(map, (inner, [1, 2]), {})
    f, args, _ = serialize.unpack_apply(frames, {})
    assert list(f(*args)) == [2, 3]


def test_function_frames_are_shared_and_cached():
    head = serialize.dumps_function(abs)
    a = serialize.pack_apply(abs, (-1,), {}, head)
    b = serialize.pack_apply(abs, (-2,), {}, head)
    assert a[0] is b[0] is head
    f1 = serialize.unpack_apply(a, {})[0]
    f2 = serialize.unpack_apply(b, {})[0]
    assert f1 is f2 and f1(-3) == 3


def test_results_use_the_fast_pickler_and_code_falls_back():
    class Local:  # (defined in a function: only cloudpickle takes it, by value)
        x = 3

    for result in (None, [1, "a", {"b": 2.0}], Local, Local(), lambda: 4):
        frames = serialize.dumps_result(result)
        back = serialize.loads(frames)
        if callable(result) and not isinstance(result, type):
            assert back() == 4
        elif isinstance(result, (Local, type)):
            assert back.x == 3
        else:
            assert back == result
    big = bytes(serialize.OOB_THRESHOLD)  # (a big bytes result travels out of band)
    frames = serialize.dumps_result(big)
    assert len(frames) == 2 and serialize.loads(frames) == big
    with pytest.raises(SerializationError, match="lock"):
        serialize.dumps_result(threading.Lock())


def test_scalar_results_pickle_to_the_same_bytes_by_the_short_way():
    """None, bools, ints, floats and strs skip the pickler's set-up: the bytes must be
    the ones the general way writes (a peer could not tell), whatever their size."""

    class Text(str):  # (a subclass: the general way)
        pass

    for result in (
        None,
        True,
        0,
        -(2**70),
        2**200,
        1.5,
        float("nan"),
        float("-inf"),
        "",
        "é" * 3,
        "x" * 100_000,
        Text("t"),
    ):
        frames = serialize.dumps_result(result)
        assert frames == serialize._dumps_fast(result), result
        back = serialize.loads(frames)
        assert back == result or back != back  # (nan)
        assert type(back) is type(result)


def test_a_maps_function_travels_out_of_band_once_pickled():
    @serialize.interactive
    def f(x):
        return x * 2

    once = serialize.PickledFunction(f)
    frames = serialize.pack_apply(len, (once, [1]), {})
    assert bytes(frames[-1]) == once.data  # (a frame of its own: the store shares it)
    _, args, _ = serialize.unpack_apply(frames, {})
    assert args[0](5) == 10
    view = memoryview(once.data).toreadonly()  # (what an out-of-band frame unpickles as)
    assert serialize._load_function(view) is serialize._load_function(once.data)  # (cached)
    assert pickle.loads(pickle.dumps(once, protocol=4))(2) == 4  # (in band before 5)
    assert pickle.loads(pickle.dumps(once, protocol=5))(3) == 6
