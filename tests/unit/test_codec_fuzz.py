"""Property tests: the decoder never raises and is independent of chunking."""

from __future__ import annotations

import unicodedata
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.protocol import (
    DECODER_CODES,
    OPS,
    Decoder,
    FrameError,
    Limits,
    Request,
    encode,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # don't litter the repo with .hypothesis/
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies for valid frames ------------------------------------------------

# The alphabets docs/protocol.md allows per text field (app/protocol/text.py).
no_nul = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
body_chars = st.characters(exclude_categories=["Cs", "Cc"]) | st.sampled_from("\t\n")
label_chars = st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zl", "Zp"])

usernames = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{2,31}", fullmatch=True)
devices = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
passwords = st.text(no_nul, min_size=1, max_size=40)
tokens = st.text(no_nul, min_size=16, max_size=64)
cmids = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64)
ids = st.integers(1, 2**53)
seqs = st.integers(0, 2**53)
bodies = st.text(body_chars, min_size=1, max_size=300)
rids = st.none() | st.text(no_nul, max_size=64) | st.integers(0, 2**53 - 1)
room_names = st.text(label_chars, min_size=1, max_size=64).filter(
    lambda name: 0 < len(unicodedata.normalize("NFC", name.strip())) <= 64
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def fields(**required: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(required)


def merge(*parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


def target(user_key: str) -> st.SearchStrategy[dict[str, Any]]:
    return fields(**{user_key: usernames}) | fields(room=ids)


FIELDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "hello": st.fixed_dictionaries(
        {"user": usernames, "password": passwords, "device": devices},
        optional={"v": st.just(1)},
    ),
    "register": fields(user=usernames, password=passwords),
    "resume": fields(user=usernames, device=devices, token=tokens, last_seq=seqs),
    "login_token": fields(user=usernames, device=devices, device_token=tokens),
    "send": merge(fields(cmid=cmids, body=bodies), target("to")),
    "ack": fields(seq=seqs),
    "presence": st.fixed_dictionaries(
        {"state": st.sampled_from(["online", "away", "dnd"])},
        optional={"text": st.text(label_chars, max_size=200)},
    ),
    "contact_add": fields(user=usernames),
    "contact_accept": fields(user=usernames),
    "contact_remove": fields(user=usernames),
    "contacts": fields(),
    "room_create": fields(name=room_names),
    "room_invite": fields(room=ids, user=usernames),
    "room_join": fields(room=ids),
    "room_leave": fields(room=ids),
    "room_members": fields(room=ids),
    "rooms": fields(),
    "history": merge(
        target("with"),
        st.fixed_dictionaries({}, optional={"before": ids, "limit": st.integers(1, 100)}),
    ),
    "typing": merge(target("to"), st.fixed_dictionaries({}, optional={"active": st.booleans()})),
    "read": fields(msg_id=ids),
    "password": fields(old=passwords, new=passwords),
    "ping": fields(),
    "bye": fields(forget=st.booleans()),
}


@st.composite
def valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(sorted(FIELDS)))
    frame: dict[str, Any] = {"op": op, **draw(FIELDS[op])}
    rid = draw(rids)
    if rid is not None:
        frame["rid"] = rid
    if draw(st.booleans()):
        frame["x_future"] = draw(json_values)  # unknown fields must be ignored
    return frame


# --- helpers -----------------------------------------------------------------------


def check_items(items: list[Request | FrameError]) -> None:
    for item in items:
        if isinstance(item, FrameError):
            assert item.code in DECODER_CODES, item
            assert item.message and "line 1" not in item.message, item  # no exception text
        else:
            assert isinstance(item, tuple(OPS.values())), item


def feed_chunks(data: bytes, cuts: list[int], limits: Limits) -> list[Request | FrameError]:
    dec = Decoder(limits)
    out: list[Request | FrameError] = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += dec.receive_data(data[prev:cut])
        prev = cut
    return out


# --- properties --------------------------------------------------------------------


def test_strategies_cover_every_op() -> None:
    assert set(FIELDS) == set(OPS)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    dec = Decoder(Limits(max_frame_bytes=128, max_errors_per_connection=5))
    for chunk in chunks:
        check_items(dec.receive_data(chunk))


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b"[",
                b'"',
                b":",
                b",",
                b"\n",
                b"\r",
                b" ",
                b'"op"',
                b'"send"',
                b'"rid"',
                b"1",
                b"-",
                b"true",
                b"null",
                b"\\u00",
                b"\xff",
            ]
        ),
        max_size=60,
    )
)
def test_json_ish_noise_never_raises(tokens: list[bytes]) -> None:
    check_items(Decoder().receive_data(b"".join(tokens)))


@FUZZ
@given(valid_frames())
def test_valid_frames_parse_to_their_class(frame: dict[str, Any]) -> None:
    items = Decoder().receive_data(encode(frame))
    assert len(items) == 1
    item = items[0]
    assert type(item) is OPS[frame["op"]], item
    assert item.rid == frame.get("rid")
    for key, value in frame.items():
        if key in ("op", "rid", "x_future"):
            continue
        attr = "with_user" if key == "with" else key
        got = getattr(item, attr)
        expected = unicodedata.normalize("NFC", value.strip()) if key == "name" else value
        assert got == expected, key


@FUZZ
@given(valid_frames(), st.data())
def test_mutated_frames_never_raise(frame: dict[str, Any], data: st.DataObject) -> None:
    # Value-level mutation: any field (op included) gets an arbitrary JSON value.
    key = data.draw(st.sampled_from(sorted(frame)))
    mutated = {**frame, key: data.draw(json_values)}
    check_items(Decoder().receive_data(encode(mutated)))
    # Byte-level mutation: overwrite, insert and delete a few bytes.
    raw = bytearray(encode(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if action == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            if action == "set":
                raw[pos] = byte
            else:
                del raw[pos]
    check_items(Decoder(Limits(max_frame_bytes=256)).receive_data(bytes(raw)))


noise_lines = st.sampled_from(
    [b"\n", b"\r\n", b"  \n", b"junk\n", b"[]\n", b'{"op":"nope","rid":1}\n', b'{"op":"ack"}\n']
)
stream_items = valid_frames().map(encode) | valid_frames().map(lambda f: encode(f)[:-1] + b"\r\n")


@FUZZ
@given(st.lists(stream_items, min_size=1, max_size=12), st.lists(st.integers(0, 10_000)))
def test_chunking_does_not_change_valid_stream(frames: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frames)
    limits = Limits()
    whole = Decoder(limits).receive_data(data)
    assert len(whole) == len(frames)
    assert not any(isinstance(i, FrameError) for i in whole)
    assert feed_chunks(data, [c % (len(data) + 1) for c in cuts], limits) == whole


@FUZZ
@given(
    st.lists(stream_items | noise_lines, max_size=20),
    st.lists(st.integers(0, 10_000)),
    st.integers(40, 400),
    st.integers(0, 6),
)
def test_chunking_does_not_change_any_stream(
    lines: list[bytes], cuts: list[int], max_frame: int, max_errors: int
) -> None:
    # Also holds with errors, fatal oversize frames and an exhausted error budget.
    data = b"".join(lines)
    limits = Limits(max_frame_bytes=max_frame, max_errors_per_connection=max_errors)
    whole = Decoder(limits).receive_data(data)
    check_items(whole)
    assert feed_chunks(data, [c % (len(data) + 1) for c in cuts], limits) == whole
    assert feed_chunks(data, list(range(len(data))), limits) == whole  # byte by byte
