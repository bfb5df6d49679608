"""A real browser on the page: headless Chromium (the system's chromium + chromedriver, so
nothing is downloaded) uploads a lesion photo to a live server on 127.0.0.1 and the melanoma
probability and the attention overlay appear."""

import base64
import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="selenium is part of the test extra: pip install -e '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from melanoma.serve import create_app  # noqa: E402
from helpers import LiveServer, lesion_bytes  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    not (CHROMEDRIVER and CHROMIUM),
    reason="no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture()
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_shows_probability_and_overlay(two_head_ckpt, browser, tmp_path):
    photo = tmp_path / "lesion.jpg"
    photo.write_bytes(lesion_bytes(5, size=96))
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"not an image at all")
    with LiveServer(create_app(two_head_ckpt)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        assert "not a diagnosis" in browser.find_element(By.ID, "research-note").text.lower()
        wait.until(lambda d: "target sensitivity" in d.find_element(By.ID, "model-line").text)
        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card.done")))
        text = card.text
        assert "melanoma probability" in text and "%" in card.find_element(By.CLASS_NAME, "prob").text
        assert "95.0% sensitivity" in text and ("Not melanoma" in text or "Melanoma" in text)
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) >= 224)
        if os.environ.get("MELANOMA_SCREENSHOT"):
            browser.save_screenshot(os.environ["MELANOMA_SCREENSHOT"])
        # a bad file: its error is shown on the page, and the page keeps working
        browser.find_element(By.ID, "files").send_keys(str(junk))
        failed = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card.failed")))
        assert "not a readable image" in failed.text
        # drag and drop: the drop zone gets a DataTransfer holding the photo, as from a file manager
        browser.execute_script(
            """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
               const dt = new DataTransfer();
               dt.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
               document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));""",
            base64.b64encode(photo.read_bytes()).decode(),
        )
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 2)
        dropped = [c for c in browser.find_elements(By.CSS_SELECTOR, ".card.done") if "dropped.jpg" in c.text]
        assert dropped and "melanoma probability" in dropped[0].text
