"""`fmkit demo` under attack, over a real loopback socket (the safety issue's defect 6): only
the demo's own page may drive it. Each attack below is answered 4xx or 503 and runs no
generation (the server counts them); a bounded load test shows every request answered and
the server still serving. Also defect 7: a MeanFlow model generates, and its trajectory shows
each jump."""

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fmkit import Condition, DataSpec, Generator
from fmkit.demo import QUEUE, serve
from fmkit.generator import ModelSpec, build_backbone

TINY = {"base_channels": 8, "channel_mult": (1, 2), "attn_resolutions": (8,), "num_res_blocks": 1}
BODY = json.dumps({"seed": 1, "count": 1, "solver": "euler", "steps": 1}).encode()


def _model(folder, objective="flow_matching", **opts):
    spec = ModelSpec("unet", {**TINY, **opts}, DataSpec(3, 16, Condition()), objective)
    module = build_backbone(spec)
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    return Generator(spec, module.eval()).save_pretrained(folder)


@contextlib.contextmanager
def serving(folder, **kwargs):
    """(server, port) of the demo of `folder` on 127.0.0.1, in a thread."""
    httpd = serve(Generator.load(folder), "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("demo-security") / "model")


@pytest.fixture
def server(model):
    with serving(model, idle_timeout=0.5) as pair:
        yield pair


def raw(port, head: str, body: bytes = b"", close_early=False, timeout=10.0) -> tuple[int, dict]:
    """Send `head` (request line and headers, no blank line) and `body` as bytes; returns the
    status and the JSON answer (status 0 when the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
        if close_early:
            return 0, {}
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    if not data:
        return 0, {}
    header, _, payload = data.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    return status, (json.loads(payload) if payload.strip() else {})


def generate(port, *, host=None, origin="same", kind="application/json", body=BODY, length=None):
    host = host or f"127.0.0.1:{port}"
    lines = ["POST /api/generate HTTP/1.1", f"Host: {host}", "Connection: close"]
    if origin == "same":
        lines.append(f"Origin: http://127.0.0.1:{port}")
    elif origin:
        lines.append(f"Origin: {origin}")
    if kind:
        lines.append(f"Content-Type: {kind}")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return raw(port, "\n".join(lines), body)


def test_the_page_itself_generates(server):
    httpd, port = server
    status, answer = generate(port)
    assert status == 200 and len(answer["images"]) == 1
    assert httpd.demo.generations == 1
    for name in ("localhost", "[::1]"):  # every loopback name the server serves
        status, _ = generate(port, host=f"{name}:{port}", origin=f"http://{name}:{port}")
        assert status == 200


def test_a_cross_origin_text_plain_post_runs_nothing(server):
    """A page on another origin may POST text/plain without a CORS preflight."""
    httpd, port = server
    status, answer = generate(port, origin="http://evil.example", kind="text/plain")
    assert status == 403 and "Origin" in answer["error"]
    status, _ = generate(port, origin="http://evil.example")  # JSON: the browser preflights
    assert status == 403
    status, _ = generate(port, origin="null")  # a sandboxed frame or a file: page
    assert status == 403
    status, _ = generate(port, origin=None)  # no Origin at all
    assert status == 403
    status, answer = generate(port, kind="text/plain")  # same origin, but not JSON
    assert status == 415
    assert httpd.demo.generations == 0


def test_a_dns_rebinding_page_reads_nothing(server):
    """A page at rebind.example whose name now resolves to 127.0.0.1 sends its own Host."""
    httpd, port = server
    for path in ("/api/model", "/"):
        status, answer = raw(port, f"GET {path} HTTP/1.1\nHost: rebind.example:{port}")
        assert status == 403 and "rebind.example" in answer["error"]
    status, _ = raw(port, f"GET /api/model HTTP/1.1\nHost: 127.0.0.1:{port + 1}")  # wrong port
    assert status == 403
    status, _ = generate(
        port, host=f"rebind.example:{port}", origin=f"http://rebind.example:{port}"
    )
    assert status == 403 and httpd.demo.generations == 0
    status, model = raw(port, f"GET /api/model HTTP/1.1\nHost: localhost:{port}")
    assert status == 200 and model["backbone"] == "unet"


def test_a_body_that_never_comes_holds_no_thread_and_runs_nothing(server):
    httpd, port = server
    stalled = []
    for _ in range(8):  # Content-Length given, no body, connection held open
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = (f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Origin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BODY)}\r\n\r\n")  # fmt: skip
        conn.sendall(head.encode())
        stalled.append(conn)
    start = time.perf_counter()
    assert generate(port)[0] == 200  # served meanwhile
    for conn in stalled:  # each is answered once it has been idle for idle_timeout
        reply = conn.recv(4096)
        assert reply.startswith(b"HTTP/1.0 400") or reply == b"", reply[:40]
        conn.close()
    assert time.perf_counter() - start < 8
    assert httpd.demo.generations == 1  # only the real request


def test_a_client_dripping_bytes_is_cut_off_at_the_deadline(server):
    """A byte every so often never trips the idle timeout; the whole request has a deadline
    (3 idle timeouts), so such clients cannot hold every connection slot."""
    httpd, port = server
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode()
        try:
            for byte in head + b"a" * 100:
                conn.sendall(bytes([byte]))
                time.sleep(0.2)  # less than the 0.5 s idle timeout
        except OSError:  # the server hung up: the deadline
            pass
    assert time.perf_counter() - start < 5
    assert httpd.demo.generations == 0 and generate(port)[0] == 200


def test_the_demo_serves_ipv6_loopback(model):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        httpd = serve(Generator.load(model), "::1", 0)
    except Exception as exc:
        pytest.skip(f"cannot bind ::1 here ({exc})")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        port = httpd.server_address[1]
        with socket.create_connection(("::1", port), timeout=10) as conn:
            conn.sendall(f"GET /api/model HTTP/1.1\r\nHost: [::1]:{port}\r\n\r\n".encode())
            assert conn.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_short_and_abandoned_bodies_run_nothing(server):
    httpd, port = server
    status, answer = generate(port, body=BODY[:10], length=len(BODY))  # short, then silence
    assert status == 400 and "ended early" in answer["error"]
    head = (f"POST /api/generate HTTP/1.1\nHost: 127.0.0.1:{port}\nOrigin: http://127.0.0.1:"
            f"{port}\nContent-Type: application/json\nContent-Length: 500")  # fmt: skip
    raw(port, head, BODY[:20], close_early=True)  # the client goes away mid-upload
    time.sleep(1.0)
    status, _ = generate(port, length="many")
    assert status == 411
    status, _ = generate(port, body=b"", length=70000)  # refused before a byte is read
    assert status == 413
    assert httpd.demo.generations == 0
    assert generate(port)[0] == 200


def test_a_busy_server_answers_503_instead_of_queueing_without_limit(server):
    httpd, port = server
    httpd.demo.lock.acquire()  # a long generation is running
    held = True
    try:
        with ThreadPoolExecutor(QUEUE + 3) as pool:
            waiting = [pool.submit(generate, port) for _ in range(QUEUE)]
            time.sleep(1.0)  # the first QUEUE requests are admitted and wait for the lock
            refused = [pool.submit(generate, port) for _ in range(3)]
            assert [f.result()[0] for f in refused] == [503] * 3
            assert all(not f.done() for f in waiting)
            httpd.demo.lock.release()
            held = False
            assert [f.result()[0] for f in waiting] == [200] * QUEUE
    finally:
        if held:
            httpd.demo.lock.release()
    assert httpd.demo.generations == QUEUE


def test_200_requests_from_20_clients_are_all_answered(server):
    httpd, port = server
    start = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: generate(port)[0], range(200)))
    assert time.perf_counter() - start < 120
    # Clients that do not wait between tries get many 503s; every request gets an answer.
    assert set(statuses) <= {200, 503} and statuses.count(200) >= QUEUE, statuses
    assert httpd.demo.generations == statuses.count(200)
    assert generate(port)[0] == 200  # still serving


def test_a_meanflow_model_generates_and_shows_each_jump(tmp_path):
    """Defect 7: the demo always asked for a trajectory and the MeanFlow objective refused."""
    folder = _model(tmp_path / "meanflow", "meanflow", two_times=True)
    with serving(folder) as (httpd, port):
        # Jumps follow the solver's grid: a MeanFlow model's own (its saved sampling defaults)
        # is euler on the uniform grid.
        for steps, times in ((1, [0.0, 1.0]), (2, [0.0, 0.5, 1.0])):
            body = json.dumps({"seed": 0, "count": 2, "solver": "euler", "steps": steps})
            status, answer = generate(port, body=body.encode())
            assert status == 200, answer
            assert answer["nfe"] == steps and answer["times"] == times
            assert len(answer["trajectory"]) == steps + 1 and len(answer["images"]) == 2
        # Many jumps: the trajectory shows six of them, spread evenly, not one per jump.
        body = json.dumps({"seed": 0, "count": 1, "solver": "euler", "steps": 50}).encode()
        status, answer = generate(port, body=body)
        assert status == 200 and answer["nfe"] == 50
        assert (
            len(answer["trajectory"]) == 6 and answer["times"][0] == 0 and answer["times"][-1] == 1
        )
