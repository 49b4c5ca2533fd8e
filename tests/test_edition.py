"""The reader's edition (edition.py): every line of a file on its page once and in order, every link
resolving, every citation tag known to the map of pages, and the pages read in a real browser
(headless Chromium at 1,400 px: no horizontal overflow, a screenshot that is not blank).

The checkers here read the pages on their own terms (the HTML, or the browser's rendered text),
not through edition.py's reading of the source, and each is shown to fail on a doctored page.
The browser tests need Debian's chromium and chromium-driver (.ci/run installs them); without
them they skip, except under CI, where they fail.
"""

import html.parser
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

import edition  # the generator: the standard library and pygments only

ROOT = Path(__file__).resolve().parents[1]

SOURCES = {source.page: source for source in edition.sources()}
PAGES = [*SOURCES, "index.html"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The edition, built once by its command into a temporary folder: (folder, seconds)."""
    out = tmp_path_factory.mktemp("edition")
    start = time.perf_counter()
    subprocess.run([sys.executable, "edition.py", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return out, time.perf_counter() - start


# --- the checkers -------------------------------------------------------------------------------

def shown(line: str) -> str:
    """A line as a reader finds it on either side of the page: without docstring quotes at its
    ends, without a leading `#`, white space collapsed (the left side drops indentation)."""
    line = re.sub(r'^[rRuU]?("""|\'\'\')', "", line.strip())
    line = re.sub(r'("""|\'\'\')$', "", line)
    return " ".join(re.sub(r"^#", "", line).split())


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(any(line == other for other in rest) for line in part)


def line_problems(source: str, cells: list[tuple[str, str]]) -> list[str]:
    """What is wrong with a page's rows, given as (column, text) cells in page order: a source
    line missing or shown twice (counted per distinct line, blank lines aside), or a column whose
    lines do not follow the file's order."""
    expected = [s for s in map(shown, source.split("\n")) if s]
    columns = {"notes": [], "code": []}
    for column, text in cells:
        columns[column] += [s for s in map(shown, text.split("\n")) if s]
    on_page = Counter(columns["notes"] + columns["code"])
    problems = [f"missing ({n}x): {line!r}" for line, n in (Counter(expected) - on_page).items()]
    problems += [f"extra ({n}x): {line!r}" for line, n in (on_page - Counter(expected)).items()]
    problems += [f"the {column} column is out of order" for column, lines in columns.items()
                 if not is_subsequence(lines, expected)]
    return problems


class Page(html.parser.HTMLParser):
    """What the checkers need of a page's HTML: the text of each <pre> of the edition's table
    with its column, every id, every link (with its attributes), and anything that would load
    from elsewhere (scripts, stylesheets, images, CSS imports or urls)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.cells, self.ids, self.links, self.remote = [], set(), [], []
        self.column, self.pre, self.in_table, self.style = None, 0, False, ""
        self.in_style = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        classes = (attrs.get("class") or "").split()
        if tag == "table" and "edition" in classes:
            self.in_table = True
        elif tag == "td" and self.in_table:
            self.column = "notes" if "notes" in classes else "code"
        elif tag == "pre" and self.in_table:
            self.pre += 1
            if self.pre == 1:
                self.cells.append((self.column, ""))
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs)
        elif tag in {"script", "img", "iframe"} and attrs.get("src"):
            self.remote.append(f"<{tag} src={attrs['src']}>")
        elif tag == "link":
            self.remote.append(f"<link href={attrs.get('href')}>")
        elif tag == "style":
            self.in_style = True

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        elif tag == "pre" and self.pre:
            self.pre -= 1
        elif tag == "style":
            self.in_style = False

    def handle_data(self, data):
        if self.pre:
            column, text = self.cells[-1]
            self.cells[-1] = (column, text + data)
        if self.in_style:
            self.style += data


def link_problems(page: Path, out: Path) -> list[str]:
    """The links of `page` that do not hold: a `#x` with no element of id x; a relative link to a
    file that is not in the project or the output folder (or to an id the target page lacks); an
    absolute address that is not a paper's versioned arXiv PDF, or whose page differs from the
    map's for the entry it names (data-paper, data-cite); anything loaded from elsewhere."""
    parsed = Page(page.read_text())
    problems = list(parsed.remote)
    if re.search(r"@import|url\(", parsed.style):
        problems.append("the style loads something")
    papers = {(e["arxiv"], str(e["version"])): key for key, e in edition.PAPERS.items()}
    for attrs in parsed.links:
        href = attrs["href"]
        if href.startswith("#"):
            if href[1:] not in parsed.ids:
                problems.append(f"{href}: no such id")
            continue
        if re.match(r"[a-z]+:", href):
            match = re.fullmatch(r"https://arxiv\.org/pdf/(\d{4}\.\d{5})v(\d+)(#page=(\d+))?", href)
            if not match or match.group(1, 2) not in papers:
                problems.append(f"{href}: not a paper's versioned arXiv PDF")
                continue
            paper, key = attrs.get("data-paper"), attrs.get("data-cite")
            if key is None:
                continue  # a paper's PDF as a whole (the header, the index)
            pages = edition.PAPERS.get(paper, {}).get("pages", {})
            if key not in pages:
                problems.append(f"{href}: the map has no {paper} {key}")
            elif href != edition.pdf_url(paper, pages[key]) or papers[match.group(1, 2)] != paper:
                problems.append(f"{href}: the map puts {paper} {key} at page {pages[key]}")
            continue
        path, _, fragment = href.partition("#")
        target = (page.parent / unquote(path)).resolve()
        if not target.is_file() or not (ROOT in target.parents or out in target.parents):
            problems.append(f"{href}: no such file in the project or the edition")
        elif fragment and target.suffix == ".html" and fragment not in Page(target.read_text()).ids:
            problems.append(f"{href}: no such id")
    return problems


