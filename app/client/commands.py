"""The ``switchboard send`` and ``switchboard chat`` commands: terminal front ends of `Client`.

``send`` logs in, sends one message, prints ``sent id=... ts=...`` and exits.
``chat`` is a line client: it prints incoming events, acks the inbox entries
it displayed, and reads lines (plain text or ``/commands``) from stdin, which
need not be a terminal; it exits cleanly on EOF or ``/quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from app.client.errors import ClientError, ConnectionLost, ServerError
from app.client.events import (
    ContactRequest,
    ErrorEvent,
    Event,
    Msg,
    Presence,
    Receipt,
    Reconnect,
    RoomInvite,
    ServerClosed,
    Typing,
    Welcome,
)
from app.client.sdk import Client, tls_context
from app.client.tokens import DEVICES_ENV, FileTokenStore
from app.protocol import CLIENT_PRESENCE_STATES

log = logging.getLogger(__name__)

PASSWORD_ENV: Final = "SWITCHBOARD_PASSWORD"
DEFAULT_HOST: Final = "127.0.0.1"
HISTORY_LINES: Final = 20
# Longest stdin line the chat accepts (a body is at most 16384 characters).
MAX_INPUT_LINE_BYTES: Final = 1 << 20
# Chunks read from stdin but not yet handled; the reader thread waits past this.
MAX_INPUT_CHUNKS: Final = 16
# The server closes a logged-in connection that sends nothing for idle_timeout_s (90 s
# by default): a chat left open in a quiet room pings this often.
KEEPALIVE_S: Final = 30.0

Out = Callable[[str], None]


class UsageError(Exception):
    """A command line or chat command the user must correct; the text says how."""


def _say(line: str) -> None:
    print(line, flush=True)


def _fail(message: str) -> int:
    print(f"switchboard: error: {message}", file=sys.stderr, flush=True)
    return 1


def default_device() -> str:
    """``cli-<hostname>``, reduced to what the protocol allows in a device name."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", f"cli-{socket.gethostname()}")[:64]


