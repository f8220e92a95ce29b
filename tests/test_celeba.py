"""CelebA: the real download code against a loopback HTTP server, and the real parsing and
cropping code on a CelebA-shaped folder."""

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import one_line_error
from PIL import Image

import fmkit_plugins.celeba as celeba_plugin
from fmkit import FmkitError, load_celeba_data
from fmkit.data import build_dataset
from fmkit.download import DownloadError, download

N = 12  # images: 8 train, 2 valid, 2 test
ATTRS = ["5_o_Clock_Shadow", "Smiling", "Young"]


def face(i: int) -> bytes:
    """A 178x218 image: blue, with the DDIM crop window painted red."""
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    pixels[57:185, 25:153] = (255, 0, i * 10)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")  # lossless, so colours are exact
    return out.getvalue()


def celeba_files() -> dict[str, bytes]:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(1, N + 1):
            zf.writestr(f"img_align_celeba/{i:06d}.jpg", face(i))
    split = lambda i: 0 if i <= 8 else (1 if i <= 10 else 2)  # noqa: E731
    partition = "".join(f"{i:06d}.jpg {split(i)}\n" for i in range(1, N + 1))
    rows = "".join(
        f"{i:06d}.jpg {' '.join('1' if (i + a) % 2 else '-1' for a in range(len(ATTRS)))}\n"
        for i in range(1, N + 1)
    )
    attributes = f"{N}\n{' '.join(ATTRS)}\n{rows}"
    return {
        "img_align_celeba.zip": archive.getvalue(),
        "list_eval_partition.txt": partition.encode(),
        "list_attr_celeba.txt": attributes.encode(),
    }


class Server:
    """Serves files with Range support; can cut a file's first transfer halfway, answer with an
    HTML quota page, or serve wrong bytes. Records every request."""

    def __init__(self, files):
        self.files = dict(files)
        self.cut_once: set[str] = set()
        self.html: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name in server.html:
                    body = b"<html><body>Google Drive - Quota exceeded</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.close()  # the transfer breaks off halfway
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def files():
    return celeba_files()


@pytest.fixture
def server(files, monkeypatch):
    # The test's files stand in for the official ones: expect their MD5s.
    specs = tuple(
        celeba_plugin.CelebAFile(s.name, s.gdrive_id, hashlib.md5(files[s.name]).hexdigest())
        for s in celeba_plugin.FILES
    )
    monkeypatch.setattr(celeba_plugin, "FILES", specs)
    srv = Server(files)
    yield srv
    srv.close()


