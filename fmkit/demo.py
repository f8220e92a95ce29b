"""`fmkit demo`: a local web page that samples a trained model on a click.

The page (demo.html, next to this module) asks for a seed, a solver and its steps, the guidance
weight and, for a conditional model, the controls its condition kind describes (each attribute
on / off / unspecified, the class, ...); the
server answers with the images, the NFE, the seconds taken and the first image's trajectory
from noise to picture (a model that jumps, such as MeanFlow's, shows the state after each
jump). Only Python's standard library serves it: one model, one user, loopback.

API (JSON): GET /api/model describes the model and the defaults; POST /api/generate takes
{"seed", "solver", "steps", "guidance", "count", "cond"} and returns {"images", "trajectory",
"times", "nfe", "seconds"}, images as PNG data URIs; a bad request gets {"error"} and a 4xx.

Only the page itself may drive it. Every request must name a host the server serves (the
loopback names or --host, with its port): a DNS-rebinding page, whose requests carry its own
host name, is refused. A generation must be a JSON POST (which a cross-origin page cannot send
without a CORS preflight, never granted) with a same-origin Origin header, whole, within
IDLE_TIMEOUT of silence and DEADLINE_IDLES of them in all; generations run one at a time, at
most QUEUE waiting, and the rest get 503.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import math
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from fmkit.conditions import condition_kind
from fmkit.config import SEED_MAX
from fmkit.errors import FmkitError
from fmkit.generator import Generator
from fmkit.pixels import to_pixels
from fmkit.solver import build_solver

PAGE = Path(__file__).with_name("demo.html")
MAX_COUNT, MAX_STEPS, TRAJECTORY = 16, 500, 6
MAX_BODY = 64 * 1024  # bytes of a request; a real one is a few hundred
IDLE_TIMEOUT = 10.0  # seconds a connection may stay silent (a slow or stalled client)
# A whole request (line, headers, body) must arrive within 3 idle timeouts, so a client that
# drips a byte every few seconds cannot hold a connection slot forever.
DEADLINE_IDLES = 3
QUEUE = 4  # generations admitted at once (one runs, the others wait); more get 503
MAX_CONNECTIONS = 64  # connections served at once; more are closed unanswered
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class Refused(Exception):
    """A request answered with `status` and never generated."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Demo:
    """The model behind the page: describes itself and generates one request at a time."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.lock = threading.Lock()  # one generation at a time: they share the CPU or GPU
        self.admitted = threading.BoundedSemaphore(QUEUE)  # running or waiting for the lock
        self.generations = 0  # generations run (the tests count them)

    def describe(self) -> dict[str, Any]:
        from fmkit.plugins import registry

        condition = self.generator.data.condition
        defaults = self.generator.defaults
        solvers = []
        for name in registry("solvers").names():
            try:
                adaptive = build_solver(name, steps=defaults.steps).adaptive
            except Exception:  # a solver that needs options the page does not offer
                continue
            solvers.append({"name": name, "adaptive": adaptive})
        return {
            "backbone": self.generator.spec.backbone,
            "objective": self.generator.spec.objective,
            "image_size": self.generator.data.image_size,
            "condition": {
                "kind": condition.kind,
                "names": list(condition.names),
                # what the page shows for each (the condition kind's choice)
                "controls": []
                if condition.kind == "none"
                else condition_kind(condition.kind).controls(condition),
            },
            "solvers": solvers,
            "defaults": {  # the model's own (saved with it)
                "solver": defaults.solver,
                "steps": defaults.steps,
                "guidance": defaults.guidance,
                "count": 8,
                "seed": 0,
            },
            "limits": {"count": MAX_COUNT, "steps": MAX_STEPS},
        }

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sample as the request asks; FmkitError (a 400 for the page) for bad values."""
        seed = _integer(request, "seed", 0, 0, SEED_MAX)
        count = _integer(request, "count", 8, 1, MAX_COUNT)
        defaults = self.generator.defaults
        steps = _integer(request, "steps", defaults.steps, 1, MAX_STEPS)
        guidance = _number(request, "guidance", defaults.guidance, 0.0, 20.0)
        solver_name = str(request.get("solver", defaults.solver))
        cond = _conditions(request.get("cond") or {})
        try:
            solver = defaults.solver_for(solver_name, steps).solver
        except (ValueError, TypeError) as exc:
            raise FmkitError(f"solver {solver_name}: {exc}") from None
        if not self.admitted.acquire(blocking=False):
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "busy: try again in a moment")
        try:
            with self.lock:
                self.generations += 1
                samples = self.generator.sample(
                    count,
                    cond=cond,
                    solver=solver,
                    seed=seed,
                    trajectory=TRAJECTORY,
                    guidance=guidance,
                )
        finally:
            self.admitted.release()
        frames = samples.trajectory[:, 0]  # (K, C, H, W) of the first image
        return {
            "images": [_png(image) for image in samples.images],
            "trajectory": [_png(frame) for frame in frames],
            "times": [round(float(t), 3) for t in samples.trajectory_times],
            "nfe": sum(samples.nfe),
            "seconds": round(samples.seconds, 3),
            "seed": seed,
            "solver": solver_name,
            "steps": None if solver.adaptive else steps,
        }


