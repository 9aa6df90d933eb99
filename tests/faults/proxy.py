"""A TCP proxy on 127.0.0.1 that makes the link between nodes and the coordinator unreliable.

Put it in front of the coordinator's port and point nodes at :attr:`FaultProxy.port`.
Bytes from the nodes to the coordinator go ``up``, the others ``down``; each
direction has its own :class:`LinkFaults`, whose fields may be changed at any
time while the proxy runs (they are read again for every chunk):

``latency_s``
    ``(low, high)``: every chunk is delivered that many seconds after it was
    read, drawn uniformly; order is kept, and throughput is not cut (a delay
    line, not a sleep per chunk).
``bytes_per_s``
    A token bucket shared by every connection in that direction, with
    ``burst_bytes`` of burst (e.g. ``125_000`` for a 1 Mbit/s link). To
    throttle each node's link on its own, give each node its own proxy.
``cut_after_bytes``
    Cut a connection once it has carried this many bytes in this direction
    (the chunk that would cross the mark is not delivered).
``drop_probability``
    Cut the connection on each chunk with this probability.

A chunk is what one ``recv`` returns, at most ``read_bytes``. To cut is to
close both sockets of a connection, discarding what is still queued, as a
link that drops would. :meth:`FaultProxy.refuse_connections` takes the link
down for new connections for a while (each is reset at once),
:meth:`FaultProxy.cut_all` cuts every live connection, and
:meth:`FaultProxy.link_down` does both. Random draws come from one
``random.Random(seed)``. :meth:`FaultProxy.counters` counts connections,
refusals, cuts and the bytes delivered each way.

Examples
--------
>>> with FaultProxy(target_port) as proxy:  # doctest: +SKIP
...     proxy.up.latency_s = proxy.down.latency_s = (0.1, 0.3)
...     proxy.down.bytes_per_s = 125_000  # 1 Mbit/s towards the nodes
...     channel = GrpcNodeChannel(proxy.address, certs_dir=certs, name="site-a")
...     proxy.link_down(duration_s=2.0)
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal, Self

__all__ = ["Direction", "FaultProxy", "LinkFaults", "ProxyCounters"]

Direction = Literal["up", "down"]


@dataclass
class LinkFaults:
    """The faults of one direction of the link; change any field while the proxy runs.

    Attributes
    ----------
    latency_s : tuple of float
        ``(low, high)`` delay of each chunk, in seconds, drawn uniformly.
    bytes_per_s : float, optional
        Bandwidth of the direction, in bytes per second; ``None`` is unlimited.
    burst_bytes : int
        Size of the token bucket, in bytes.
    cut_after_bytes : int, optional
        Cut a connection once it has carried this many bytes in this direction.
    drop_probability : float
        Probability of cutting the connection on each chunk.
    """

    latency_s: tuple[float, float] = (0.0, 0.0)
    bytes_per_s: float | None = None
    burst_bytes: int = 16 * 1024
    cut_after_bytes: int | None = None
    drop_probability: float = 0.0


@dataclass(frozen=True)
class ProxyCounters:
    """What the proxy did so far.

    Attributes
    ----------
    connections : int
        Connections accepted and forwarded.
    refused : int
        Connections reset while the link was down.
    cuts : int
        Live connections cut (by a fault, :meth:`FaultProxy.cut_all` or :meth:`FaultProxy.link_down`).
    bytes_up, bytes_down : int
        Bytes delivered towards the coordinator and towards the nodes.
    """

    connections: int = 0
    refused: int = 0
    cuts: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _TokenBucket:
    """Bytes per second with a burst, shared by the connections of one direction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, count: int, *, faults: LinkFaults, stop: threading.Event) -> None:
        """Block until ``count`` bytes (at most ``faults.burst_bytes``) may pass."""
        while not stop.is_set():
            rate = faults.bytes_per_s
            if rate is None:
                return
            with self._lock:
                now = time.monotonic()
                self._tokens = min(float(faults.burst_bytes), self._tokens + (now - self._stamp) * rate)
                self._stamp = now
                if self._tokens >= count:
                    self._tokens -= count
                    return
                wait_s = (count - self._tokens) / rate
            stop.wait(min(wait_s, 0.05))


