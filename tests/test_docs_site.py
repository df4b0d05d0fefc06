"""The documentation site builds with --strict (what `make docs` runs): a broken link or anchor
in a chapter fails the build, the changelog page carries CHANGELOG.md, and notes waiting in
docs/pending/ stay out of the site."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).with_name("mkdocs")


def build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs", ignore=shutil.ignore_patterns("pending"))
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, project / name)
    return project


def test_site_builds_strict_with_the_changelog(tmp_path: Path) -> None:
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    changelog = (tmp_path / "site" / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Keep a Changelog" in changelog
    assert "Unreleased" in changelog
    reference = (tmp_path / "site" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert 'id="model_map"' in reference


BROKEN = {
    "[x](routing.md#no-such-heading)": "does not contain an anchor '#no-such-heading'",
    "[x](no-such-page.md)": "no-such-page.md",
}


def test_a_broken_link_fails_the_build_but_pending_notes_are_left_out(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    links = "\n\n".join(BROKEN)
    pending = project / "docs" / "pending"
    pending.mkdir()
    (pending / "someone.md").write_text(f"## For chapter: routing\n\n{links}\n", encoding="utf-8")
    assert build(project, tmp_path / "site-pending").returncode == 0
    assert not (tmp_path / "site-pending" / "pending").exists()
    chapter = project / "docs" / "troubleshooting.md"
    chapter.write_text(chapter.read_text(encoding="utf-8") + f"\n{links}\n", encoding="utf-8")
    result = build(project, tmp_path / "site-broken")
    assert result.returncode != 0
    for complaint in BROKEN.values():
        assert complaint in result.stderr


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc (mkdocs) and GitHub give a heading like ours."""
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_readme_links_reach_pages_and_headings_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#([\w-]+))?\)", readme)
    assert len(links) >= 10
    for path, anchor in links:
        page = ROOT / path
        assert page.is_file(), path
        if anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
            assert anchor in {slug(heading) for heading in headings}, f"{path}#{anchor}"
