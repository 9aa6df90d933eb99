"""The dashboard's HTTP server: a read-only page and a small JSON API.

Routes (GET and HEAD only)::

    /                        the page (page.html)
    /api/status              LiveState.snapshot()
    /api/events?since=N      the events from number N on (at most 1000 a call)
    /api/plots/<name>.png    a plot of the run so far (fedcare.report.plots)
    /api/health              {"ok": true}

The server binds to the loopback interface unless told otherwise; on any
other interface it needs a bearer token, TLS, or both. It never logs tokens or
query strings.
"""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Self

from fedcare.dashboard.state import LiveState
from fedcare.errors import ConfigError
from fedcare.plan import Plan

__all__ = [
    "PLOT_NAMES",
    "DashboardServer",
    "dashboard_tls_context",
    "is_loopback",
    "new_token",
    "parse_listen",
    "start_dashboard",
]

logger = logging.getLogger(__name__)

#: The plots the page asks for, in the order it shows them.
PLOT_NAMES: Final = ("learning_curves", "roc", "epsilon", "participation", "traffic")

#: At most this many events go back in one ``/api/events`` answer; page with ``since``.
MAX_EVENTS_PER_REQUEST: Final = 1000

_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_ALLOWED: Final = "GET, HEAD"
_REQUEST_TIMEOUT_S: Final = 30.0