class _Connection:
    """One forwarded connection: a reader and a writer thread per direction."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.sockets = (client, server)
        self.cut = threading.Event()
        self.carried = {"up": 0, "down": 0}
        self.threads: list[threading.Thread] = []
        for source, target, direction in ((client, server, "up"), (server, client, "down")):
            queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
            ready = threading.Condition()
            self.threads.append(
                threading.Thread(target=self._read, args=(source, direction, queue, ready), name=f"proxy-read-{direction}", daemon=True)
            )
            self.threads.append(
                threading.Thread(target=self._write, args=(target, direction, queue, ready), name=f"proxy-write-{direction}", daemon=True)
            )
        for thread in self.threads:
            thread.start()

    def close(self, *, counted: bool) -> None:
        """Cut the connection (``counted``: a fault, not a normal end)."""
        if self.cut.is_set():
            return
        self.cut.set()
        _shut(*self.sockets)
        if counted:
            self.proxy._count(cuts=1)

    def _read(self, source: socket.socket, direction: Direction, queue: collections.deque[tuple[float, bytes | None]],
              ready: threading.Condition) -> None:
        proxy = self.proxy
        faults = proxy.faults(direction)
        last_due = 0.0
        try:
            while not self.cut.is_set():
                data = source.recv(proxy.read_bytes)
                if not data:
                    break
                limit = faults.cut_after_bytes
                if (limit is not None and self.carried[direction] + len(data) >= limit) or (
                    faults.drop_probability > 0 and proxy._draw() < faults.drop_probability
                ):
                    self.close(counted=True)
                    return
                self.carried[direction] += len(data)
                low, high = faults.latency_s
                delay = low if high <= low else low + (high - low) * proxy._draw()
                last_due = max(last_due, time.monotonic() + delay)  # chunks keep their order
                with ready:
                    queue.append((last_due, data))
                    ready.notify()
        except OSError:
            pass
        with ready:
            queue.append((last_due, None))  # the end: deliver what is queued, then close
            ready.notify()

    def _write(self, target: socket.socket, direction: Direction, queue: collections.deque[tuple[float, bytes | None]],
               ready: threading.Condition) -> None:
        proxy = self.proxy
        faults = proxy.faults(direction)
        bucket = proxy._buckets[direction]
        try:
            while not self.cut.is_set():
                with ready:
                    while not queue and not self.cut.is_set():
                        ready.wait(0.05)
                    if self.cut.is_set():
                        return
                    due, data = queue.popleft()
                wait_s = due - time.monotonic()
                if wait_s > 0 and self.cut.wait(wait_s):
                    return
                if data is None:
                    break
                for start in range(0, len(data), max(1, faults.burst_bytes)):
                    piece = data[start : start + max(1, faults.burst_bytes)]
                    bucket.take(len(piece), faults=faults, stop=self.cut)
                    if self.cut.is_set():
                        return
                    target.sendall(piece)
                    proxy._count(**{f"bytes_{direction}": len(piece)})
        except OSError:
            pass
        self.close(counted=False)


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 with faults that can change while it runs.

    Parameters
    ----------
    target_port : int
        The coordinator's port on ``target_host``.
    target_host : str
        Where the coordinator listens.
    seed : int
        Seed of the random draws (latency, drops).
    read_bytes : int
        Largest chunk read at once, in bytes.

    Attributes
    ----------
    port : int
        Where the proxy listens on 127.0.0.1.
    up, down : LinkFaults
        The faults of each direction (``up``: towards the coordinator).
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", seed: int = 0, read_bytes: int = 16 * 1024) -> None:
        self.target = (target_host, target_port)
        self.read_bytes = read_bytes
        self.up = LinkFaults()
        self.down = LinkFaults()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counters = ProxyCounters()
        self._buckets = {"up": _TokenBucket(), "down": _TokenBucket()}
        self._connections: list[_Connection] = []
        self._refuse_until = 0.0
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for the nodes to dial."""
        return f"127.0.0.1:{self.port}"

    def faults(self, direction: Direction) -> LinkFaults:
        """The faults of ``direction`` (``"up"`` or ``"down"``)."""
        return self.up if direction == "up" else self.down

    def counters(self) -> ProxyCounters:
        """Connections, refusals, cuts and bytes delivered so far."""
        with self._lock:
            return self._counters

    def cut_all(self) -> int:
        """Cut every live connection now; returns how many were cut."""
        with self._lock:
            live = [c for c in self._connections if not c.cut.is_set()]
        for connection in live:
            connection.close(counted=True)
        return len(live)

    def refuse_connections(self, duration_s: float) -> None:
        """Reset every new connection for the next ``duration_s`` seconds; live ones go on."""
        with self._lock:
            self._refuse_until = max(self._refuse_until, time.monotonic() + duration_s)

    def link_down(self, duration_s: float) -> None:
        """The link goes down for ``duration_s`` seconds: live connections are cut and new ones refused."""
        self.refuse_connections(duration_s)
        self.cut_all()

    def close(self) -> None:
        """Stop accepting, close every connection and wait for the proxy's threads."""
        self._closed.set()
        self._listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close(counted=False)
        for connection in connections:
            for thread in connection.threads:
                thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _count(self, **increments: int) -> None:
        with self._lock:
            counters = self._counters
            self._counters = ProxyCounters(
                **{name: getattr(counters, name) + increments.get(name, 0) for name in counters.__dataclass_fields__}
            )

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                # Reset at once (no FIN handshake), as a host whose link is down would.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                self._count(refused=1)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _shut(client)
                continue
            client.settimeout(None)
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, client, server)
            with self._lock:
                self._connections = [c for c in self._connections if not c.cut.is_set()] + [connection]
            self._count(connections=1)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
