"""Downloading files that survive real networks: resume (HTTP Range), retries with backoff,
a progress bar, an MD5 check, and no partially written file ever taken for a good one."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from fmkit.errors import FmkitError

CHUNK = 1 << 20


class DownloadError(FmkitError):
    """A download failed for good (after retries), or delivered the wrong bytes."""


class HtmlInsteadOfFile(DownloadError):
    """The server sent a web page (a quota notice, a login page) instead of the file."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest`, resuming a previous partial download.

    Bytes go to `dest.part` first; only a complete file whose MD5 matches is renamed to `dest`.
    A mismatching file is deleted (resuming from bad bytes would never succeed).

    Args:
        md5: expected hex digest; None skips the check.
        retries: attempts after a network error or a transfer cut short.
        backoff: first wait in seconds between attempts; doubles each time.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch(url, part, timeout, progress, dest.name)
            break
        except HtmlInsteadOfFile:
            part.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            last_error = exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (ConnectionRefusedError, socket.gaierror)):
                # No route to the host at all: retrying will not help, fail fast.
                raise DownloadError(f"{url}: cannot connect ({exc.reason})") from None
            last_error = exc
        except (http.client.HTTPException, TimeoutError, OSError) as exc:
            last_error = exc
    else:
        reason = getattr(last_error, "reason", last_error)
        raise DownloadError(f"{url}: failed after {retries + 1} attempts ({reason})")
    if md5 is not None:
        actual = md5sum(part)
        if actual != md5:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{dest.name} from {url} has MD5 {actual}, expected {md5}; the file was deleted"
            )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, timeout: float, progress: bool, label: str) -> None:
    """One attempt: append to `part` from where it ends; raise if the transfer is cut short."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fmkit"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left to fetch: the part is complete
            return
        raise
    with response:
        if start and response.status != 206:  # server ignored Range: start over
            start = 0
        if "text/html" in response.headers.get("Content-Type", ""):
            page = response.read(4096).decode("utf-8", "replace")
            raise HtmlInsteadOfFile(_explain_html(url, page))
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            open(part, "ab" if start else "wb") as out,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                desc=label,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)


def _explain_html(url: str, page: str) -> str:
    lowered = page.lower()
    if "quota" in lowered or "too many users" in lowered:
        why = "the file's download quota is exceeded (Google Drive allows a limited number a day)"
    elif "virus scan" in lowered or "confirm" in lowered:
        why = "the server asks for a confirmation that a script cannot give"
    else:
        why = "the server returned a web page"
    return f"{url} sent an HTML page instead of the file: {why}"


def unreachable(urls: list[str], timeout: float = 5.0) -> dict[str, str]:
    """Why each of `urls` whose host cannot be reached is unreachable (a short reason); the
    reachable ones, and those reached through a proxy ($HTTPS_PROXY, ...), are left out. Hosts
    are tried at once, in parallel, for at most about `timeout` seconds: a machine without
    network learns it in seconds, not after minutes of retries per file.
    """
    reasons: dict[str, str] = {}
    proxies = urllib.request.getproxies()
    # Through a proxy only the proxy can say whether a host is reachable: leave those URLs to
    # the download itself.
    urls = [
        u
        for u in urls
        if urllib.parse.urlsplit(u).scheme not in proxies
        or urllib.request.proxy_bypass(urllib.parse.urlsplit(u).hostname or "")
    ]

    def probe(url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except socket.gaierror:
            reasons[url] = f"cannot resolve {host}"
        except TimeoutError:
            reasons[url] = f"{host} did not answer within {timeout:g} s"
        except OSError as exc:
            reasons[url] = f"cannot connect to {host} ({exc.strerror or type(exc).__name__})"

    # Daemon threads: a resolver that hangs must not keep the process alive after the error.
    threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 1
    for url, thread in zip(urls, threads, strict=True):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            reasons.setdefault(url, f"{urllib.parse.urlsplit(url).hostname} did not answer")
    return reasons