def new_token() -> str:
    """A fresh random bearer token for the dashboard (256 bits, URL-safe).

    Returns
    -------
    str
        43 URL-safe characters from the OS's random source.

    Examples
    --------
    >>> token = new_token()
    >>> len(token), token != new_token()
    (43, True)
    """
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface (``localhost``, ``127.0.0.0/8``, ``::1``).

    Any other name counts as reachable from the network, including ``0.0.0.0``
    and host names (which are not resolved).

    Parameters
    ----------
    host : str
        A host name or IP address, IPv6 with or without brackets.

    Returns
    -------
    bool

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("[::1]"), is_loopback("0.0.0.0"), is_loopback("ward.example")
    (True, True, False, False)
    """
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_listen(listen: str) -> tuple[str, int]:
    """Split a ``HOST:PORT`` listen address; IPv6 hosts go in brackets (``[::1]:8080``).

    Parameters
    ----------
    listen : str
        The address, e.g. ``"127.0.0.1:8050"``; port 0 picks a free port.

    Returns
    -------
    tuple of (str, int)
        The host (without brackets) and the port.

    Raises
    ------
    ConfigError
        If the value is not ``HOST:PORT`` or the port is not in 0-65535
        (field ``dashboard.listen``).

    Examples
    --------
    >>> parse_listen("127.0.0.1:8050"), parse_listen("[::1]:0")
    (('127.0.0.1', 8050), ('::1', 0))
    """
    host, sep, port_text = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: ambiguous
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(
            f"expected HOST:PORT such as 127.0.0.1:8050 (IPv6 as [::1]:8050), got {listen!r}",
            field="dashboard.listen",
        )
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"port must be in 0-65535, got {port}", field="dashboard.listen")
    return host, port


def dashboard_tls_context(certs_dir: Path, *, require_client_cert: bool) -> ssl.SSLContext:
    """A server TLS context from the federation's certificates (TLS 1.2 or later).

    Uses ``server.pem`` and ``server.key`` as the dashboard's certificate and,
    with ``require_client_cert``, admits only clients presenting a certificate
    signed by the federation's ``ca.pem`` (and not revoked in ``crl.pem``, if
    present; the list is read once, when the context is made).

    Parameters
    ----------
    certs_dir : Path
        The coordinator's certificates directory (see
        :func:`fedcare.transport.pki.init_ca` and
        :func:`fedcare.transport.pki.issue_certificate`).
    require_client_cert : bool
        Refuse clients without a certificate from the federation's CA.

    Returns
    -------
    ssl.SSLContext

    Raises
    ------
    ConfigError
        If a file is missing or cannot be loaded (field ``dashboard.certs_dir``;
        the message names the file, not the directory).

    Examples
    --------
    >>> import tempfile
    >>> from fedcare.transport.pki import init_ca, issue_certificate
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = init_ca(tmp, federation="demo")
    ...     _ = issue_certificate(tmp, role="server", name="coordinator")
    ...     context = dashboard_tls_context(Path(tmp), require_client_cert=True)
    >>> context.verify_mode == ssl.CERT_REQUIRED
    True
    """
    certs = Path(certs_dir)
    needed = ["server.pem", "server.key"] + (["ca.pem"] if require_client_cert else [])
    for name in needed:
        if not (certs / name).is_file():
            raise ConfigError(
                f"the certificates directory has no {name}; point to the coordinator's certificates, "
                "or make them with `fedcare certs init` and `fedcare certs issue --role server`",
                field="dashboard.certs_dir",
            )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(certs / "server.pem"), str(certs / "server.key"))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load server.pem with server.key ({type(exc).__name__}); check they belong together",
            field="dashboard.certs_dir",
        ) from None
    if require_client_cert:
        try:
            context.load_verify_locations(cafile=str(certs / "ca.pem"))
            if (certs / "crl.pem").is_file():
                context.load_verify_locations(cafile=str(certs / "crl.pem"))
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot load ca.pem or crl.pem ({type(exc).__name__})", field="dashboard.certs_dir"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class _Server(ThreadingHTTPServer):
    """A threading HTTP server whose TLS handshakes happen in the request threads."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: DashboardServer, tls: ssl.SSLContext | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.tls = tls
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_REQUEST_TIMEOUT_S)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.debug("dashboard refused a TLS handshake", extra={"error_kind": type(exc).__name__})
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            try:
                wrapped.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("dashboard request failed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedcare-dashboard"
    sys_version = ""
    timeout = _REQUEST_TIMEOUT_S

    # -- logging: the path only, never the query string or headers ---------------

    def _path_only(self) -> str:
        raw = getattr(self, "path", "") or ""
        return urllib.parse.urlsplit(raw).path[:200]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("dashboard request", extra={"path": self._path_only()})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        logger.debug("dashboard request", extra={"path": self._path_only(), "status": str(code)})

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        logger.debug("dashboard request error", extra={"path": self._path_only()})

    # -- responses ----------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", extra)

    def _error(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": message, "status": status}, extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's HTML error page would lack the security headers, and its message
        # can echo the request line, query string (and token) included: say only the phrase.
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # send headers even to a request too broken to parse
        self._error(code, HTTPStatus(code).phrase)

    # -- methods ------------------------------------------------------------------

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "the dashboard is read-only: use GET or HEAD", {"Allow": _ALLOWED})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _route(self) -> None:
        app = self.server.app
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        if not app._authorized(self.headers.get("Authorization"), query.get("token")):
            self._error(
                HTTPStatus.UNAUTHORIZED,
                "a token is needed: send 'Authorization: Bearer <token>' or open the URL with ?token=<token>",
                {"WWW-Authenticate": 'Bearer realm="fedcare dashboard"'},
            )
            return
        path = split.path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, app._page_html(), "text/html; charset=utf-8")
        elif path == "/api/health":
            self._send_json(HTTPStatus.OK, {"ok": True})
        elif path == "/api/status":
            self._send_json(HTTPStatus.OK, app.state.snapshot())
        elif path == "/api/events":
            self._events(query)
        elif path.startswith("/api/plots/") and path.endswith(".png"):
            self._plot(path[len("/api/plots/") : -len(".png")])
        else:
            self._error(HTTPStatus.NOT_FOUND, "no such page; see /api/status, /api/events, /api/plots/<name>.png")

    def _events(self, query: dict[str, list[str]]) -> None:
        raw = query.get("since", ["0"])[-1]
        if not raw.isdigit():
            self._error(HTTPStatus.BAD_REQUEST, f"since must be a whole number >= 0, got {raw[:20]!r}")
            return
        since = int(raw)
        first, events, seen = self.server.app.state._window(since, MAX_EVENTS_PER_REQUEST)
        self._send_json(
            HTTPStatus.OK, {"since": since, "first": first, "next": first + len(events), "seen": seen, "events": events}
        )

    def _plot(self, name: str) -> None:
        if name not in PLOT_NAMES:
            self._error(HTTPStatus.NOT_FOUND, f"no plot {name[:40]!r}; plots: {', '.join(PLOT_NAMES)}")
            return
        try:
            png = self.server.app._plot_png(name)
        except _PlotsUnavailable:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "plots unavailable")
            return
        except Exception as exc:  # a plot that cannot be drawn must not take the page down
            logger.warning("dashboard plot failed", extra={"plot": name, "error_kind": type(exc).__name__})
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the {name} plot could not be drawn")
            return
        if png is None:
            self._send(HTTPStatus.NO_CONTENT, b"", "image/png")
        else:
            self._send(HTTPStatus.OK, png, "image/png")


