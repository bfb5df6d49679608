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
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from melanoma.models.checkpoint import Calibration  # noqa: E402
from melanoma.predict import Predictor  # noqa: E402
from melanoma.serve import create_app  # noqa: E402
from helpers import SYNTHETIC, LiveServer, lesion_bytes, tiny_checkpoint  # noqa: E402

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
        assert "95.0% sensitivity" in text and "the melanoma threshold (0.50)" in text
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) >= 224)
        if os.environ.get("MELANOMA_SCREENSHOT"):
            browser.save_screenshot(os.environ["MELANOMA_SCREENSHOT"])
        # a bad file: its error is shown on the page, and the page keeps working
        browser.find_element(By.ID, "files").send_keys(str(junk))
        failed = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card.failed")))
        assert "not a readable image" in failed.text and "notes.png" in failed.text
        assert "BytesIO" not in failed.text and not failed.find_elements(By.CSS_SELECTOR, "img")  # no broken icon
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


GREEN_BACKGROUNDS = ("rgb(30, 107, 58)",)  # the old "Not melanoma" green: never again


def _decision_colours(driver, badge) -> tuple[str, str]:
    return tuple(driver.execute_script(
        "const s = getComputedStyle(arguments[0]); return [s.backgroundColor, s.color];", badge))


def _is_greenish(rgb: str) -> bool:
    r, g, b = (int(x) for x in rgb[rgb.index("(") + 1:].split(")")[0].split(",")[:3])
    return g > r + 30 and g > b + 30


@pytest.fixture()
def between_ckpt(tmp_path):
    """A head whose calibrated melanoma probability for lesion_bytes(5) lies between 0.5 and its
    threshold: a per-class bias lifts it above 0.5, the threshold sits above it."""
    photo = tmp_path / "lesion.jpg"
    photo.write_bytes(lesion_bytes(5, size=96))
    ckpt = tmp_path / "between.ckpt"
    bias = (0.0, 1.5)
    tiny_checkpoint(ckpt, {"synthetic": SYNTHETIC}, calibration={"synthetic": Calibration(
        1.0, bias=bias, method="temperature+bias", threshold=0.999, target_sensitivity=0.95)})
    p = Predictor(ckpt, progress=False).predict_paths([photo])[0]["melanoma_probability"]
    assert 0.5 < p < 0.999, p
    return ckpt, photo, p


def test_probability_between_half_and_threshold_reads_as_below_threshold_never_green(between_ckpt, browser):
    ckpt, photo, p = between_ckpt
    with LiveServer(create_app(ckpt)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "target sensitivity" in d.find_element(By.ID, "model-line").text)
        # trained on synthetic data: said before any upload, and on the result
        warning = browser.find_element(By.ID, "head-warning")
        assert warning.is_displayed() and "synthetic lesions" in warning.text
        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card.done")))
        badge = card.find_element(By.CSS_SELECTOR, ".decision")
        assert badge.text == "Below the melanoma threshold (0.999)"
        assert "Not melanoma" not in card.text and "not_melanoma" not in badge.text
        assert f"{100 * p:.1f}%" in card.find_element(By.CLASS_NAME, "prob").text
        assert "Although above 0.5" in card.text and "not a finding of \"benign\"" in card.text
        assert "synthetic lesions" in card.find_element(By.CLASS_NAME, "caution").text
        background, colour = _decision_colours(browser, badge)
        assert not _is_greenish(background) and not _is_greenish(colour), (background, colour)
        # the class table does not mark the argmax class (melanoma here) as if it decided
        assert not card.find_elements(By.CSS_SELECTOR, "tr.top")
        weights = browser.execute_script(
            "return [...arguments[0].querySelectorAll('table.classes td')].map(c => getComputedStyle(c).fontWeight)", card)
        assert set(weights) == {"400"}


def test_keyboard_upload_order_and_accessibility(two_head_ckpt, browser, tmp_path):
    photos = []
    for i, name in enumerate(["c_first.jpg", "a_second.jpg", "b_third.jpg"]):
        photos.append(tmp_path / name)
        photos[-1].write_bytes(lesion_bytes(10 + i, size=64))
    with LiveServer(create_app(two_head_ckpt)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "target sensitivity" in d.find_element(By.ID, "model-line").text)
        # every control is labelled; the results are announced; the favicon is there
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('select, input, button')].filter("
            "e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.id)")
        assert unlabelled == []
        assert browser.find_element(By.ID, "results").get_attribute("aria-live") == "polite"
        assert browser.execute_script("return fetch('/favicon.ico').then(r => r.status)") == 200
        # the file picker cannot open headless: count the openings instead
        browser.execute_script("window.opened = 0; document.getElementById('files').click = () => { window.opened++; };")
        browser.execute_script("document.activeElement.blur()")  # Tab from the top of the page
        order = []
        for _ in range(12):
            ActionChains(browser).send_keys(Keys.TAB).perform()
            order.append(browser.execute_script("return document.activeElement.id"))
            if order[-1] == "choose":
                break
        assert order[-1] == "choose" and "drop" in order and order.index("drop") < order.index("choose"), order
        assert {"head", "overlay", "tta"} <= set(order)
        ActionChains(browser).send_keys(Keys.ENTER).perform()
        assert browser.execute_script("return window.opened") == 1
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        assert browser.execute_script("return document.activeElement.id") == "drop"
        ActionChains(browser).send_keys(Keys.ENTER).perform()
        ActionChains(browser).send_keys(Keys.SPACE).perform()
        assert browser.execute_script("return window.opened") == 3
        # a head never calibrated is flagged as such (and one trained on synthetic data as that)
        Select(browser.find_element(By.ID, "head")).select_by_value("ham10000")
        warning = browser.find_element(By.ID, "head-warning")
        assert warning.is_displayed() and "NOT calibrated" in warning.text and "synthetic" not in warning.text
        Select(browser.find_element(By.ID, "head")).select_by_value("synthetic")
        assert "synthetic lesions" in warning.text
        # the picker's answer: three files at once; cards keep the upload order
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in photos))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == 3)
        titles = [c.find_element(By.TAG_NAME, "h2").text for c in browser.find_elements(By.CSS_SELECTOR, ".card")]
        assert titles == ["c_first.jpg", "a_second.jpg", "b_third.jpg"]


def test_layout_at_390_px_wide(two_head_ckpt, browser, tmp_path):
    photo = tmp_path / "a lesion photo with a rather long file name.jpg"
    photo.write_bytes(lesion_bytes(3, size=96))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    with LiveServer(create_app(two_head_ckpt)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "target sensitivity" in d.find_element(By.ID, "model-line").text)
        assert browser.execute_script("return window.innerWidth") == 390
        browser.find_element(By.ID, "files").send_keys(str(photo))
        card = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card.done")))
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 0)
        if os.environ.get("MELANOMA_SCREENSHOT_390"):
            browser.save_screenshot(os.environ["MELANOMA_SCREENSHOT_390"])
        # nothing wider than the screen: no sideways scrolling, every box inside 390 px
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
        too_wide = browser.execute_script(
            "return [...document.querySelectorAll('header *, main *')].filter(e => e.getBoundingClientRect().right > 390.5)"
            ".map(e => e.tagName + '.' + e.className)")
        assert too_wide == []
        assert overlay.size["width"] >= 300  # the overlay uses the width it has