# --- the build ----------------------------------------------------------------------------------

def test_the_command_writes_every_page_quickly(built):
    out, seconds = built
    assert seconds < 20, f"{seconds:.1f} s"  # about 1 s on 2 cores; loose for a busy machine
    assert {"coca.html", "virtex.html", "uniter.html", "oscar.html", "shared/attention.html",
            "shared/transformer.html", "shared/losses.html", "shared/decoding.html",
            "shared/ot.html"} <= set(SOURCES)
    assert all((out / page).is_file() for page in PAGES)


@pytest.mark.parametrize("page", list(SOURCES))
def test_every_source_line_is_on_its_page_once_and_in_order(built, page):
    out, _ = built
    source = (ROOT / SOURCES[page].path).read_text()
    cells = Page((out / page).read_text()).cells
    assert {column for column, _ in cells} == {"notes", "code"}
    assert line_problems(source, cells) == []


@pytest.mark.parametrize("page", PAGES)
def test_every_link_resolves_and_nothing_loads_from_elsewhere(built, page):
    out, _ = built
    assert link_problems(out / page, out) == []


def test_each_paper_page_links_its_pdf_note_and_tests(built):
    out, _ = built
    for name in ["coca", "virtex", "uniter", "oscar"]:
        parsed = Page((out / f"{name}.html").read_text())
        hrefs = [a["href"] for a in parsed.links]
        assert edition.pdf_url(name, None) in hrefs
        assert any(h.endswith(f"reference/{name}.md") for h in hrefs), name
        assert any(h.endswith("tests/test_losses.py") or h.endswith(f"tests/test_{name}.py")
                   for h in hrefs), name
        cites = [a for a in parsed.links if a.get("data-cite")]
        assert len(cites) > 20, (name, len(cites))  # the tags really are links


# --- the checkers fail where they should ---------------------------------------------------------

def doctored(text: str, how: str) -> str:
    """A page with one row of its table removed, repeated, or swapped with the next."""
    rows = re.findall(r"<tr[ >].*?</tr>", text.split('<table class="edition">')[1], re.DOTALL)
    rows = [r for r in rows if "<pre" in r]
    first, second = rows[3], rows[4]
    if how == "missing":
        return text.replace(first, "", 1)
    if how == "repeated":
        return text.replace(first, first + first, 1)
    return text.replace(first + second, second + first, 1)


@pytest.mark.parametrize("how", ["missing", "repeated", "swapped"])
def test_the_line_check_fails_on_a_doctored_page(built, how):
    out, _ = built
    source = (ROOT / "coca.py").read_text()
    cells = Page(doctored((out / "coca.html").read_text(), how)).cells
    assert line_problems(source, cells) != []


