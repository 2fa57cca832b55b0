"""The only paramiko code: SSH to a machine with a pinned host key, run commands and scripts.

Scripts run as root from their text sent over stdin, never from a file on the machine:
a file in a shared directory could be swapped by another user between upload and sudo.

A connection accepts exactly one host key, the one the caller pinned (it was handed to
the machine in its user-data); any other key fails at once and is never retried. Only
transient failures (refused, reset, no banner yet, time-outs while the machine boots)
are retried, with backoff, until a deadline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import paramiko

from builder.errors import (
    CommandResult,
    ConnectionLost,
    HostKeyMismatch,
    RemoteCommandFailed,
    RemoteTimeout,
    SSHAuthFailed,
    SSHConnectFailed,
)
from builder.keys import KeyPair, public_key

log = logging.getLogger(__name__)
output_log = logging.getLogger("builder.remote.output")

LineSink = Callable[[str, str], None]  # (stream name, line)
SCRIPT_FROM_STDIN = 'eval "$(cat)"'  # the whole script first, then run it in this shell
KEEP_LINES = 200_000  # output lines kept per stream (the tail goes into error messages)
PROXY_STDERR_KEEP = 8192  # bytes of a proxy command's stderr kept for the error message
# A proxy command that says this will say it again: fail at once instead of retrying.
PROXY_REFUSED = ("Host key verification failed", "Permission denied", "REMOTE HOST IDENTIFICATION HAS CHANGED")
TRANSIENT = (
    paramiko.ssh_exception.NoValidConnectionsError,
    ConnectionRefusedError,
    ConnectionResetError,
    TimeoutError,
    socket.timeout,
    EOFError,
    OSError,
)


def known_host_name(host: str, port: int) -> str:
    """Return the known_hosts name of host:port (``[host]:port`` unless port 22)."""
    return host if port == 22 else f"[{host}]:{port}"


class Remote:
    """An open SSH session to one machine."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        host: str,
        port: int,
        user: str,
        prefix: str = "",
        *,
        proxy: ProxySocket | None = None,
    ) -> None:
        self.client = client
        self.host = host
        self.port = port
        self.user = user
        self.prefix = prefix
        self.proxy = proxy

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        user: str,
        login_key: KeyPair,
        host_key: KeyPair | str,
        *,
        deadline: float = 300.0,
        prefix: str = "",
        proxy: str | None = None,
    ) -> Remote:
        """Return a session, retrying transient failures for up to ``deadline`` seconds.

        ``host_key`` is the pinned host key (a KeyPair or an OpenSSH public key line).
        ``proxy`` is a ProxyCommand line (its tokens expanded: :meth:`builder.reach.Reach.proxy`),
        run anew by ``/bin/sh`` for each attempt, its stdin and stdout the connection.
        Raises HostKeyMismatch or SSHAuthFailed at once, SSHConnectFailed at the deadline, or at
        once when the proxy says its own host key or login was refused (with its stderr's tail).
        """
        pinned = public_key(host_key.public_line if isinstance(host_key, KeyPair) else host_key)
        started = time.monotonic()
        delay = 0.1
        while True:
            client = paramiko.SSHClient()
            client.get_host_keys().add(known_host_name(host, port), pinned.get_name(), pinned)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            sock = ProxySocket(proxy) if proxy else None
            try:
                client.connect(
                    host,
                    port=port,
                    username=user,
                    pkey=login_key.pkey(),
                    timeout=10,
                    banner_timeout=10,
                    auth_timeout=15,
                    allow_agent=False,
                    look_for_keys=False,
                    sock=sock,  # type: ignore[arg-type]  # socket-like, as paramiko's own ProxyCommand
                )
            except paramiko.BadHostKeyException as exc:
                _close(client, sock)
                raise HostKeyMismatch(host, port, _fingerprint(pinned), _fingerprint(exc.key)) from None
            except paramiko.AuthenticationException:
                _close(client, sock)
                raise SSHAuthFailed(host, port, user) from None
            except paramiko.SSHException as exc:
                _close(client, sock)
                if "not found in known_hosts" in str(exc):
                    raise HostKeyMismatch(host, port, _fingerprint(pinned), "of another type") from None
                reason = str(exc) or type(exc).__name__
            except TRANSIENT as exc:
                _close(client, sock)
                reason = str(exc) or type(exc).__name__
            else:
                transport = client.get_transport()
                if transport is not None:
                    transport.set_keepalive(10)
                log.debug("ssh %s@%s:%s: connected%s", user, host, port, " through a proxy" if proxy else "")
                return cls(client, host, port, user, prefix, proxy=sock)
            waited = time.monotonic() - started
            if sock is not None:
                reason = _proxy_reason(sock, reason)
                if any(word in reason for word in PROXY_REFUSED):
                    raise SSHConnectFailed(host, port, reason, waited, proxy=proxy)
            if waited + delay > deadline:
                raise SSHConnectFailed(host, port, reason, waited, proxy=proxy)
            log.debug("ssh %s:%s not ready (%s); retrying in %.1f s", host, port, reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 3.0)

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and end its proxy command, if any (idempotent)."""
        self.client.close()
        if self.proxy is not None:
            self.proxy.close()

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: LineSink | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run ``command``; return its result whatever its exit status.

        ``stdin`` (when given) is sent to the command's standard input, which is then
        closed. Output is streamed line by line to ``on_line`` (default: the output
        logger). Raises ConnectionLost when the session ends before the command,
        RemoteTimeout after ``timeout`` seconds.
        """
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost(CommandResult(command, -1, "", "(not connected)"))
        sink = on_line or self._log_line
        channel = transport.open_session(timeout=30)
        channel.exec_command(command)
        out, err = _Lines("stdout", sink), _Lines("stderr", sink)
        feed = _Input(channel, stdin)
        limit = None if timeout is None else time.monotonic() + timeout
        while not (channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready()):
            if feed.send():
                continue
            if channel.recv_ready():
                out.feed(channel.recv(65536))
            elif channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(65536))
            elif not transport.is_active():
                break
            elif limit is not None and time.monotonic() > limit:
                channel.close()
                raise RemoteTimeout(CommandResult(command, -1, out.text(), err.text()), timeout or 0)
            else:
                # Input waiting for window space is not a readable event: look again soon.
                select.select([channel], [], [], 0.05 if feed.pending else 0.5)
        out.close()
        err.close()
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        result = CommandResult(command, status, out.text(), err.text())
        # No exit status: either the session is gone (connection lost) or the command
        # was killed by a signal (OpenSSH then sends exit-signal, which paramiko drops).
        if status == -1 and not transport.is_active():
            raise ConnectionLost(result)
        return result

    def hold(self, command: str, stdin: str, ready: str, timeout: float) -> Held:
        """Run ``command`` with ``stdin`` sent but its standard input kept open; return once it prints a
        line starting with ``ready`` or ends (``Held.result`` then set). ``Held.release`` closes the input.

        Raises ConnectionLost when the session ends, RemoteTimeout after ``timeout`` seconds.
        """
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionLost(CommandResult(command, -1, "", "(not connected)"))
        channel = transport.open_session(timeout=30)
        channel.exec_command(command)
        held = Held(command, channel, _Lines("stdout", self._log_line), _Lines("stderr", self._log_line))
        held.pump(_Input(channel, None, stdin), time.monotonic() + timeout, timeout, ready)
        return held

    def check(
        self,
        command: str,
        *,
        what: str | None = None,
        timeout: float | None = None,
        on_line: LineSink | None = None,
        stdin: str | None = None,
    ) -> CommandResult:
        """Run ``command``; raise RemoteCommandFailed unless it exits 0."""
        result = self.run(command, timeout=timeout, on_line=on_line, stdin=stdin)
        if result.exit_status != 0:
            raise RemoteCommandFailed(result, what)
        return result

    def put(self, text: str, path: str, mode: int = 0o600) -> None:
        """Write ``text`` to ``path`` on the machine over SFTP, with ``mode``."""
        with self.client.open_sftp() as sftp:
            sftp.putfo(io.BytesIO(text.encode()), path)
            sftp.chmod(path, mode)

    def run_script(
        self,
        name: str,
        text: str,
        args: Sequence[str] = (),
        *,
        timeout: float | None = None,
        on_line: LineSink | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run a script as root (sudo) from its text sent over stdin; return its result.

        No file is written on the machine, so no other user there can swap the script
        between upload and sudo. Raises RemoteCommandFailed unless it exits 0 (when ``check``).
        """
        command = script_command(name, args)
        if check:
            return self.check(command, what=name, timeout=timeout, on_line=on_line, stdin=text)
        return self.run(command, timeout=timeout, on_line=on_line, stdin=text)

    def _log_line(self, stream: str, line: str) -> None:
        output_log.info("%s%s", self.prefix, line)


def script_command(name: str, args: Sequence[str] = ()) -> str:
    """Return the command that runs, as root, a script read whole from stdin as ``name`` with ``args``.

    bash reads all of stdin before running any of it, so a command in the script that
    reads its stdin (apt, debconf, cat) sees end of file, never the rest of the script;
    ``$0`` is the script's name and ``$@`` its arguments, as if it ran from a file.
    """
    return " ".join(shlex.quote(a) for a in ["sudo", "-n", "bash", "-c", SCRIPT_FROM_STDIN, name, *args])


def _close(client: paramiko.SSHClient, sock: ProxySocket | None) -> None:
    client.close()
    if sock is not None:
        sock.close()


def _proxy_reason(sock: ProxySocket, reason: str) -> str:
    """Return why an attempt through ``sock`` failed: the proxy command's own words when it said any."""
    tail = sock.stderr_tail()
    if not tail:
        return reason
    code = sock.returncode
    status = f"exited {code}" if code is not None and code >= 0 else "was stopped"  # < 0: by our close
    return f"the proxy command {status}: {tail}"


class ProxySocket:
    """A ProxyCommand run by ``/bin/sh`` as OpenSSH does: its stdin and stdout are the connection.

    Unlike paramiko's ProxyCommand, a command that exits reads as end of file at once (no
    busy wait until a time-out), its stderr is kept (the tail names why it failed), and
    :meth:`close` ends it and waits for it: no process is left behind.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # Ctrl-C on the terminal is ours to handle, not the proxy's
        )
        self.timeout: float | None = None
        self._stderr = b""
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        for chunk in iter(lambda: stream.read(4096), b""):
            self._stderr = (self._stderr + chunk)[-PROXY_STDERR_KEEP:]

    def send(self, data: bytes) -> int:
        """Write ``data`` to the command's stdin; return how much was written (OSError when it is gone)."""
        stdin = self.process.stdin
        assert stdin is not None
        return os.write(stdin.fileno(), data)

    def recv(self, size: int) -> bytes:
        """Return up to ``size`` bytes of the command's stdout (b"" at its end); socket.timeout after the time-out."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            ready, _, _ = select.select([stdout], [], [], self.timeout)
            if not ready:
                raise TimeoutError
            return os.read(stdout.fileno(), size)
        except ValueError:  # closed under us: the end of the connection
            return b""

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    @property
    def closed(self) -> bool:
        return self.process.returncode is not None

    @property
    def _closed(self) -> bool:  # what paramiko's Transport asks of a socket
        return self.closed

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def stderr_tail(self, lines: int = 3) -> str:
        """Return the last lines the command wrote on stderr (after it ended, or what came so far)."""
        if self.process.poll() is not None:
            self._reader.join(timeout=1)
        text = self._stderr.decode("utf-8", "replace").replace("\r", "")
        return " / ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])

    def close(self) -> None:
        """End the command and what it started (SIGTERM, SIGKILL after 3 s), and wait for it (idempotent).

        The pipes are left to the garbage collector: paramiko's thread may still be reading.
        """
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._reader.join(timeout=1)

    def _signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, number)  # its own session: the command and its children


def _fingerprint(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.fingerprint}"


class _Lines:
    """Split a byte stream into lines for a sink, keeping the last KEEP_LINES."""

    def __init__(self, name: str, sink: LineSink) -> None:
        self.name = name
        self.sink = sink
        self.partial = b""
        self.kept: list[str] = []

    def feed(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            self._emit(raw)

    def close(self) -> None:
        if self.partial:
            self._emit(self.partial)
            self.partial = b""

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.kept.append(line)
        del self.kept[:-KEEP_LINES]
        self.sink(self.name, line)

    def text(self) -> str:
        return "\n".join(self.kept) + ("\n" if self.kept else "")


class _Input:
    """What is left to send to a command's stdin; closes it once all is sent."""

    def __init__(self, channel: paramiko.Channel, text: str | None, kept_open: str | None = None) -> None:
        self.channel = channel
        self.close_after = kept_open is None
        self.pending = (text or "").encode() if kept_open is None else kept_open.encode()
        if text is not None and not self.pending:
            channel.shutdown_write()

    def send(self) -> bool:
        """Send what the channel's window takes now; return True if anything was sent."""
        if not self.pending or not self.channel.send_ready():
            return False
        try:
            sent = self.channel.send(self.pending[:32768])
        except OSError:  # the command ended without reading it all: its exit status says why
            self.pending = b""
            return False
        self.pending = self.pending[sent:]
        if not self.pending and self.close_after:
            self.channel.shutdown_write()
        return sent > 0


class Held:
    """A command started by ``Remote.hold``: its input still open until ``release``."""

    def __init__(self, command: str, channel: paramiko.Channel, out: _Lines, err: _Lines) -> None:
        self.command, self.channel, self.out, self.err = command, channel, out, err
        self.result: CommandResult | None = None  # set once the command has ended

    def pump(self, feed: _Input, limit: float, timeout: float, ready: str | None) -> None:
        """Send ``feed``, read output until a line starts with ``ready`` or the command ends."""
        channel, transport = self.channel, self.channel.get_transport()
        while not (channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready()):
            if ready is not None and any(line.startswith(ready) for line in self.out.kept):
                return
            if feed.send():
                continue
            if channel.recv_ready():
                self.out.feed(channel.recv(65536))
            elif channel.recv_stderr_ready():
                self.err.feed(channel.recv_stderr(65536))
            elif transport is None or not transport.is_active():
                break
            elif time.monotonic() > limit:
                channel.close()
                raise RemoteTimeout(CommandResult(self.command, -1, self.out.text(), self.err.text()), timeout)
            else:
                select.select([channel], [], [], 0.05 if feed.pending else 0.5)
        self.out.close()
        self.err.close()
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        self.result = CommandResult(self.command, status, self.out.text(), self.err.text())
        if status == -1 and (transport is None or not transport.is_active()):
            raise ConnectionLost(self.result)

    def release(self, timeout: float) -> CommandResult:
        """Close the command's input (its signal to go on) and return its result once it ends."""
        if self.result is None:
            self.channel.shutdown_write()
            self.pump(_Input(self.channel, None), time.monotonic() + timeout, timeout, None)
        assert self.result is not None
        return self.result
