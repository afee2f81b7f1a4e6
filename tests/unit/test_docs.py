"""The sources the code cites live in the repository: a citation of a section of docs/facts.md
(the page's path, a comma, the section's title in double quotes) names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FACTS = REPO / "docs" / "facts.md"
CITATION = re.compile(r'docs/facts\.md, "([^"\n]+)"')
CITING = ("deploykit", "templates", "tests", "docs", "images", "compose")


def citations() -> dict[str, list[str]]:
    """Section -> the files that cite it."""
    found: dict[str, list[str]] = {}
    files = [REPO / "README.md", REPO / "DEVELOPERS.md"]
    for folder in CITING:
        files += [
            p for p in (REPO / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        ]
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in CITATION.finditer(text):
            found.setdefault(match.group(1), []).append(str(path.relative_to(REPO)))
    return found


def test_every_citation_names_a_section_of_the_facts_page() -> None:
    sections = set(re.findall(r"^#+ (.+)$", FACTS.read_text(), re.MULTILINE))
    cited = citations()
    assert len(cited) >= 5, cited  # the code cites the page; an empty scan would prove nothing
    missing = {section: files for section, files in cited.items() if section not in sections}
    assert missing == {}, f"cited sections that docs/facts.md lacks: {missing}"


def test_the_design_page_links_the_facts_page() -> None:
    assert "(facts.md)" in (REPO / "docs" / "design.md").read_text()
