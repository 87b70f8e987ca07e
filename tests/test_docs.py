"""README and docs/: every relative link reaches a file (and a #anchor a heading); README stays short."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)  # [name]: target
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in a Markdown page, repeats numbered -1, -2 as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return LINK.findall(text) + REF_LINK.findall(text)


def broken_links(page: Path) -> list[str]:
    """The relative links in `page` whose file or heading does not exist."""
    bad = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {path or page.name})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert links(page) or page.name != "README.md", "a README without links: the link pattern is broken"
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: broken links: {'; '.join(bad)}"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_links_every_docs_page():
    readme = set(links(ROOT / "README.md"))
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in {t.partition("#")[0] for t in readme}]
    assert not missing, f"README.md does not link {missing}"


def test_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Memory: `auto` profiles\n\n## Memory: `auto` profiles\n")
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](other.md#memory-auto-profiles) [ok2](other.md#memory-auto-profiles-1) "
                    "[ok3](#title) [web](https://example.com/x.md)\n"
                    "[gone](missing.md) [bad anchor](other.md#nothing) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#nothing (no heading #nothing in other.md)"]


def test_slug_matches_github():
    assert slug("Checkpoints, resume and interruption") == "checkpoints-resume-and-interruption"
    assert slug("What the run writes back: config.yaml") == "what-the-run-writes-back-configyaml"
    assert slug("CUDA graphs (`compile`)") == "cuda-graphs-compile"
    assert slug("Train SD 2.1 base on your subject (GPU)") == "train-sd-21-base-on-your-subject-gpu"


def load_config_table():
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_table_write_replaces_only_between_markers(tmp_path):
    ct = load_config_table()
    doc = tmp_path / "configuration.md"
    doc.write_text(f"# Options\n\nbefore\n{ct.START}\n| stale | table |\n{ct.END}\nafter\n")
    assert ct.write(doc) is True
    text = doc.read_text()
    assert text == f"# Options\n\nbefore\n{ct.START}\n{ct.table()}{ct.END}\nafter\n"
    assert "| `learning_rate` | `2e-06` |" in text and "stale" not in text
    assert ct.write(doc) is False  # already up to date: the file is left alone
    doc.write_text("# Options\n\nno markers\n")
    with pytest.raises(ValueError, match="options:start"):
        ct.write(doc)


def test_configuration_doc_table_is_current():
    ct = load_config_table()
    text = (ROOT / "docs" / "configuration.md").read_text()
    current = text.split(ct.START, 1)[1].split(ct.END, 1)[0]
    assert current == "\n" + ct.table(), "docs/configuration.md's option table is stale: run scripts/config_table.py --write"