def test_download_resumes_after_a_cut_transfer(tmp_path, server, files):
    server.cut_once.add("img_align_celeba.zip")
    md5 = hashlib.md5(files["img_align_celeba.zip"]).hexdigest()
    dest = download(
        f"{server.url}/img_align_celeba.zip", tmp_path / "x.zip", md5, backoff=0.01, progress=False
    )
    assert dest.read_bytes() == files["img_align_celeba.zip"]
    ranges = [r for name, r in server.requests if name == "img_align_celeba.zip"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert not (tmp_path / "x.zip.part").exists()


def test_md5_mismatch_is_an_error_and_the_file_is_not_kept(tmp_path, server):
    with pytest.raises(DownloadError, match="expected 0+"):
        download(f"{server.url}/list_attr_celeba.txt", tmp_path / "a.txt", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_html_quota_page_is_detected_and_explained(tmp_path, server):
    server.html.add("list_attr_celeba.txt")
    with pytest.raises(DownloadError, match="HTML page instead of the file.*quota"):
        download(f"{server.url}/list_attr_celeba.txt", tmp_path / "a.txt", None, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_celeba_downloads_extracts_and_splits(tmp_path, server):
    server.cut_once.add("img_align_celeba.zip")
    opts = {"mirror_url": server.url}
    train = build_dataset("celeba", str(tmp_path), 16, "train", opts)
    assert len(train) == 8
    assert (tmp_path / "celeba" / "img_align_celeba" / "000001.jpg").is_file()
    assert len(build_dataset("celeba", str(tmp_path), 16, "valid", opts)) == 2
    assert len(build_dataset("celeba", str(tmp_path), 16, "test", opts)) == 2
    assert len(build_dataset("celeba", str(tmp_path), 16, "all", opts)) == N
    image = train[0]
    assert image.shape == (3, 16, 16)
    # The default DDIM crop keeps only the red window.
    assert image[0].min() > 0.95 and image[2].max() < -0.6


def test_files_already_present_cause_no_request(tmp_path, server):
    build_dataset("celeba", str(tmp_path), 8, options={"mirror_url": server.url})
    before = len(server.requests)
    build_dataset("celeba", str(tmp_path), 8, options={"mirror_url": server.url})
    assert len(server.requests) == before


def test_crop_presets_and_attribute_labels(tmp_path, server):
    opts = {"mirror_url": server.url}
    full = build_dataset(
        "celeba", str(tmp_path), 16, "all", {**opts, "crop": "full"}, condition="attributes"
    )
    image, attrs = full[0]
    assert image[2].max() > 0.9  # the full crop shows blue outside the window
    assert full.attributes == ATTRS
    assert attrs.tolist() == [1 if (1 + a) % 2 else 0 for a in range(3)]
    c140 = build_dataset("celeba", str(tmp_path), 16, "all", {**opts, "crop": "center140"})[0]
    assert not np.allclose(c140.numpy(), image.numpy())


def test_seed_loader_api(tmp_path, server):
    loader = load_celeba_data(
        batch_size=4, data_dir=str(tmp_path), image_size=8, mirror_url=server.url
    )
    batch = next(iter(loader))
    assert batch.shape == (4, 3, 8, 8)
    images, attributes = next(
        iter(load_celeba_data(4, str(tmp_path), 8, mirror_url=server.url, labels=True))
    )
    assert images.shape == (4, 3, 8, 8) and attributes.shape == (4, len(ATTRS))


def test_md5_mismatch_through_celeba_names_the_files_to_place(tmp_path, server):
    server.files["list_attr_celeba.txt"] = b"tampered"
    with pytest.raises(FmkitError) as err:
        build_dataset("celeba", str(tmp_path), 8, options={"mirror_url": server.url})
    message = str(err.value)
    assert "has MD5" in message and "list_attr_celeba.txt" in message
    assert str((tmp_path / "celeba").resolve()) in message
    assert not (tmp_path / "celeba" / "list_attr_celeba.txt").exists()


def test_a_hand_placed_file_that_is_not_the_official_one_is_named_and_kept(tmp_path, server):
    folder = tmp_path / "celeba"
    folder.mkdir()
    (folder / "list_eval_partition.txt").write_bytes(b"my own partition\n")
    with pytest.raises(FmkitError) as err:
        build_dataset("celeba", str(tmp_path), 8, options={"mirror_url": server.url})
    wrong = hashlib.md5(b"my own partition\n").hexdigest()
    assert str(err.value).startswith(
        f"{folder / 'list_eval_partition.txt'} is not the official list_eval_partition.txt: "
        f"its MD5 is {wrong}"
    )
    assert (folder / "list_eval_partition.txt").read_bytes() == b"my own partition\n"
    assert server.requests == []  # refused before anything was downloaded


def test_no_network_says_where_to_put_the_files(tmp_path, server, run_cli):
    server.close()
    dead = server.url  # nothing listens there any more
    result = run_cli(
        "prepare",
        "celeba",
        "--data-dir",
        tmp_path / "data",
        "--out",
        tmp_path / "o",
        "--dataset-opt",
        f"mirror_url='{dead}'",
    )
    line = one_line_error(result)
    assert "could not get CelebA" in line and "img_align_celeba.zip" in line
    assert str((tmp_path / "data" / "celeba").resolve()) in line


def test_first_run_without_network_fails_fast_in_one_line(tmp_path, monkeypatch, run_cli):
    # Hosts under .invalid never resolve (RFC 2606): what a machine without network sees for
    # both default sources. Nothing may be retried for minutes, and no run directory is left.
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(celeba_plugin, "GDRIVE_URL", "https://drive.fmkit-test.invalid/{id}")
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.fmkit-test.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)  # a direct connection, as a laptop has
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    result = run_cli("train", "--backbone", "unet", "--dataset", "celeba")
    seconds = time.monotonic() - start
    line = one_line_error(result)
    assert seconds < 10, seconds
    assert "Google Drive: cannot resolve drive.fmkit-test.invalid" in line
    assert "Hugging Face: cannot resolve hub.fmkit-test.invalid" in line
    assert line.count("cannot resolve") == 2  # one reason per source, not per file
    assert f"in {(tmp_path / 'data' / 'celeba').resolve()}/" in line
    assert len(line) - len(str(tmp_path)) < 300
    assert not (tmp_path / "results").exists()


def test_hosts_reached_through_a_proxy_are_left_to_the_download(monkeypatch):
    from fmkit.download import unreachable

    url = "https://drive.fmkit-test.invalid/file"
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert unreachable([url]) == {url: "cannot resolve drive.fmkit-test.invalid"}
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # only the proxy knows the way
    assert unreachable([url]) == {}
