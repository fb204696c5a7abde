"""Headless Chromium for tests: find it, measure how a page lays out, take a screenshot.

No driver library: the page is opened with ``--dump-dom`` after a small script is added to a
copy of it; on ``load`` the script writes its measurements (JSON) into the DOM that Chromium
prints. Debian's ``chromium`` package is what ``scripts/setup.sh`` installs.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Runs on the page's load event: the viewport, the page's own width and height, every table with
# its scroll container and the heading above it, every image. OPEN_DETAILS is replaced by true
# to unfold every <details> first (the page with all its content in view).
_PROBE = """
<script>
window.addEventListener("load", () => {
  if (OPEN_DETAILS) document.querySelectorAll("details").forEach((d) => { d.open = true; });
  const page = document.documentElement;
  const tables = [...document.querySelectorAll("table")].map((table) => {
    const box = table.parentElement, style = getComputedStyle(box);
    const rect = box.getBoundingClientRect();
    let heading = box.previousElementSibling;
    while (heading && !/^H[1-6]$/.test(heading.tagName)) heading = heading.previousElementSibling;
    return {heading: heading ? heading.textContent : "", container: box.className,
            overflowX: style.overflowX, left: rect.left, right: rect.right,
            tableWidth: table.scrollWidth, containerWidth: box.clientWidth};
  });
  const images = [...document.images].map((image) => ({
    alt: image.alt, complete: image.complete, naturalWidth: image.naturalWidth,
    shownWidth: image.getBoundingClientRect().width, right: image.getBoundingClientRect().right}));
  const probe = document.createElement("pre");
  probe.id = "layout-probe";
  probe.textContent = JSON.stringify({innerWidth: window.innerWidth,
    clientWidth: page.clientWidth, scrollWidth: page.scrollWidth,
    bodyScrollWidth: document.body.scrollWidth, scrollHeight: document.body.scrollHeight,
    tables, images});
  document.body.appendChild(probe);
});
</script>
"""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on PATH, or None."""
    return next(filter(None, (shutil.which(name) for name in CHROMIUM_NAMES)), None)


def _run(args: list[str], profile: str, timeout: float) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    flags += [f"--user-data-dir={profile}", "--disable-dev-shm-usage"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(
        [chromium, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def measure_page(
    page: Path,
    width: int = 1400,
    height: int = 900,
    timeout: float = 120,
    open_details: bool = False,
) -> dict:
    """Open ``page`` at ``width`` × ``height`` CSS pixels and return the probe's measurements:
    ``innerWidth``, ``clientWidth`` and ``scrollWidth`` of the page, the body's
    ``scrollHeight``, and per table and image its box (see ``_PROBE``); with ``open_details``
    every ``<details>`` is unfolded first."""
    with tempfile.TemporaryDirectory() as scratch:
        probed = Path(scratch) / page.name
        text = page.read_text()
        probe = _PROBE.replace("OPEN_DETAILS", "true" if open_details else "false")
        probed.write_text(text.replace("</body>", probe + "</body>", 1))
        result = _run(
            [
                f"--window-size={width},{height}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probed.as_uri(),
            ],
            str(Path(scratch) / "profile"),
            timeout,
        )
    found = re.search(r'<pre id="layout-probe">(.*?)</pre>', result.stdout, re.S)
    if found is None:
        raise RuntimeError(
            f"chromium printed no measurements (exit {result.returncode}): {result.stderr[-2000:]}"
        )
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 900) -> Path:
    """A PNG of the top ``height`` pixels of ``page`` at ``width`` pixels wide."""
    with tempfile.TemporaryDirectory() as scratch:
        _run(
            [f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
            scratch,
            120,
        )
    return png