class _Server(ThreadingHTTPServer):
    """A threading server that serves at most MAX_CONNECTIONS connections at once, on IPv4 or
    (an address with a colon) IPv6."""

    daemon_threads = True

    def __init__(self, address, handler) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.hosts: set[str] = set()

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # a flood gets closed connections, not threads
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def allowed_hosts(host: str, port: int) -> set[str]:
    """The Host header values a server on host:port answers: the loopback names and `host`
    (an IPv6 address in brackets), each with the port (or bare, on port 80)."""
    given = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {*LOOPBACK, given.lower()}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


def serve(
    generator: Generator,
    host: str = "127.0.0.1",
    port: int = 7860,
    idle_timeout: float = IDLE_TIMEOUT,
) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0 picks a free one; see `server.server_address`);
    call `serve_forever()` on it. It answers requests for the loopback names and `host` only,
    and drops a connection silent for `idle_timeout` seconds (see the module docstring). A
    port in use is an FmkitError."""
    demo = Demo(generator)
    try:
        server = _Server((host, port), _handler(demo, idle_timeout))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FmkitError(f"port {port} on {host} is in use; pick another with --port") from None
        raise FmkitError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    server.hosts = allowed_hosts(host, server.server_address[1])
    server.demo = demo
    return server


def _handler(demo: Demo, idle_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = idle_timeout  # applied to the connection's socket: silence ends it

        def setup(self) -> None:
            super().setup()
            # Silence ends a connection; so does a request that takes too long in all.
            self.deadline = threading.Timer(DEADLINE_IDLES * idle_timeout, self._expire)
            self.deadline.daemon = True
            self.deadline.start()

        def finish(self) -> None:
            self.deadline.cancel()
            super().finish()

        def _expire(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            self.deadline.cancel()  # the request is in
            try:
                self._check_host()
            except Refused as exc:
                self._json(exc.status, {"error": str(exc)})
                return
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/model":
                self._json(HTTPStatus.OK, demo.describe())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                self._check_host()
                if self.path != "/api/generate":
                    raise Refused(HTTPStatus.NOT_FOUND, f"no endpoint {self.path}")
                self._check_origin()
                request = self._read_json()
                self.deadline.cancel()  # the request is in; the generation may take long
                result = demo.generate(request)
            except Refused as exc:
                self._json(exc.status, {"error": str(exc)})
            except (FmkitError, ValueError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:  # the page shows it; the server keeps serving
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})
            else:
                self._json(HTTPStatus.OK, result)

        def _check_host(self) -> None:
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in self.server.hosts:
                raise Refused(HTTPStatus.FORBIDDEN, f"this server does not serve host {host!r}")

        def _check_origin(self) -> None:
            origin = (self.headers.get("Origin") or "").strip().lower()
            if origin not in {f"http://{h}" for h in self.server.hosts}:
                raise Refused(
                    HTTPStatus.FORBIDDEN, "generation is for the demo's own page (Origin)"
                )
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the request must be JSON")

        def _read_json(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required") from None
            if not 0 <= length <= MAX_BODY:
                raise Refused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the request must be at most {MAX_BODY} bytes",
                )
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                body = b""
            if len(body) != length:  # the client stalled or went away mid-body
                self.close_connection = True
                raise Refused(HTTPStatus.BAD_REQUEST, "the request body ended early")
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise FmkitError("the request must be a JSON object")
            return request

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the terminal shows the URL; per-request lines would bury it

        def _json(self, status: HTTPStatus, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                if status == HTTPStatus.SERVICE_UNAVAILABLE:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client has gone; nothing to tell it
                self.close_connection = True

    return Handler


def _png(image) -> str:
    """(C, H, W) in [-1, 1] -> a PNG data URI."""
    pixels = to_pixels(image)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _integer(request: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = request.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or int(value) != value
    ):
        raise FmkitError(f"{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise FmkitError(f"{key} must be between {lo} and {hi}, got {value}")
    return int(value)


def _number(request: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = request.get(key, default)
    # NaN and infinities fail the range test too.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise FmkitError(f"{key} must be a number between {lo} and {hi}, got {value!r}")
    return float(value)


def _conditions(cond: Any) -> dict | None:
    """{"Smiling": 1, "Male": 0} (others unspecified) or {"class": NAME}: `Generator.encode`'s
    form; None values mean unspecified and are dropped."""
    if not isinstance(cond, dict):
        raise FmkitError("cond must be an object of NAME: value")
    kept = {k: v for k, v in cond.items() if v is not None}
    return kept or None