class _PlotsUnavailable(Exception):
    """``fedcare.report`` is not installed."""


class DashboardServer:
    """Serves the dashboard of one run from a daemon thread.

    Starts listening when made; :meth:`close` (or leaving the ``with`` block)
    stops it.

    Parameters
    ----------
    state : LiveState
        The run's live state, fed by the coordinator's ``on_event``.
    host : str, default "127.0.0.1"
        The interface to bind. Anything but loopback needs ``token`` or ``tls``.
    port : int, default 0
        The TCP port; 0 picks a free one (see :attr:`port`).
    token : str, optional
        A bearer token every request must carry (``Authorization: Bearer``
        header or ``?token=`` query parameter); see :func:`new_token`.
    tls : ssl.SSLContext, optional
        Serve HTTPS with this context; see :func:`dashboard_tls_context`.

    Raises
    ------
    ConfigError
        If ``host`` is not loopback and neither ``token`` nor ``tls`` is given,
        the token is empty, or the address cannot be bound (field
        ``dashboard``).

    Examples
    --------
    >>> import json, urllib.request
    >>> with DashboardServer(LiveState()) as server:
    ...     with urllib.request.urlopen(server.url + "api/health") as answer:
    ...         print(json.load(answer))
    {'ok': True}
    """

    def __init__(
        self,
        state: LiveState,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        host = host.strip().strip("[]")
        if token is not None and not token.strip():
            raise ConfigError("the token is empty; pass None for no token or use new_token()", field="dashboard")
        if not is_loopback(host) and token is None and tls is None:
            raise ConfigError(
                f"binding the dashboard to {host!r}, which is reachable from the network, needs a token, TLS "
                "or both: the page shows who takes part and how the model does; bind 127.0.0.1 and use an "
                "SSH tunnel, or pass a token (new_token()) and the federation's certificates",
                field="dashboard",
            )
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in 0-65535, got {port}", field="dashboard")
        self.state = state
        self.host = host
        self._token = token.encode("utf-8") if token is not None else None
        self._tls = tls
        self._page: bytes | None = None
        self._plot_cache: dict[str, tuple[int, bytes | None]] = {}
        self._plot_locks = {name: threading.Lock() for name in PLOT_NAMES}
        try:
            self._httpd = _Server((host, port), self, tls)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or type(exc).__name__}); choose another port",
                field="dashboard",
            ) from None
        self.port: int = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fedcare-dashboard", daemon=True
        )
        self._thread.start()
        self._closed = False
        logger.info("dashboard listening", extra={"port": self.port, "tls": tls is not None})

    # -- addresses ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """The page's address, without the token (e.g. ``http://127.0.0.1:8050/``)."""
        scheme = "https" if self._tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def url_with_token(self) -> str:
        """The page's address with ``?token=`` when a token is set (else :attr:`url`); treat it as a secret.

        Returns
        -------
        str

        Examples
        --------
        >>> with DashboardServer(LiveState(), token="abc") as server:
        ...     server.url_with_token().endswith("/?token=abc")
        True
        """
        if self._token is None:
            return self.url
        return f"{self.url}?token={urllib.parse.quote(self._token.decode('utf-8'), safe='')}"

    # -- used by the handler --------------------------------------------------------

    def _authorized(self, header: str | None, query_tokens: list[str] | None) -> bool:
        """Whether a request carries the token (always true without one); compared in constant time."""
        if self._token is None:
            return True
        offered: list[str] = []
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer":
                offered.append(value.strip())
        offered.extend(query_tokens or [])
        ok = False
        for candidate in offered:
            ok |= hmac.compare_digest(candidate.encode("utf-8"), self._token)
        return ok

    def _page_html(self) -> bytes:
        """The page's HTML, read once from the package data."""
        if self._page is None:
            self._page = importlib.resources.files("fedcare.dashboard").joinpath("page.html").read_bytes()
        return self._page

    def _plot_png(self, name: str) -> bytes | None:
        """The PNG of plot ``name`` for the events seen so far (None: no data yet), drawn once per new event.

        Raises
        ------
        _PlotsUnavailable
            If ``fedcare.report`` cannot be imported.
        """
        seen = self.state.events_seen
        cached = self._plot_cache.get(name)
        if cached is not None and cached[0] == seen:
            return cached[1]
        with self._plot_locks[name]:
            cached = self._plot_cache.get(name)
            seen = self.state.events_seen
            if cached is not None and cached[0] == seen:
                return cached[1]
            draw, from_events = _load_plots(name)
            plan = self.state.plan
            record = from_events(self.state._window(0, None)[1], plan=plan.model_dump(mode="json") if plan is not None else None)
            png = draw(record)
            self._plot_cache[name] = (seen, png)
            return png

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice.

        Examples
        --------
        >>> server = DashboardServer(LiveState())
        >>> server.close(); server.close()
        """
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _load_plots(name: str) -> tuple[Callable[[Any], bytes | None], Callable[..., Any]]:
    """The plot function ``name`` and ``RunRecord.from_events``, imported when first asked for (matplotlib is heavy)."""
    try:
        from fedcare.report.plots import PLOTS
        from fedcare.report.record import RunRecord
    except ImportError:
        raise _PlotsUnavailable() from None
    draw = PLOTS.get(name)
    if draw is None:
        raise _PlotsUnavailable()
    return draw, RunRecord.from_events


def start_dashboard(
    plan: Plan,
    *,
    listen: str = "127.0.0.1:0",
    token: str | None = None,
    certs_dir: Path | None = None,
    nodes_online: Callable[[], list[str]] | None = None,
    statuses: Callable[[], dict[str, tuple[str, str]]] | None = None,
) -> tuple[DashboardServer, LiveState]:
    """Start a run's dashboard: parse the address, pick the protection, serve.

    Off loopback a token is generated when none is given; with ``certs_dir``
    the dashboard serves HTTPS with the federation's certificates and admits
    only clients holding a certificate from its CA.

    Parameters
    ----------
    plan : Plan
        The plan being run.
    listen : str, default "127.0.0.1:0"
        ``HOST:PORT`` to bind (``[::1]:8050`` for IPv6); port 0 picks a free one.
    token : str, optional
        The bearer token; generated (:func:`new_token`) off loopback if None.
    certs_dir : Path, optional
        The coordinator's certificates directory (``server.pem``,
        ``server.key``, ``ca.pem``, ``crl.pem``).
    nodes_online : callable, optional
        The transport's ``nodes``.
    statuses : callable, optional
        The transport's ``statuses``.

    Returns
    -------
    tuple of (DashboardServer, LiveState)
        The running server (give :meth:`DashboardServer.url_with_token` to the
        reader; close it when the run ends) and the state to pass as the
        coordinator's ``on_event`` (``state.on_event``).

    Raises
    ------
    ConfigError
        If ``listen`` is malformed, the certificates cannot be loaded or the
        port cannot be bound.

    Examples
    --------
    >>> from fedcare.plan import parse_plan
    >>> plan = parse_plan({"task": "tabular-logistic", "rounds": 2, "dataset": {"name": "breast-cancer"}})
    >>> server, state = start_dashboard(plan)
    >>> server.url.startswith("http://127.0.0.1:"), state.snapshot()["rounds_planned"]
    (True, 2)
    >>> server.close()
    """
    host, port = parse_listen(listen)
    if token is None and not is_loopback(host):
        token = new_token()
    tls = dashboard_tls_context(Path(certs_dir), require_client_cert=True) if certs_dir is not None else None
    state = LiveState(plan, nodes_online=nodes_online, statuses=statuses)
    server = DashboardServer(state, host=host, port=port, token=token, tls=tls)
    return server, state
