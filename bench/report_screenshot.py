"""Open a build's report.html in headless Chromium, fail on console errors, and save a screenshot.

    python bench/report_screenshot.py BUILD_DIR [--out shot.png]

Needs Debian's chromium (`apt-get install chromium`). Prints the plots found and the screenshot path.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path


class _Count(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.svgs, self.external = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("id"))
        if tag == "svg":
            self.svgs += 1
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//")) and tag in ("script", "img", "link", "iframe"):
                self.external.append(a[k])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html: Path, png: Path) -> list[str]:
    """Screenshot `html`; return the console errors Chromium logged."""
    exe = chromium()
    if exe is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                "--enable-logging=stderr", "--v=0", "--window-size=1100,2400", f"--screenshot={png}",
                html.resolve().as_uri()]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    html = a.build_dir / "report.html"
    c = _Count()
    c.feed(html.read_text())
    png = a.out or a.build_dir / "report.png"
    errors = screenshot(html, png)
    print(f"plots: {', '.join(str(f) for f in c.figures)} ({c.svgs} svg); external resources: {len(c.external)}")
    print(f"console errors: {len(errors)}")
    for e in errors:
        print("  " + e)
    ok = png.is_file() and png.stat().st_size > 10_000 and not errors and not c.external and c.svgs >= 3
    print(f"screenshot: {png} ({png.stat().st_size if png.is_file() else 0} bytes) -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
