"""The README and the docs/ pages link to each other, to results files and to committed pictures:
every relative link must point to a file that exists (and, with a #fragment, to a heading that
exists in it), and the committed pictures stay small enough for a repository."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) and ![alt](target); a target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MAX_PICTURE_BYTES = 300 * 1024


def _without_code_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _without_code(text: str) -> str:
    """Fenced code blocks and inline code hold commands, not links."""
    return re.sub(r"`[^`\n]*`", "", _without_code_fences(text))


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(m) for m in re.findall(r"^#{1,6}\s+(.*)$", _without_code_fences(page.read_text()), re.M)}


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_without_code(page.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_the_readme_links_to_a_page_per_verb():
    links = _relative_links(REPO / "README.md")
    for page in ("docs/data.md", "docs/train.md", "docs/evaluate.md", "docs/predict.md", "docs/serve.md"):
        assert page in links, f"README.md should link {page}"


def test_anchor_follows_githubs_rule():
    assert _anchor("Cross-validation: `melanoma summarize`") == "cross-validation-melanoma-summarize"
    assert _anchor("Leak-proof by content") == "leak-proof-by-content"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{fragment} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_committed_pictures_are_small():
    pictures = sorted((REPO / "docs" / "images").glob("*.png"))
    assert pictures, "docs/images/ should hold the README's pictures"
    big = [f"{p.name}: {p.stat().st_size // 1024} KiB" for p in pictures if p.stat().st_size > MAX_PICTURE_BYTES]
    assert not big, f"pictures over {MAX_PICTURE_BYTES // 1024} KiB (shrink them): {big}"
