"""Open a benchmark (or run) report in headless Chromium, screenshot it and check every section rendered.

    python benchmarks/report_screenshot.py runs/benchmark-pneumoniamnist-quick/benchmark.html

Needs Debian's chromium (`apt-get install chromium`). Writes ``<report>.png`` beside the report and
exits non-zero when a section is missing from the rendered page.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
BENCHMARK_SECTIONS = ("methods", "results", "significance", "cost", "roc", "confusion", "reliability",
                      "per-class-recall", "diffusion")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install chromium")


def render(html: Path, png: Path, height: int) -> str:
    """Screenshot the page and return the DOM as the browser built it."""
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
        url = html.resolve().as_uri()
        subprocess.run([*base, f"--screenshot={png}", f"--window-size=1100,{height}", url], check=True,
                       capture_output=True, timeout=120)
        dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    return dom.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--height", type=int, default=9000)
    ap.add_argument("--sections", nargs="*", default=list(BENCHMARK_SECTIONS))
    args = ap.parse_args()
    png = args.report.with_suffix(".png")
    dom = render(args.report, png, args.height)
    found = set(re.findall(r'<section id="([^"]+)"', dom))
    images = len(re.findall(r"<img [^>]*src=\"data:image/png", dom))
    missing = [s for s in args.sections if s not in found]
    print(f"screenshot {png} ({png.stat().st_size} bytes); sections rendered: {sorted(found)}; images: {images}")
    if missing:
        sys.exit(f"missing sections: {missing}")


if __name__ == "__main__":
    main()
