"""`fmkit demo`: the page's API over a real loopback socket, its one-line errors, and the page
itself in headless Chromium (Debian's chromium + chromedriver through Selenium)."""

import contextlib
import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from fmkit import Condition, DataSpec, Generator
from fmkit.demo import serve
from fmkit.generator import ModelSpec, build_backbone

ATTRIBUTES = ("Smiling", "Eyeglasses", "Male")


def random_model(folder: Path, condition: Condition) -> Path:
    """A tiny conditional UNet folder with random (not zero-initialised) weights, so that every
    condition changes the images."""
    opts = {"base_channels": 8, "channel_mult": (1, 2), "attn_resolutions": (8,)}
    spec = ModelSpec("unet", {**opts, "num_res_blocks": 1}, DataSpec(3, 16, condition))
    module = build_backbone(spec)
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, 0.2)
    Generator(spec, module.eval()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return random_model(
        tmp_path_factory.mktemp("demo") / "model", Condition("attributes", ATTRIBUTES)
    )


@contextlib.contextmanager
def serving(folder):
    """The demo of `folder` on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    httpd = serve(Generator.load(folder), "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(model_folder):
    with serving(model_folder) as url:
        yield url


def post(url, body):
    """POST a generation as the demo's own page does: JSON, from its own origin."""
    request = urllib.request.Request(
        url + "/api/generate",
        json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Origin": url},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_api_generates_with_conditions_and_reports_nfe(server):
    with urllib.request.urlopen(server + "/api/model", timeout=10) as response:
        model = json.loads(response.read())
    condition = model["condition"]
    assert condition["kind"] == "attributes" and condition["names"] == list(ATTRIBUTES)
    # The page draws what the condition kind describes: here a radio set per attribute.
    assert [c["key"] for c in condition["controls"]] == list(ATTRIBUTES)
    assert all(c["style"] == "radio" for c in condition["controls"])
    assert {"name": "dopri5", "adaptive": True} in model["solvers"]
    status, plain = post(server, {"seed": 1, "count": 3, "solver": "euler", "steps": 4})
    assert status == 200 and len(plain["images"]) == 3 and plain["nfe"] == 4
    assert plain["images"][0].startswith("data:image/png;base64,")
    assert len(plain["trajectory"]) == len(plain["times"]) == 6 and plain["times"][-1] == 1.0
    # Guided (w = 1.5 inside 0.2 <= t <= 0.8): steps starting there cost two evaluations.
    status, smiling = post(server, {"seed": 1, "count": 3, "solver": "euler", "steps": 4,
                                    "cond": {"Smiling": 1, "Male": None}})  # fmt: skip
    assert status == 200 and 4 < smiling["nfe"] <= 8
    assert smiling["images"] != plain["images"]
    status, again = post(server, {"seed": 1, "count": 3, "solver": "euler", "steps": 4})
    assert again["images"] == plain["images"]  # the seed fixes the noise


def test_bad_requests_are_400_with_a_message(server):
    status, body = post(server, {"solver": "nope"})
    assert status == 400 and "unknown solver 'nope'" in body["error"]
    status, body = post(server, {"count": 1000})
    assert status == 400 and "count" in body["error"]
    status, body = post(server, {"cond": {"Smilling": 1}})
    assert status == 400 and "Smilling" in body["error"]
    for bad in ({"seed": -1}, {"seed": 1e400}, {"steps": "many"}, {"guidance": float("nan")}):
        status, body = post(server, bad)
        assert status == 400 and next(iter(bad)) in body["error"], body
    # The server is still there after all of them.
    assert post(server, {"count": 1, "steps": 2})[0] == 200


def test_a_port_in_use_and_a_bad_checkpoint_are_one_line_errors(model_folder, run_cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("demo", "--checkpoint", model_folder, "--port", port)
        assert "in use" in one_line_error(result)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(run_cli("demo", "--checkpoint", bad))


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver packages")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_the_page_in_a_real_browser(model_folder, tmp_path):
    """Load the page, generate, set two attributes, generate again: new images and the NFE
    shown. The screenshot in docs/export.md is this test's, with FMKIT_DEMO_MODEL naming a
    trained attribute model and FMKIT_DEMO_SCREENSHOT=PATH to keep it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    stack = contextlib.ExitStack()
    folder = os.environ.get("FMKIT_DEMO_MODEL") or model_folder
    attributes = Generator.load(folder).data.condition.names
    try:
        server = stack.enter_context(serving(folder))
        wait = WebDriverWait(browser, 120)
        browser.get(server + "/")
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "ready"))
        browser.find_element(By.ID, "steps").clear()
        browser.find_element(By.ID, "steps").send_keys("8")
        browser.find_element(By.ID, "generate").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "NFE"))
        first = [
            i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "#images img")
        ]
        assert len(first) == 8 and all(src.startswith("data:image/png") for src in first)

        browser.find_element(By.ID, f"cond-{attributes[0]}-on").click()
        browser.find_element(By.ID, f"cond-{attributes[1]}-off").click()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("8 images")
                   and [i.get_attribute("src") for i in b.find_elements(By.CSS_SELECTOR, "#images img")] != first)  # fmt: skip
        status = browser.find_element(By.ID, "status").text
        assert "NFE" in status and browser.find_element(By.ID, "nfe").text.isdigit()
        assert int(browser.find_element(By.ID, "nfe").text) > 8  # guided steps count twice
        assert len(browser.find_elements(By.CSS_SELECTOR, "#trajectory img")) == 6
        browser.save_screenshot(str(tmp_path / "demo.png"))
        assert (tmp_path / "demo.png").stat().st_size > 10_000
        target = os.environ.get("FMKIT_DEMO_SCREENSHOT")
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "demo.png", target)
    finally:
        browser.quit()
        stack.close()


def test_class_names_reach_the_page_as_text(tmp_path):
    """Class names come from folder names: quotes and markup stay text, and the chosen class
    round-trips to the server."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    odd = 'a"b <i>x</i>'
    random_model(tmp_path / "model", Condition("class", ("plain", odd)))
    browser = _browser()
    try:
        with serving(tmp_path / "model") as url:
            wait = WebDriverWait(browser, 120)
            browser.get(url + "/")
            wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "ready"))
            assert not browser.find_elements(By.CSS_SELECTOR, "#conditions i")
            Select(browser.find_element(By.ID, "cond-class")).select_by_visible_text(odd)
            browser.find_element(By.ID, "generate").click()
            wait.until(lambda b: "NFE" in b.find_element(By.ID, "status").text
                       or "error" in b.find_element(By.ID, "status").text)  # fmt: skip
            assert "NFE" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
