"""Browser-test helpers: Debian's chromium driven by playwright, and a handle on the dashboard page.

Import as `from browser_helpers import ...` (tests/ is on sys.path). Browsers come from Debian
(`apt-get install chromium`, see `make browser`), never from `playwright install`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Response

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
# Read at import: conftest drops every MCDROP_* variable before each test runs.
UPDATE_SCREENSHOTS = os.environ.get("MCDROP_UPDATE_SCREENSHOTS") == "1"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 400, "height": 800}
WAIT_MS = 15_000  # longest any helper waits for the page
QUIET_MS = 400  # no new API call for this long (> the ~150 ms slider debounce): settled
POLLS = ("/recent", "/calibration")  # the live view's background polling


def launch(playwright: Any) -> Browser:
    """Debian's chromium, headless, with the flags that work as root in a container."""
    browser: Browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=LAUNCH_ARGS, timeout=WAIT_MS
    )
    return browser


def browser_problem() -> str | None:
    """Why the browser tests cannot run here (None when they can): a launch is tried once."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        return f"python playwright is not installed ({exc}); pip install -e '.[test]'"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) as root"
    try:
        with sync_playwright() as playwright:
            launch(playwright).close()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{CHROMIUM} did not start under playwright: {first}"
    return None


@dataclass
class ApiCall:
    """One finished call of the page to the JSON API, as the network saw it."""

    method: str
    path: str
    status: int
    request: Any
    response: Any


@dataclass
class Dashboard:
    """The page under test plus what it did: its API calls and its console / page errors."""

    page: Page
    base: str
    errors: list[str] = field(default_factory=list)
    _responses: list[Response] = field(default_factory=list, repr=False)
    _parsed: dict[int, ApiCall] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", self._page_error)
        self.page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = str(message.location.get("url", ""))
        # Chromium logs every 4xx fetch; /calibration's 404 means "no evaluation yet" (contract)
        if "status of 404" in message.text and url.split("?")[0].endswith("/calibration"):
            return
        self.errors.append(f"console: {message.text} ({url})")

    def _page_error(self, error: Error) -> None:
        self.errors.append(f"page error: {error.message}\n{error.stack}")

    def _response(self, response: Response) -> None:
        if "/v1/" in response.url or "/v2/" in response.url:
            self._responses.append(response)

    # -- the API calls -----------------------------------------------------------------------

    def count(self) -> int:
        """API calls seen so far (polling included)."""
        return len(self._responses)

    def calls(self, since: int = 0, *, polls: bool = False) -> list[ApiCall]:
        """The page's API calls from index `since` on, oldest first; polls only when asked."""
        out = []
        for i in range(since, len(self._responses)):
            r = self._responses[i]
            path = r.url.removeprefix(self.base)
            if not polls and path.split("?")[0].endswith(POLLS):
                continue
            if i not in self._parsed:
                r.finished()
                body = r.request.post_data
                sent = None if body is None else json.loads(body)
                self._parsed[i] = ApiCall(r.request.method, path, r.status, sent, _json(r))
            out.append(self._parsed[i])
        return out

    def predictions(self, since: int = 0) -> list[ApiCall]:
        """The page's POST .../predict calls from index `since` on."""
        return [c for c in self.calls(since) if c.method == "POST" and "/predict" in c.path]

    def settle(self, timeout_ms: int = WAIT_MS) -> None:
        """Wait until no request is in flight and no new non-polling call came for QUIET_MS."""
        give_up = time.monotonic() + timeout_ms / 1000
        while True:
            self.page.wait_for_function("document.body.dataset.busy === '0'", timeout=timeout_ms)
            seen = len(self.calls())
            self.page.wait_for_timeout(QUIET_MS)
            busy = self.page.evaluate("document.body.dataset.busy")
            if busy == "0" and len(self.calls()) == seen:
                return
            if time.monotonic() > give_up:
                raise AssertionError(f"the page never settled (busy={busy!r})")

    def wait_predictions(self, since: int, n: int = 1) -> list[ApiCall]:
        """Wait for `n` new predict calls after index `since`, then settle; all of them."""
        give_up = time.monotonic() + WAIT_MS / 1000
        while len(self.predictions(since)) < n:
            if time.monotonic() > give_up:
                raise AssertionError(
                    f"expected {n} predict call(s), saw: {[c.path for c in self.calls(since)]}"
                )
            self.page.wait_for_timeout(50)
        self.settle()
        return self.predictions(since)

    def last(self) -> dict[str, Any]:
        """window.mcdropLast: the page's own record of its latest API call."""
        value: dict[str, Any] = self.page.evaluate("window.mcdropLast")
        return value

    # -- the DOM ---------------------------------------------------------------------------

    def pick_model(self, name: str) -> list[ApiCall]:
        """Choose `name` in #model-select; the predict calls that follow."""
        options = self.page.eval_on_selector_all(
            "#model-select option", "os => os.map(o => o.value)"
        )
        if self.page.input_value("#model-select") == name:  # choosing it again changes nothing
            self.page.select_option("#model-select", next(o for o in options if o != name))
            self.settle()
        since = self.count()
        self.page.select_option("#model-select", name)
        return self.wait_predictions(since)

    def set_value(self, selector: str, value: str) -> None:
        """Type into an input (range or number) the way a user would, ending with a blur."""
        locator = self.page.locator(selector)
        locator.fill(value)
        locator.blur()

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text().strip()

    def visible(self, selector: str) -> bool:
        return self.page.locator(selector).is_visible()

    def signature(self, selector: str) -> str:
        """A hash of what a chart shows: its DOM plus the pixels of its canvases."""
        content: str = self.page.evaluate(
            """(sel) => {
                const el = document.querySelector(sel);
                if (!el) return '';
                const pixels = [...el.querySelectorAll('canvas')].map((c) => c.toDataURL());
                return el.innerHTML + pixels.join('');
            }""",
            selector,
        )
        return hashlib.sha256(content.encode()).hexdigest()

    def ink(self, selector: str) -> int:
        """Painted (non-transparent) pixels of every canvas in `selector`, plus its SVG shapes."""
        painted: int = self.page.evaluate(
            """(sel) => {
                const el = document.querySelector(sel);
                if (!el) return 0;
                let n = el.querySelectorAll('svg path, svg rect, svg line, svg circle').length;
                for (const c of el.querySelectorAll('canvas')) {
                    if (!c.width || !c.height) continue;
                    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    for (let i = 3; i < data.length; i += 4) if (data[i]) n++;
                }
                return n;
            }""",
            selector,
        )
        return painted

    def overflow(self) -> tuple[int, int]:
        """(document scroll width, window inner width): overflow when the first is larger."""
        sizes: list[int] = self.page.evaluate(
            "[document.documentElement.scrollWidth, window.innerWidth]"
        )
        return sizes[0], sizes[1]

    def screenshot(self, folder: Path, name: str, selector: str | None = None) -> Path:
        """A PNG of the full page (or of one element) in `folder`; also into docs/screenshots/
        when MCDROP_UPDATE_SCREENSHOTS=1."""
        path = folder / f"{name}.png"
        if selector is None:
            self.page.screenshot(path=str(path), full_page=True)
        else:
            self.page.locator(selector).screenshot(path=str(path))
        if UPDATE_SCREENSHOTS:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / path.name)
        return path


def png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """An 8-bit RGB PNG (no colour profile) whose pixel at (row, column) is pixel(row, column)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(
        b"\x00" + b"".join(bytes(pixel(i, j)) for j in range(width)) for i in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


def _json(response: Response) -> Any:
    try:
        return response.json()
    except Exception:
        return None