# --- argument parsing ----------------------------------------------------------------


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``send`` and ``chat`` on the ``switchboard`` sub-command parser."""
    help_ = "log in, send one message and print its id"
    p = sub.add_parser("send", help=help_, description=help_)
    common(p)
    _add_login_options(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="USER", help="recipient user")
    target.add_argument("--room", type=int, metavar="ID", help="recipient room")
    p.add_argument("--cmid", help="client message id; repeat it to resend safely (default: random)")
    p.add_argument("body", help="the message text")
    p.set_defaults(func=cmd_send)

    help_ = "interactive line client: prints incoming messages, sends what you type"
    p = sub.add_parser("chat", help=help_, description=help_ + " (/help lists commands)")
    common(p)
    _add_login_options(p)
    p.add_argument("--register", action="store_true", help="create the account first")
    p.add_argument(
        "--devices-file",
        type=Path,
        help=f"where device tokens are kept, so the password is asked only on a device's "
        f"first login (default ${DEVICES_ENV}, else ~/.config/switchboard/devices.json)",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument("--to", metavar="USER", help="initial target user")
    target.add_argument("--room", type=int, metavar="ID", help="initial target room")
    p.set_defaults(func=cmd_chat)


def _add_login_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"server host (default {DEFAULT_HOST})")
    p.add_argument(
        "--port",
        type=int,
        help="server port (default: the client_tls_port setting with --tls, else client_port)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, verifying the server's certificate and host name "
        "(the plaintext port only listens on the server's loopback)",
    )
    p.add_argument(
        "--cafile",
        help="CA certificate(s) to trust with --tls (default: the local cluster's "
        "<state_dir>/tls/ca.pem if it exists, else the system's CAs)",
    )
    p.add_argument(
        "--server-name", help="the name the server's certificate must hold (default: --host)"
    )
    p.add_argument("--user", required=True, help="your user name")
    p.add_argument(
        "--password",
        help=f"your password (default: ${PASSWORD_ENV}, else a prompt; "
        "visible to other local users when given here)",
    )
    p.add_argument("--device", default=default_device(), help="device name (default %(default)s)")


@dataclass(frozen=True, slots=True)
class Login:
    host: str
    port: int
    user: str
    device: str
    password: str = field(repr=False)  # "" when not asked yet (a device token may do)
    tls: ssl.SSLContext | None = field(default=None, repr=False)  # None: plaintext
    server_name: str | None = None

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self, *, keep_events: bool = True) -> Client:
        return await Client.connect(
            self.host,
            self.port,
            keep_events=keep_events,
            tls=self.tls or False,
            server_hostname=self.server_name,
        )


def _login_from_args(args: argparse.Namespace, ask: bool = True) -> Login:
    """The login the flags name; the password from the flag, the environment, or (with
    ``ask``) a prompt."""
    from app.settings import Settings

    settings = Settings.load(
        config_file=getattr(args, "config", None), state_dir=getattr(args, "state_dir", None)
    )
    port = args.port
    if port is None:
        port = settings.client_tls_port if args.tls else settings.client_port
    context = None
    if args.tls:
        cafile = args.cafile
        local_ca = settings.tls_ca_file()
        if cafile is None and not settings.tls_cert and local_ca.exists():
            cafile = str(local_ca)  # the local cluster's own CA (operators' certs: the system's)
        try:
            context = tls_context(cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the CA file {cafile}: {exc}") from None
    elif args.cafile or args.server_name:
        raise UsageError("--cafile and --server-name need --tls")
    password = args.password or os.environ.get(PASSWORD_ENV) or ""
    if not password and ask:
        password = _ask_password(args.user)
    return Login(
        host=args.host,
        port=port,
        user=args.user,
        device=args.device,
        password=password,
        tls=context,
        server_name=args.server_name,
    )


def _ask_password(user: str) -> str:
    if not sys.stdin.isatty():
        raise UsageError(f"no password: use --password or ${PASSWORD_ENV}")
    try:
        return getpass.getpass(f"password for {user}: ")
    except EOFError:
        raise UsageError("no password given") from None


def _run(
    main: Callable[[Login], Coroutine[Any, Any, int]], args: argparse.Namespace, ask: bool = True
) -> int:
    try:
        return asyncio.run(main(_login_from_args(args, ask)))
    except UsageError as exc:
        return _fail(str(exc))
    except ServerError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    except ClientError as exc:
        return _fail(str(exc))


# --- send ------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    async def main(login: Login) -> int:
        return await send_message(login, args.body, to=args.to, room=args.room, cmid=args.cmid)

    return _run(main, args)


async def send_message(
    login: Login,
    body: str,
    *,
    to: str | None,
    room: int | None,
    cmid: str | None = None,
    out: Out = _say,
) -> int:
    async with await login.connect(keep_events=False) as client:
        await client.login(login.user, login.password, login.device)
        sent = await client.send(body, to=to, room=room, cmid=cmid)
    out(f"sent id={sent.id} ts={sent.ts}")
    return 0


# --- chat ------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    store = FileTokenStore(args.devices_file)

    async def main(login: Login) -> int:
        # The device's token first, if it has one and no password was given: the
        # password is asked for only on a device's first login (or after a revocation).
        token = None if login.password or args.register else store.get(login.server, *_who(login))
        if token is not None:
            client = await login.connect()
            try:
                welcome = await client.login_token(login.user, login.device, token)
            except ServerError as exc:
                await client.close()
                if exc.code != "auth_failed":
                    raise
                store.delete(login.server, *_who(login))
                _say("* this device's token was refused (expired or revoked); log in again")
            else:
                return await _chat(client, login, welcome)
        if not login.password:
            login = replace(login, password=_ask_password(login.user))
        client = await login.connect()
        try:
            if args.register:
                try:
                    await client.register(login.user, login.password)
                    _say(f"* registered {login.user}")
                except ServerError as exc:
                    if exc.code != "user_exists":
                        raise
                    _say(f"* {login.user} is already registered; logging in")
            welcome = await client.login(login.user, login.password, login.device)
        except BaseException:
            await client.close()
            raise
        return await _chat(client, login, welcome)

    async def _chat(client: Client, login: Login, welcome: Welcome) -> int:
        async with client:
            if welcome.device_token is not None:
                store.put(login.server, *_who(login), welcome.device_token)
            _say(
                f"* logged in as {welcome.user} on {welcome.device} "
                f"(worker {welcome.worker}, inbox seq {welcome.seq}, acked {welcome.acked}); "
                "/help lists commands"
            )
            chat = Chat(client, to=args.to, room=args.room)
            return await chat.run(stdin_lines())

    return _run(main, args, ask=False)


def _who(login: Login) -> tuple[str, str]:
    return login.user, login.device


async def stdin_lines(fd: int = 0) -> AsyncIterator[str]:
    """Lines of ``fd`` without blocking the loop, whatever it is (TTY, pipe, file).

    A daemon thread does the blocking reads with ``os.read``: no non-blocking mode
    is forced on a terminal shared with the shell, and no lock of ``sys.stdin`` is
    held when the interpreter exits with the thread still waiting for input.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    slots = threading.BoundedSemaphore(MAX_INPUT_CHUNKS)

    def deliver(chunk: bytes) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody listens
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

    def pump() -> None:
        try:
            while True:
                slots.acquire()
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                deliver(chunk)
        except OSError as exc:
            log.warning("cannot read input: %s", exc)
        finally:
            deliver(b"")  # EOF

    threading.Thread(target=pump, name="switchboard-stdin", daemon=True).start()
    pending = bytearray()
    skipping = False  # inside a line that was too long, until its newline
    while chunk := await chunks.get():
        slots.release()
        pending += chunk
        *lines, rest = pending.split(b"\n")
        pending = bytearray(rest)
        if lines and skipping:
            lines.pop(0)
            skipping = False
        if len(pending) > MAX_INPUT_LINE_BYTES:
            log.warning("input line over %d bytes ignored", MAX_INPUT_LINE_BYTES)
            pending.clear()
            skipping = True
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if pending and not skipping:
        yield pending.decode("utf-8", errors="replace")