@pytest.mark.parametrize("bad", [
    '<a href="#no-such-row">x</a>',
    '<a href="no_such_page.html">x</a>',
    '<a href="../../../../../../outside.md">x</a>',
    '<a href="https://arxiv.org/pdf/2205.01917v2#page=3" data-paper="coca" data-cite="Eq. 2">x</a>',
    '<a href="https://arxiv.org/pdf/2205.01917v2" data-paper="coca" data-cite="§9.9">x</a>',
    '<a href="https://arxiv.org/pdf/2205.01917v1">x</a>',
    '<a href="https://example.org/">x</a>',
    '<script src="https://cdn.example.org/x.js"></script>',
    '<link rel="stylesheet" href="https://cdn.example.org/x.css">',
])
def test_the_link_check_fails_on_a_doctored_page(built, bad):
    out, _ = built
    page = out / "coca.html"
    assert link_problems(page, out) == []
    wrong = out / "doctored.html"
    wrong.write_text(page.read_text().replace("</body>", bad + "</body>"))
    try:
        assert link_problems(wrong, out) != []
    finally:
        wrong.unlink()


# --- citations and rows -------------------------------------------------------------------------

def cited(text: str, default: str | None = None) -> list[tuple[str, str, str]]:
    return [(c.paper, c.key, text[c.start:c.end]) for c in edition.citations(text, default)]


def test_citation_tags_split_into_their_locators():
    assert cited("[CoCa §3.1, Eq. 2]") == [("coca", "§3.1", "CoCa §3.1"),
                                           ("coca", "Eq. 2", "Eq. 2")]
    assert cited("[UNITER §3.2, Eq. 3; §A.7, Eq. 6, Algorithm 1; code]") == [
        ("uniter", "§3.2", "UNITER §3.2"), ("uniter", "Eq. 3", "Eq. 3"),
        ("uniter", "§A.7", "§A.7"), ("uniter", "Eq. 6", "Eq. 6"),
        ("uniter", "Alg. 1", "Algorithm 1")]
    assert cited("[Oscar §4, VQA]") == [("oscar", "§4 VQA", "Oscar §4, VQA")]
    assert cited('[CoCa §3.2 "Attentional Poolers"]') == [
        ("coca", "§3.2 Attentional Poolers", 'CoCa §3.2 "Attentional Poolers"')]
    assert cited("[VirTex §Method: textual\n    head; code]") == [
        ("virtex", "§Method: textual head", "VirTex §Method: textual\n    head")]
    assert cited("[UNITER §3.1, Oscar §3]") == [("uniter", "§3.1", "UNITER §3.1"),
                                                ("oscar", "§3", "Oscar §3")]
    assert cited("[VirTex §Downstream; CoCa Tables 2, 4]") == [
        ("virtex", "§Downstream", "VirTex §Downstream"), ("coca", "Table 2", "CoCa Tables 2"),
        ("coca", "Table 4", "4")]
    assert cited("[Oscar §3, Eqs. 2-4; §4]") == [
        ("oscar", "§3", "Oscar §3"), ("oscar", "Eq. 2", "Eqs. 2-4"), ("oscar", "§4", "§4")]
    assert cited("[CoCa §4.3, Table 8b] [Oscar Table 2(b)]") == [
        ("coca", "§4.3", "CoCa §4.3"), ("coca", "Table 8", "Table 8b"),
        ("oscar", "Table 2", "Oscar Table 2(b)")]
    assert cited("[Oscar §5.1; Rennie et al. 2017; code: BeamHypotheses.is_done]") == [
        ("oscar", "§5.1", "Oscar §5.1")]
    assert cited("[§4.2.3, Appendix B]", "coca") == [("coca", "§4.2.3", "§4.2.3"),
                                                     ("coca", "App. B", "Appendix B")]
    assert cited("[§4.2.3, Appendix B]") == []  # no paper to cite outside a paper file
    assert cited("[code] [CLS] x[i] [CoCa ...] [Oscar §3: R = 4 or 6]") == [
        ("oscar", "§3", "Oscar §3")]


def test_every_citation_in_the_project_has_an_entry_in_the_map():
    papers = set(edition.PAPERS)
    files = sorted([*ROOT.glob("*.py"), *(ROOT / "shared").glob("*.py")])
    problems = {str(p.relative_to(ROOT)): edition.citation_problems(
        p.read_text(), p.stem if p.stem in papers and p.parent == ROOT else None) for p in files}
    assert {k: v for k, v in problems.items() if v} == {}
    for key, entry in edition.PAPERS.items():  # a page is a positive page number or unknown
        assert all(page is None or (isinstance(page, int) and page > 0)
                   for page in entry["pages"].values()), key


