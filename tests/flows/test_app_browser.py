"""`fmbseg app` in a real browser: the page runs as a real subprocess on a free port over a miniature
checkpoint and a real Stage 1 store, and headless Chromium (Debian's `chromium` through Selenium and
`chromium-driver`) uses it as a person would: uploads images, types classes, toggles SAM, reads
back the overlay, the legend and the label PNG, and pages through the store worst first.

Set FMBSEG_APP_SCREENSHOTS=<folder> to keep a screenshot of each page there.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.io import decode_label_png
from components.overlay import overlay_picture
from components.review import review_picture
from components.segmenter import Segmenter
from components.tryout import legend_rows, read_upload
from tests.components.test_predictions import photo
from tests.components.test_review import store_maps, write_store
from tests.mini_checkpoint import write_mini_checkpoint

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                                       "chromium-driver; .ci/run installs them)")
MAX_PIXELS = 2000  # the page's pixel budget here: 30 x 40 passes, 50 x 50 is refused
CLASSES = ["sky", "grass", "car"]
START_S = 240  # a loaded 2-core machine takes ~30 s to import Gradio, torch and the models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.fixture(scope="module")
def world(tmp_path_factory, repo_root) -> Iterator[dict]:
    """The files (a checkpoint, a store, uploads) and the page serving them, as a subprocess."""
    root = tmp_path_factory.mktemp("app")
    checkpoint = write_mini_checkpoint(root / "aligner.pt")
    write_store(root / "store", store_maps(), root / "imgs", [
        {"image_id": "half", "class_id": k, "class_name": CLASSES[k], "crops_won": 2, "points_xy": [[1.0, 2.0]],
         "sam_score": 0.9, "mask_area_frac": 0.5, "stage1_2_masks": [], "stage1_2_scores": []} for k in (0, 2)])
    Image.fromarray(photo(30, 40, 0)).save(root / "street.jpg", quality=95)
    Image.fromarray(photo(50, 50, 1)).save(root / "huge.png")
    (root / "notes.png").write_text("not an image, whatever its name says")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # the test computes the expected maps with one thread too (conftest)
    log = (root / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "app", "--model", str(checkpoint), "--store", "store", "--port", str(port),
         "--max-pixels", str(MAX_PIXELS), "--params", str(repo_root / "params.yaml")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_S
    try:
        while True:
            assert server.poll() is None, (root / "app.log").read_text()[-3000:]
            try:
                fetch(url)
                break
            except OSError:
                assert time.monotonic() < deadline, "the page did not answer in time"
                time.sleep(1)
        yield {"root": root, "url": url, "checkpoint": checkpoint, "server": server}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: css(d, "#segment"))


def screenshot(driver, name: str) -> None:
    folder = os.environ.get("FMBSEG_APP_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / f"app-{name}.png"))


def choose(driver, element_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown by its label."""
    css(driver, f"#{element_id} input")[0].click()
    wait(driver, lambda d: css(d, f"#{element_id} li[role=option][aria-label='{option}']"))[0].click()
    wait(driver, lambda d: css(d, f"#{element_id} input")[0].get_attribute("value") == option)


def segment(driver, upload: Path | None, *, classes: str | None = None) -> str:
    """Upload a file (none: the picked one is used) and type classes, press Segment; returns the
    status line once Gradio has answered."""
    if upload is not None:
        css(driver, "#upload input[type=file]")[0].send_keys(str(upload))
        wait(driver, lambda d: css(d, f"#upload td.filename[aria-label='{upload.name}']"))
    if classes is not None:
        box = css(driver, "#classes textarea")[0]
        box.clear()
        box.send_keys(classes)
    before = css(driver, "#status")[0].text
    css(driver, "#segment")[0].click()
    # Gradio shows its progress ("processing | 0.2s", "0.2s") in a status tracker inside the block until
    # the answer is in; the tracker is hidden then
    def answered(d) -> bool:
        idle = all("hide" in t.get_attribute("class").split() for t in css(d, "#status [data-testid=status-tracker]"))
        return idle and css(d, "#status")[0].text not in ("", before)

    wait(driver, answered)
    status = css(driver, "#status")[0].text
    if upload is not None:
        css(driver, "#upload button[aria-label='Clear']")[0].click()
        wait(driver, lambda d: not css(d, "#upload td.filename"))
    return status