def format_event(event: Event) -> str | None:
    """One display line for an event; None for events the chat does not show."""
    match event:
        case Msg():
            return f"[{event.ts}] {event.sender} -> {_where(event.to, event.room)}: {event.body}"
        case Receipt():
            return f"[{event.ts}] * {event.by} read message {event.msg_id}"
        case Presence():
            text = f": {event.text}" if event.text else ""
            return f"* {event.user} is {event.state}{text}"
        case ContactRequest():
            return f"* {event.sender} asks to be your contact: /accept {event.sender}"
        case RoomInvite():
            return f"* {event.sender} invites you to #{event.room} {event.name}: /join {event.room}"
        case Typing():
            where = f" in #{event.room}" if event.room is not None else ""
            return f"* {event.sender} {'is typing' if event.active else 'stopped typing'}{where}"
        case Reconnect():
            return f"* the server asks to reconnect in {event.after_ms} ms"
        case ErrorEvent():
            return f"! {event.code}: {event.message}"
        case ServerClosed():
            return f"* connection closed: {event.reason}"
    return None  # Unknown: the protocol says to ignore unknown ops


def _where(to: str | None, room: int | None) -> str:
    return f"#{room}" if room is not None else str(to)


HELP: Final = """\
plain text is sent to the current target; start it with // to send a leading /
/to USER            talk to USER               /room ID          talk in room ID
/presence STATE [TEXT]  online, away or dnd    /history          recent messages here
/contacts           contacts and requests      /add USER         ask USER to be a contact
/accept USER        accept a contact request   /remove USER      remove a contact/request
/rooms              your rooms                 /create NAME      create a room
/invite ID USER     invite USER to room ID     /join ID          join a room you were invited to
/leave ID           leave room ID              /members ID       members of room ID
/quit               leave (EOF does too)       /help             this text"""


