"""`fmkit demo`: a local web page that samples a trained model on a click.

The page (demo.html, next to this module) asks for a seed, a solver and its steps, the guidance
weight and, for a conditional model, each attribute (on / off / unspecified) or the class; the
server answers with the images, the NFE, the seconds taken and the first image's trajectory
from noise to picture. Only Python's standard library serves it: one model, one user, loopback.

API (JSON): GET /api/model describes the model and the defaults; POST /api/generate takes
{"seed", "solver", "steps", "guidance", "count", "cond"} and returns {"images", "trajectory",
"times", "nfe", "seconds"}, images as PNG data URIs; a bad request gets {"error"} and status 400.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import math
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from fmkit.errors import FmkitError
from fmkit.generator import GUIDANCE, GUIDANCE_INTERVAL, SAMPLE_SOLVER, SAMPLE_STEPS, Generator
from fmkit.pixels import to_pixels
from fmkit.solver import build_solver

PAGE = Path(__file__).with_name("demo.html")
MAX_COUNT, MAX_STEPS, TRAJECTORY = 16, 500, 6
MAX_BODY = 64 * 1024  # bytes of a request; a real one is a few hundred


class Demo:
    """The model behind the page: describes itself and generates one request at a time."""

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.lock = threading.Lock()  # one generation at a time: they share the CPU or GPU

    def describe(self) -> dict[str, Any]:
        from fmkit.plugins import registry

        condition = self.generator.data.condition
        solvers = []
        for name in registry("solvers").names():
            try:
                adaptive = build_solver(name, steps=SAMPLE_STEPS).adaptive
            except Exception:  # a solver that needs options the page does not offer
                continue
            solvers.append({"name": name, "adaptive": adaptive})
        return {
            "backbone": self.generator.spec.backbone,
            "objective": self.generator.spec.objective,
            "image_size": self.generator.data.image_size,
            "condition": {"kind": condition.kind, "names": list(condition.names)},
            "solvers": solvers,
            "defaults": {
                "solver": SAMPLE_SOLVER,
                "steps": SAMPLE_STEPS,
                "guidance": GUIDANCE,
                "count": 8,
                "seed": 0,
            },
            "limits": {"count": MAX_COUNT, "steps": MAX_STEPS},
        }

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Sample as the request asks; FmkitError (a 400 for the page) for bad values."""
        seed = _integer(request, "seed", 0, 0, 2**63 - 1)
        count = _integer(request, "count", 8, 1, MAX_COUNT)
        steps = _integer(request, "steps", SAMPLE_STEPS, 1, MAX_STEPS)
        guidance = _number(request, "guidance", GUIDANCE, 0.0, 20.0)
        solver_name = str(request.get("solver", SAMPLE_SOLVER))
        cond = _conditions(request.get("cond") or {})
        try:
            solver = build_solver(solver_name, steps=steps)
        except (ValueError, TypeError) as exc:
            raise FmkitError(f"solver {solver_name}: {exc}") from None
        with self.lock:
            samples = self.generator.sample(
                count,
                cond=cond,
                solver=solver,
                seed=seed,
                trajectory=TRAJECTORY,
                guidance=guidance,
                interval=GUIDANCE_INTERVAL,
            )
        frames = samples.trajectory[:, 0]  # (K, C, H, W) of the first image
        return {
            "images": [_png(image) for image in samples.images],
            "trajectory": [_png(frame) for frame in frames],
            "times": [round(i / (TRAJECTORY - 1), 3) for i in range(TRAJECTORY)],
            "nfe": sum(samples.nfe),
            "seconds": round(samples.seconds, 3),
            "seed": seed,
            "solver": solver_name,
            "steps": None if solver.adaptive else steps,
        }


def serve(generator: Generator, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0 picks a free one; see `server.server_address`);
    call `serve_forever()` on it. A port in use is an FmkitError."""
    demo = Demo(generator)
    try:
        server = ThreadingHTTPServer((host, port), _handler(demo))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise FmkitError(f"port {port} on {host} is in use; pick another with --port") from None
        raise FmkitError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    return server


def _handler(demo: Demo) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server name)
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/model":
                self._json(HTTPStatus.OK, demo.describe())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/api/generate":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                if not 0 <= length <= MAX_BODY:
                    raise FmkitError(f"the request must be at most {MAX_BODY} bytes")
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise FmkitError("the request must be a JSON object")
                result = demo.generate(request)
            except (FmkitError, ValueError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:  # the page shows it; the server keeps serving
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})
            else:
                self._json(HTTPStatus.OK, result)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the terminal shows the URL; per-request lines would bury it

        def _json(self, status: HTTPStatus, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

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
