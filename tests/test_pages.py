"""The pages `palionnx serve` serves, driven in a real browser (Debian's chromium through selenium; skipped, saying
why, where either is missing), and the review page's JSON routes over real HTTP."""

import os
import shutil
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from helpers import palionnx, png_bytes, served  # noqa: E402

from palionnx.jobs.claims import Claims  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless chromium, the system's own (never a downloaded one)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromium-driver are not installed (scripts/test.sh installs them with apt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _wait(check, seconds=60.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting in the browser")


def _dataset(root: Path) -> Path:
    root.mkdir()
    (root / "sub").mkdir()
    for name, png in zip(["a.png", "b.png", "sub/c.png"], png_bytes(3)):
        (root / name).write_bytes(png)
    (root / "a.txt").write_text("an existing caption")
    return root


@pytest.mark.integration  # a browser process
def test_the_page_captions_an_upload_as_the_cli_does(browser, numpy_folder, tmp_path):
    from selenium.webdriver.common.by import By

    folder = numpy_folder("tiny-pg1")
    images = tmp_path / "images"
    images.mkdir()
    (images / "photo.png").write_bytes(png_bytes(1)[0])
    assert palionnx("caption", images, "--model", folder, "--max-new-tokens", 20, "-q").returncode == 0
    expected = (images / "photo.txt").read_text()
    with served(folder, slots=2, api_keys=("page-key",)) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        key_form = _wait(lambda: browser.find_element(By.ID, "keyform").is_displayed() and
                         browser.find_element(By.ID, "keyform"))
        browser.find_element(By.ID, "key").send_keys("page-key")
        key_form.submit()
        _wait(lambda: "tiny-pg1-fp32" in browser.find_element(By.ID, "model").text)
        tokens = browser.find_element(By.CSS_SELECTOR, "#settings [name=max_new_tokens]")
        tokens.send_keys("20")
        browser.find_element(By.ID, "files").send_keys(str(images / "photo.png"))
        item = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "li.item[data-done=true]"))[0]
        assert item.find_element(By.CLASS_NAME, "caption").get_attribute("textContent") == expected
        assert "20 tokens" in item.find_element(By.CLASS_NAME, "status").text
        assert browser.execute_script("return sessionStorage.getItem('palionnx-key')") == "page-key"
        assert "1 of 1 captioned" in browser.find_element(By.ID, "summary").text


@pytest.mark.integration  # a browser process
def test_the_review_page_shows_edits_saves_and_recaptions(browser, numpy_folder, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    root = _dataset(tmp_path / "data")
    with served(numpy_folder("tiny-pg1"), slots=2, folder=root) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        card = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "li.item[data-path='a.png']"))[0]
        editor = card.find_element(By.TAG_NAME, "textarea")
        _wait(lambda: editor.get_attribute("value") == "an existing caption")
        assert len(browser.find_elements(By.CSS_SELECTOR, "li.item")) == 3
        Select(browser.find_element(By.ID, "filter")).select_by_value("missing")
        shown = [e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, "li.item")
                 if e.is_displayed()]
        assert shown == ["b.png", "sub/c.png"]
        Select(browser.find_element(By.ID, "filter")).select_by_value("all")

        editor.clear()
        editor.send_keys("a caption edited in the browser")
        card.find_element(By.CLASS_NAME, "save").click()
        _wait(lambda: card.get_attribute("data-saved") == "true")
        assert (root / "a.txt").read_text() == "a caption edited in the browser"

        browser.find_element(By.ID, "recaption-missing").click()
        _wait(lambda: (root / "b.txt").is_file() and (root / "sub" / "c.txt").is_file())
        _wait(lambda: "2 of 2 done, 0 failed" in browser.find_element(By.ID, "progress").text)
        assert (root / "a.txt").read_text() == "a caption edited in the browser"  # not missing: left alone
        b_card = browser.find_element(By.CSS_SELECTOR, "li.item[data-path='b.png'] textarea")
        _wait(lambda: b_card.get_attribute("value") == (root / "b.txt").read_text() != "")

        card.find_element(By.CLASS_NAME, "select").click()  # tick a.png only
        browser.find_element(By.ID, "recaption-selected").click()
        _wait(lambda: (root / "a.txt").read_text() != "a caption edited in the browser")
        _wait(lambda: editor.get_attribute("value") == (root / "a.txt").read_text())