def test_the_citation_check_fails_on_a_citation_the_map_lacks():
    assert edition.citation_problems("x = 1  # [CoCa §9.9, Table 99; code]") == [
        "CoCa §9.9", "CoCa Table 99"]
    assert edition.citation_problems('"""[§7.7]: a bare tag."""', "uniter") == ["UNITER §7.7"]
    assert edition.citation_problems("[VirTex §Results: everything]") == [
        "VirTex §Results: everything"]


def test_module_docstrings_name_the_version_the_map_links():
    for key, entry in edition.PAPERS.items():
        doc = (ROOT / f"{key}.py").read_text().split('"""')[1]
        assert entry["arxiv"] in doc, key
        version = re.search(rf"{re.escape(entry['arxiv'])}v(\d+)", doc)
        assert version is None or int(version.group(1)) == entry["version"], key


SMALL = '''"""Module doc."""

import math  # a trailing comment
#   that carries on

# --- 1. A section ---------------

# a comment above a definition
@staticmethod
def f(x):
    """f's docstring,
    two lines."""
    y = x + 1
    # a comment inside a body
    return y


CONFIG = dict(a=1,
              # a comment inside brackets
              b=2)
'''


def test_rows_put_docstrings_and_comments_left_and_the_code_they_introduce_right():
    lines, rows = edition.read_rows(SMALL)
    assert [([b.lines for b in r.notes], r.code) for r in rows] == [
        ([[1]], [2, 3, 4, 5]),                        # the trailing comment's second line stays
        ([[6], [8], [11, 12]], [7, 9, 10, 13]),       # comments above a definition share its row
        ([[14]], [15, 16, 17, 18, 19, 20])]           # a comment inside brackets stays in the code
    assert rows[1].anchor == "f" and rows[1].notes[0].anchor == "section-1"
    assert edition.note_text(rows[1].notes[2], lines) == "f's docstring,\ntwo lines."
    assert line_problems(SMALL, [("notes" if i == 0 else "code", t) for r in rows
                                 for i, t in enumerate(["\n".join(edition.note_text(b, lines)
                                                                  for b in r.notes),
                                                        "\n".join(lines[n - 1] for n in r.code)])]
                         ) == []


# --- in a browser -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver, 1,400 x 900, run as root (no sandbox).
    Selenium is given both paths, so its manager looks nothing up."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver_path) if not Path(p).is_file()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
            pytest.fail(f"the browser tests need {missing}: .ci/run installs chromium, "
                        "chromium-driver and selenium")
        pytest.skip(f"no {missing} here (CI installs them)")
    options = Options()
    options.binary_location = chromium
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,900", "--force-device-scale-factor=1"]:
        options.add_argument(argument)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


CELLS = """return Array.from(document.querySelectorAll('table.edition td pre')).map(
    p => [p.closest('td').classList.contains('notes') ? 'notes' : 'code', p.innerText]);"""
MISSING_IDS = """return Array.from(document.querySelectorAll('a[href^="#"]'))
    .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id));"""


def not_blank(png: bytes) -> bool:
    """A screenshot with text on it: many colours, and more than 1 % of pixels not white."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    white = sum(n for n, colour in colours if min(colour) >= 250)
    return len(colours) > 16 and white < 0.99 * image.width * image.height


@pytest.mark.parametrize("page", PAGES)
def test_each_page_in_a_browser_fits_1400_px_and_shows_every_line(built, browser, page):
    out, _ = built
    browser.get((out / page).as_uri())
    width, scroll_width = browser.execute_script(
        "return [window.innerWidth, document.documentElement.scrollWidth]")
    assert width >= 1350, width  # the window really is about 1,400 px wide
    assert scroll_width <= width, (scroll_width, width)
    assert browser.execute_script(MISSING_IDS) == []
    if page in SOURCES:
        cells = [tuple(cell) for cell in browser.execute_script(CELLS)]
        assert line_problems((ROOT / SOURCES[page].path).read_text(), cells) == []
    assert not_blank(browser.get_screenshot_as_png())


def test_the_browser_line_check_fails_on_a_page_with_a_row_missing(built, browser):
    out, _ = built
    wrong = out / "doctored-missing.html"
    wrong.write_text(doctored((out / "coca.html").read_text(), "missing"))
    try:
        browser.get(wrong.as_uri())
        cells = [tuple(cell) for cell in browser.execute_script(CELLS)]
        assert line_problems((ROOT / "coca.py").read_text(), cells) != []
    finally:
        wrong.unlink()