def test_try_the_model_shows_overlay_legend_and_label_png(world, browser) -> None:
    open_page(browser, world["url"])
    expected_model = Segmenter.from_checkpoint(world["checkpoint"], device="cpu")
    image = read_upload(world["root"] / "street.jpg")
    for refine in (False, True):
        if refine:
            css(browser, "#refine input")[0].click()
        status = segment(browser, world["root"] / "street.jpg", classes=", ".join(CLASSES))
        variant = "refined" if refine else "base"
        assert ("SAM-refined" if refine else "(base map)") in status, status
        expected = expected_model.segment(image, CLASSES, refine=refine)

        shown = [(r.find_element("css selector", ".name").text, r.find_element("css selector", ".share").text)
                 for r in css(browser, "#legend-table .legend-row")]
        assert shown == [(r["name"], f"{100 * r['share']:.1f}%") for r in legend_rows(expected, CLASSES)]
        assert f"{len(expected.present)} of 3 classes" in status

        label = decode_label_png(fetch(css(browser, "#label-png a")[0].get_attribute("href")))
        assert label.dtype == np.uint8 and np.array_equal(label, expected.label_map)

        overlay = np.asarray(Image.open(io.BytesIO(fetch(css(browser, "#overlay img")[0].get_attribute("src")))))
        reference = overlay_picture(image, None, {variant: expected.label_map}, CLASSES)
        assert np.array_equal(overlay[..., :3], np.asarray(reference))
    screenshot(browser, "try")

    # an image of the store, picked instead of uploaded, and a shipped vocabulary instead of typed names
    from components.datasets.registry import class_file_path, read_class_file

    choose(browser, "pick", "half.png")
    choose(browser, "vocabulary", "voc21")
    css(browser, "#refine input")[0].click()  # off again
    status = segment(browser, None)
    voc21 = read_class_file(class_file_path("voc21"))
    expected = expected_model.segment(read_upload(world["root"] / "imgs" / "half.png"), voc21)
    assert f"{len(expected.present)} of 21 classes in 32 x 24 pixels (base map)" in status, status
    label = decode_label_png(fetch(css(browser, "#label-png a")[0].get_attribute("href")))
    assert np.array_equal(label, expected.label_map)


def test_bad_uploads_are_refused_and_the_page_keeps_serving(world, browser) -> None:
    open_page(browser, world["url"])
    assert "type the class names or pick a vocabulary" in segment(browser, world["root"] / "street.jpg")
    assert "notes.png: not an image" in segment(browser, world["root"] / "notes.png", classes="sky, car")
    status = segment(browser, world["root"] / "huge.png")
    assert "too large to decode safely: 50 x 50 = 2,500 pixels" in status, status
    assert "of 2 classes" in segment(browser, world["root"] / "street.jpg")
    assert world["server"].poll() is None


def test_review_pages_through_the_store_worst_first(world, browser) -> None:
    from components.labelling.store import PseudoLabels

    open_page(browser, world["url"])
    next(t for t in css(browser, "button[role=tab]") if "Review" in t.text).click()
    wait(browser, lambda d: css(d, "#review-heading"))

    def current() -> tuple[str, str]:
        heading = css(browser, "#review-heading")[0]
        return (heading.find_element("css selector", ".image-id").text,
                heading.find_element("css selector", ".confidence").text)

    seen = [current()]
    for _ in range(3):
        css(browser, "#next")[0].click()
        wait(browser, lambda d: current() != seen[-1])
        seen.append(current())
        if seen[-1][0] == "half":
            detected = [e.text for e in css(browser, "#detections-table .detection-row .name")]
            assert detected == ["sky", "car"]
            picture = Image.open(io.BytesIO(fetch(css(browser, "#stage1 img")[0].get_attribute("src"))))
            labels = PseudoLabels(world["root"] / "store")
            image = read_upload(world["root"] / "imgs" / "half.png")
            assert np.array_equal(np.asarray(picture)[..., :3],
                                  np.asarray(review_picture(labels, "half", image, panel_height=360)))
            screenshot(browser, "review")
    assert seen == [("apart", "0.000"), ("half", "0.500"), ("quarter", "0.750"), ("agree", "1.000")]
    assert "4 of 4" in css(browser, "#review-heading")[0].text
    css(browser, "#previous")[0].click()
    wait(browser, lambda d: current() == seen[2])