def test_only_the_folders_images_and_captions_are_reachable(numpy_folder, tmp_path):
    root = _dataset(tmp_path / "data")
    (tmp_path / "secret.png").write_bytes(png_bytes(1)[0])
    (root / "notes.md").write_text("not an image")
    (root / "link.png").symlink_to(tmp_path / "secret.png")  # a link out of the folder
    with served(numpy_folder("tiny-pg1"), slots=1, folder=root) as server:
        get = server.client.get
        listing = get("/v1/dataset").json()
        assert [i["path"] for i in listing["items"]] == ["a.png", "b.png", "sub/c.png"]
        assert [i["status"] for i in listing["items"]] == ["captioned", "missing", "missing"]
        assert get("/v1/dataset/image", params={"path": "sub/c.png"}).content == (root / "sub/c.png").read_bytes()
        for path in ("../secret.png", "link.png", "notes.md", "a.txt", str(root / "a.png"), "sub/../a.png", ""):
            answer = get("/v1/dataset/image", params={"path": path})
            assert answer.status_code == 404 and "is not an image of the folder" in answer.json()["error"]["message"]
            put = server.client.put("/v1/dataset/caption", params={"path": path}, json={"caption": "x"})
            assert put.status_code == 404, path
        assert not (tmp_path / "secret.txt").exists() and (root / "a.txt").read_text() == "an existing caption"
        assert server.client.put("/v1/dataset/caption", params={"path": "b.png"}, json={"text": 1}).status_code == 400

        held = Claims(None)  # a `palionnx caption` run holding b.png's caption
        assert held.claim(root / "b.txt")
        refused = server.client.put("/v1/dataset/caption", params={"path": "b.png"}, json={"caption": "mine"})
        assert refused.status_code == 409 and "being captioned" in refused.json()["error"]["message"]
        held.release_all()
        assert server.client.put("/v1/dataset/caption", params={"path": "b.png"}, json={"caption": "mine"}).json()
        assert (root / "b.txt").read_text() == "mine" and not list(root.glob(".*palionnx*"))

        started = server.client.post("/v1/dataset/recaption", json={"paths": ["sub/c.png"], "max_new_tokens": "5"})
        assert started.status_code == 202
        _wait(lambda: not get("/v1/dataset").json()["progress"]["running"])
        assert get("/v1/dataset").json()["progress"] == {"total": 1, "done": 1, "failed": 0, "running": False}
        assert (root / "sub/c.txt").read_text()
        bad = server.client.post("/v1/dataset/recaption", json={"paths": ["b.png"], "temperature": "nan"})
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root writes into read-only folders")
def test_a_read_only_folder_browses_and_refuses_saving_in_one_message(numpy_folder, tmp_path):
    root = _dataset(tmp_path / "data")
    for folder in (root / "sub", root):
        folder.chmod(0o555)
    try:
        with served(numpy_folder("tiny-pg1"), slots=1, folder=root) as server:
            listing = server.client.get("/v1/dataset").json()
            assert not listing["writable"] and len(listing["items"]) == 3
            answer = server.client.put("/v1/dataset/caption", params={"path": "b.png"}, json={"caption": "x"})
            assert answer.status_code == 403 and answer.json()["error"]["message"].endswith(
                "is read-only: captions cannot be saved")
    finally:
        for folder in (root, root / "sub"):
            folder.chmod(0o755)


@pytest.mark.integration  # a browser process
def test_a_folder_that_refuses_writes_browses_with_saving_off(browser, numpy_folder, tmp_path, monkeypatch):
    """As a read-only folder looks (here to every user, root too: the write check is made to say no)."""
    from selenium.webdriver.common.by import By

    from palionnx.server import dataset

    root = _dataset(tmp_path / "data")
    monkeypatch.setattr(dataset.os, "access", lambda path, mode: False)
    with served(numpy_folder("tiny-pg1"), slots=1, folder=root) as server:
        answer = server.client.put("/v1/dataset/caption", params={"path": "b.png"}, json={"caption": "x"})
        assert answer.status_code == 403 and answer.json()["error"]["message"] == (
            f"{root} is read-only: captions cannot be saved")
        assert server.client.post("/v1/dataset/recaption", json={"paths": ["b.png"]}).status_code == 403
        browser.get(f"http://127.0.0.1:{server.port}/")
        notice = _wait(lambda: browser.find_element(By.ID, "readonly").is_displayed() and
                       browser.find_element(By.ID, "readonly"))
        assert notice.text == f"{root} is read-only: browsing only, saving is off"
        assert len(browser.find_elements(By.CSS_SELECTOR, "li.item")) == 3
        assert all(not b.is_enabled() for b in browser.find_elements(By.CLASS_NAME, "save"))
        assert not (root / "b.txt").exists()


def test_an_image_that_fails_to_recaption_is_listed_as_failed_with_its_reason(numpy_folder, tmp_path):
    root = _dataset(tmp_path / "data")
    (root / "broken.png").write_bytes(b"not a picture")
    with served(numpy_folder("tiny-pg1"), slots=1, folder=root) as server:
        started = server.client.post("/v1/dataset/recaption", json={"paths": ["broken.png", "b.png"],
                                                                    "max_new_tokens": "3"})
        assert started.status_code == 202
        _wait(lambda: not server.client.get("/v1/dataset").json()["progress"]["running"])
        listing = server.client.get("/v1/dataset").json()
        status = {item["path"]: (item["status"], item["error"]) for item in listing["items"]}
        assert status["broken.png"][0] == "failed" and "broken.png" in status["broken.png"][1]
        assert status["b.png"] == ("captioned", None) and listing["progress"]["failed"] == 1
        assert not (root / "broken.txt").exists()
