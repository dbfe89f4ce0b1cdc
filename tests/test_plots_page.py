"""End-to-end: the pages `dvc plots show` and `dvc plots diff` write draw every declared plot offline.

DVC's own page loads Vega from a CDN, so offline its charts stay blank; `.dvc/config` points
`plots.html_template` at `.dvc/plots/index.html`, which inlines the libraries. Each page is opened in
headless Chromium with every host name unresolvable, as on a machine with no network.
"""

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from dvc_render.base import Renderer
from PIL import Image

from .conftest import ROOT
from .e2e import sh

pytestmark = pytest.mark.e2e

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg"}  # what DVC renders as an image
CLASSES = ["T-shirt/top", "Trouser", "Pullover"]
CONSOLE = re.compile(r':CONSOLE[:(]\d+\)?\] "(.*)", source: ')  # a console message in Chromium's log


@dataclass(frozen=True)
class Declared:
    charts: list[str]  # the div ids DVC gives the vega plots
    images: list[str]  # the div ids of the image plots
    files: set[str]    # every file they read


def declared(plots: list) -> Declared:
    """What a dvc.yaml top-level ``plots`` list asks DVC to draw."""
    charts, images, files = [], [], set()
    for entry in plots:
        name, props = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        y = (props or {}).get("y")
        files |= set(y) if isinstance(y, dict) else {name}
        is_image = Path(name).suffix in IMAGE_SUFFIXES and not isinstance(y, dict)
        (images if is_image else charts).append(Renderer.remove_special_chars(name))
    return Declared(charts, images, files)


def write_plot_data(repo: Path, epochs: int) -> None:
    """Small files in the formats the stages write, for the files dvc.yaml plots."""
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "plots").mkdir(exist_ok=True)
    history = ["epoch,loss,accuracy,val_loss,val_accuracy"]
    history += [f"{e},{1 / e:.3f},{0.6 + e / 20:.3f},{1.1 / e:.3f},{0.55 + e / 20:.3f}" for e in range(1, epochs + 1)]
    confusion = ["actual,predicted"] + [f"{a},{p}" for i, a in enumerate(CLASSES) for p in CLASSES[: i + 1]]
    sweep = ["run,name,epoch,loss,accuracy,val_loss,val_accuracy,lr,batch_size,epochs"]
    sweep += [f"{run},lr={lr},{e},{1 / e:.3f},{0.6 + e / 20:.3f},{1.1 / e:.3f},{0.55 + e / 20 + lr:.3f},{lr},100,{epochs}"
              for run, lr in enumerate((0.01, 0.05)) for e in range(1, epochs + 1)]
    for name, lines in (("train_history.csv", history), ("confusion.csv", confusion), ("sweep.csv", sweep)):
        (repo / "metrics" / name).write_text("\n".join(lines) + "\n")
    for name, colour in (("confusion.png", "red"), ("misclassified.png", "blue")):
        Image.new("RGB", (30 + epochs, 30), colour).save(repo / "plots" / name)


class PlotsPage(HTMLParser):
    """A dumped DOM's plot divs (the body's outermost divs), with the vega views and images drawn in each."""

    def __init__(self, html: str):
        super().__init__()
        self.divs: list[str] = []
        self.charts: Counter = Counter()  # a rendered vega view is a canvas or svg of class "marks"
        self.images: dict[str, list[str]] = defaultdict(list)
        self._depth, self._plot = 0, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            if self._depth == 0:
                self._plot = attrs.get("id")
                self.divs.append(self._plot)
            self._depth += 1
        if "marks" in (attrs.get("class") or "").split():
            self.charts[self._plot] += 1
        if tag == "img":
            self.images[self._plot].append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "div":
            self._depth -= 1
            if self._depth == 0:
                self._plot = None


def open_offline(chromium: str, page: Path, profile: Path) -> tuple[PlotsPage, list[str]]:
    """The page's DOM once its scripts have run, and the script errors it logged; no host name resolves."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)
    errors = [m for m in CONSOLE.findall(proc.stderr) if m.startswith(("Uncaught", "ERROR"))]
    return PlotsPage(proc.stdout), errors


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repository with this one's plot declarations and plots settings; the plot files committed
    with 3 epochs, then changed in the workspace to 4."""
    repo = tmp_path_factory.mktemp("plots") / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "e2e@example.com")
    sh(repo, "git", "config", "user.name", "e2e")
    sh(repo, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    write_plot_data(repo, epochs=3)
    missing = sorted(f for f in declared(plots).files if not (repo / f).is_file())
    assert not missing, f"dvc.yaml plots {missing}: write_plot_data must write them too"
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "plots")
    write_plot_data(repo, epochs=4)
    return repo


@pytest.mark.parametrize(("command", "revisions"), [(["show"], 1), (["diff", "HEAD"], 2)], ids=["show", "diff"])
def test_plots_page_draws_each_declared_plot_once_with_no_network(repo, chromium, tmp_path, command, revisions):
    out = tmp_path / "page"
    sh(repo, "dvc", "plots", *command, "--out", str(out))
    html = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=", html), "the page loads a script from elsewhere"

    page, errors = open_offline(chromium, out / "index.html", tmp_path / "chromium")

    want = declared(yaml.safe_load((repo / "dvc.yaml").read_text())["plots"])
    assert errors == []
    assert sorted(page.divs) == sorted(want.charts + want.images)  # each plot once, no other
    assert page.charts == Counter(want.charts)  # each vega plot drawn once; none elsewhere
    assert {plot: len(srcs) for plot, srcs in page.images.items()} == {plot: revisions for plot in want.images}
    for srcs in page.images.values():
        assert all((out / src).is_file() for src in srcs), srcs