class Chat:
    """The interactive loop of ``switchboard chat`` over a logged-in `Client`."""

    def __init__(
        self,
        client: Client,
        *,
        to: str | None = None,
        room: int | None = None,
        out: Out = _say,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.client = client
        self.keepalive_s = keepalive_s
        self.out = out
        self.to = to
        self.room = room
        self._displayed_seq = 0  # highest inbox seq shown to the user
        self._acked_seq = 0
        self._ack_wanted = asyncio.Event()
        self._commands: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "to": self._cmd_to,
            "room": self._cmd_room,
            "presence": self._cmd_presence,
            "contacts": self._cmd_contacts,
            "add": self._cmd_add,
            "accept": self._cmd_accept,
            "remove": self._cmd_remove,
            "rooms": self._cmd_rooms,
            "create": self._cmd_create,
            "invite": self._cmd_invite,
            "join": self._cmd_join,
            "leave": self._cmd_leave,
            "members": self._cmd_members,
            "history": self._cmd_history,
            "help": self._cmd_help,
        }

    async def run(self, lines: AsyncIterator[str]) -> int:
        """0 when the input ends (EOF or /quit), 1 when the connection ends first."""
        shower = asyncio.create_task(self._show_events())
        acker = asyncio.create_task(self._ack_loop())
        pinger = asyncio.create_task(self._keepalive())
        reader = asyncio.create_task(self._handle_lines(lines))
        try:
            await asyncio.wait({shower, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and reader.result() and not shower.done():
                acker.cancel()
                await self._ack_displayed()
                await self.client.close()
                await shower
                return 0
            reader.cancel()
            await shower  # shows why the connection ended
            return 1
        finally:
            for task in (shower, acker, pinger, reader):
                task.cancel()
            await asyncio.wait({shower, acker, pinger, reader})
            with contextlib.suppress(ClientError):
                await self.client.close()

    # --- output side ---------------------------------------------------------------

    async def _show_events(self) -> None:
        async for event in self.client.events():
            line = format_event(event)
            if line is not None:
                self.out(line)
            if isinstance(event, Msg | Receipt):
                self._displayed_seq = max(self._displayed_seq, event.seq)
                self._ack_wanted.set()

    async def _ack_loop(self) -> None:
        # One ack in flight at a time; entries shown meanwhile share the next one.
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            await self._ack_displayed()

    async def _ack_displayed(self) -> None:
        seq = self._displayed_seq
        if seq <= self._acked_seq:
            return
        try:
            await self.client.ack(seq)
        except ClientError as exc:  # not fatal: the entries come again on the next login
            if not isinstance(exc, ConnectionLost):
                self.out(f"! ack failed: {exc}")
            return
        self._acked_seq = max(self._acked_seq, seq)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s)
            with contextlib.suppress(ClientError):  # a lost connection shows on its own
                await self.client.ping()

    # --- input side ----------------------------------------------------------------

    async def _handle_lines(self, lines: AsyncIterator[str]) -> bool:
        """True when the input ended, False when the connection did."""
        async for raw in lines:
            line = raw.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return True
            try:
                await self.handle_line(line)
            except UsageError as exc:
                self.out(f"! {exc}")
            except ServerError as exc:
                self.out(f"! {exc.code}: {exc.message}")
            except ConnectionLost:
                return False
            except ClientError as exc:  # a timeout or a protocol error: report, carry on
                self.out(f"! {exc}")
        return True

    async def handle_line(self, line: str) -> None:
        """Run one input line (not /quit): send plain text, or run a /command."""
        if line.startswith("//") or not line.startswith("/"):
            await self._send(line[1:] if line.startswith("//") else line)
            return
        name, *words = line[1:].split() or [""]
        command = self._commands.get(name)
        if command is None:
            raise UsageError(f"unknown command /{name}; /help lists them")
        await command(words)

    async def _send(self, body: str) -> None:
        if self.to is None and self.room is None:
            raise UsageError("no target: use /to USER or /room ID first")
        sent = await self.client.send(body, to=self.to, room=self.room)
        self.out(f"* sent id={sent.id} ts={sent.ts}")

    async def _cmd_to(self, words: list[str]) -> None:
        (user,) = _args(words, 1, "/to USER")
        self.to, self.room = user, None
        self.out(f"* talking to {user}")

    async def _cmd_room(self, words: list[str]) -> None:
        (room,) = _args(words, 1, "/room ID")
        self.to, self.room = None, _room_id(room)
        self.out(f"* talking in #{self.room}")

    async def _cmd_presence(self, words: list[str]) -> None:
        if not words or words[0] not in CLIENT_PRESENCE_STATES:
            raise UsageError("usage: /presence online|away|dnd [TEXT]")
        await self.client.set_presence(words[0], " ".join(words[1:]) or None)
        self.out(f"* you are {words[0]}")

    async def _cmd_contacts(self, words: list[str]) -> None:
        _args(words, 0, "/contacts")
        contacts = await self.client.contacts()
        if not contacts:
            self.out("* no contacts yet: /add USER")
        for c in contacts:
            presence = f" {c.state}" if c.state else ""
            text = f": {c.text}" if c.text else ""
            self.out(f"  {c.user} ({c.status}){presence}{text}")

    async def _cmd_add(self, words: list[str]) -> None:
        (user,) = _args(words, 1, "/add USER")
        await self.client.contact_add(user)
        self.out(f"* asked {user} to be your contact")

    async def _cmd_accept(self, words: list[str]) -> None:
        (user,) = _args(words, 1, "/accept USER")
        await self.client.contact_accept(user)
        self.out(f"* {user} is now a contact")

    async def _cmd_remove(self, words: list[str]) -> None:
        (user,) = _args(words, 1, "/remove USER")
        await self.client.contact_remove(user)
        self.out(f"* removed {user}")

    async def _cmd_rooms(self, words: list[str]) -> None:
        _args(words, 0, "/rooms")
        listed = await self.client.room_list()
        if not listed.rooms:
            self.out("* no rooms yet: /create NAME")
        for room in listed.rooms:
            self.out(f"  #{room.room} {room.name}")
        for invite in listed.invites:
            by = invite.sender
            self.out(f"  #{invite.room} {invite.name} (invited by {by}: /join {invite.room})")

    async def _cmd_create(self, words: list[str]) -> None:
        if not words:
            raise UsageError("usage: /create NAME")
        name = " ".join(words)
        room = await self.client.room_create(name)
        self.out(f"* created #{room} {name}: /room {room} to talk there")

    async def _cmd_invite(self, words: list[str]) -> None:
        room, user = _args(words, 2, "/invite ID USER")
        await self.client.room_invite(_room_id(room), user)
        self.out(f"* invited {user} to #{room}")

    async def _cmd_join(self, words: list[str]) -> None:
        (room,) = _args(words, 1, "/join ID")
        joined = await self.client.room_join(_room_id(room))
        self.out(f"* joined #{joined}: /room {joined} to talk there")

    async def _cmd_leave(self, words: list[str]) -> None:
        (room,) = _args(words, 1, "/leave ID")
        await self.client.room_leave(_room_id(room))
        self.out(f"* left #{room}")

    async def _cmd_members(self, words: list[str]) -> None:
        (room,) = _args(words, 1, "/members ID")
        members = await self.client.room_members(_room_id(room))
        self.out(f"* #{room}: {', '.join(members)}")

    async def _cmd_history(self, words: list[str]) -> None:
        _args(words, 0, "/history")
        if self.to is None and self.room is None:
            raise UsageError("no target: use /to USER or /room ID first")
        page = await self.client.history(with_user=self.to, room=self.room, limit=HISTORY_LINES)
        for m in reversed(page.messages):  # the server sends newest first
            self.out(f"[{m.ts}] {m.sender} -> {_where(m.to, m.room)}: {m.body}")
        if not page.messages:
            self.out("* no messages yet")

    async def _cmd_help(self, words: list[str]) -> None:
        self.out(HELP)


def _args(words: list[str], count: int, usage: str) -> list[str]:
    if len(words) != count:
        raise UsageError(f"usage: {usage}")
    return words


def _room_id(text: str) -> int:
    try:
        room = int(text.lstrip("#"))
    except ValueError:
        raise UsageError(f"a room id is a number, not {text!r}") from None
    if room < 1:
        raise UsageError(f"a room id is a positive number, not {text!r}")
    return room
