"""Open a run's report.html in headless Chromium (Debian's package): it must draw one point per network, hover a
stitch and show its numbers. Prints what the page reports and, with --screenshot, saves the hovered page.

    python scripts/check_report.py runs/demo [--screenshot docs/report-hover.png]
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("check_report: no Chromium here (Debian: apt-get install chromium)")


def selftest(report: Path) -> dict:
    """What the page says after hovering a stitch (its ``#selftest`` mode), read from the DOM Chromium dumps."""
    dom = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"{report.resolve().as_uri()}#selftest"], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom, re.S)
    if not found:
        sys.exit(f"check_report: {report} did not draw itself in Chromium")
    return json.loads(html.unescape(found.group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    report = Path(args.run) / "report.html"
    results = json.loads((Path(args.run) / "results.json").read_text())
    shown = selftest(report)
    print(json.dumps(shown, indent=1))
    expected = len(results["stitches"]) if "stitches" in results else None
    assert shown["tooltip_visible"] and shown["hovered"] in shown["tooltip"], shown
    if expected is not None:
        assert shown["stitches"] == expected, (shown["stitches"], expected)
    if args.screenshot:
        subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=920,640", f"--screenshot={Path(args.screenshot).resolve()}",
                        f"{report.resolve().as_uri()}#hover"], capture_output=True, timeout=120, check=True)
        print(f"wrote {args.screenshot}")
    print(f"check_report: {report} draws {shown['stitches']} networks and shows a hovered stitch's numbers")


if __name__ == "__main__":
    main()
