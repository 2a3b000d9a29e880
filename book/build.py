"""Build the course as a browsable HTML book (``make site``): one page per executed lesson, an index
made from the README (the lesson map, the measured results), the Markdown pages the README links
to, and the figures.

    python book/build.py [--notebooks build/course] [--out build/site] [--repository URL]

The lessons come from ``make course`` (every notebook executed in full mode into build/course/);
each becomes a page with ``nbconvert``'s JupyterLab template (figures embedded in the page), with a
bar on top: the index, the previous and next lessons, and, when the course's public repository is
known (``--repository``, or ``[project.urls] Repository`` in pyproject.toml), buttons that open the
lesson on Binder and on Colab. Links between lessons (``05_data_parallel.ipynb``) and to the
repository's Markdown files (``scripts/README.md``) are rewritten to the site's own pages.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
from pathlib import Path

import mistune
import nbformat
import tomllib
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent
STYLE = """
<style>
.course-bar { position: sticky; top: 0; z-index: 10; background: #1f2937; color: #f9fafb;
  padding: 8px 16px; font: 14px/1.4 system-ui, sans-serif; display: flex; gap: 18px;
  align-items: center; flex-wrap: wrap; }
.course-bar a { color: #93c5fd; text-decoration: none; }
.course-bar a:hover { text-decoration: underline; }
.course-bar .launch { margin-left: auto; display: flex; gap: 12px; }
.course-page { max-width: 980px; margin: 24px auto; padding: 0 16px;
  font: 15px/1.55 system-ui, sans-serif; }
.course-page table { border-collapse: collapse; margin: 12px 0; }
.course-page th, .course-page td { border: 1px solid #d1d5db; padding: 4px 8px;
  vertical-align: top; }
.course-page img { max-width: 100%; }
.course-page code { background: #f3f4f6; padding: 0 3px; }
.course-page pre { background: #f3f4f6; padding: 8px; overflow-x: auto; }
</style>
"""


def repository_url(given: str | None) -> str | None:
    """The public repository, for launch links: ``--repository``, else pyproject's
    ``[project.urls] Repository``; None when neither says (then no launch links)."""
    if given:
        return given.rstrip("/")
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("urls", {})
    url = urls.get("Repository")
    return url.rstrip("/") if url else None


def launch_links(repository: str | None, notebook: str) -> str:
    """Binder and Colab buttons for one lesson (GitHub repositories only)."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(\.git)?", repository or "")
    if not match:
        return ""
    owner, repo = match.group(1), match.group(2)
    binder = f"https://mybinder.org/v2/gh/{owner}/{repo}/HEAD?labpath=notebooks/{notebook}"
    colab = (
        f"https://colab.research.google.com/github/{owner}/{repo}/blob/main/notebooks/{notebook}"
    )
    return (
        f'<span class="launch"><a href="{binder}">launch on Binder</a>'
        f'<a href="{colab}">open in Colab</a></span>'
    )


def bar(title: str, prev: Path | None, next_: Path | None, launch: str) -> str:
    parts = ['<nav class="course-bar"><a href="index.html">Parallel Deep Learning with PyTorch</a>']
    if prev is not None:
        parts.append(f'<a href="{prev.stem}.html">&larr; {html.escape(prev.stem)}</a>')
    parts.append(f"<strong>{html.escape(title)}</strong>")
    if next_ is not None:
        parts.append(f'<a href="{next_.stem}.html">{html.escape(next_.stem)} &rarr;</a>')
    return "".join(parts) + launch + "</nav>"


def rewrite_links(page: str, lessons: set[str], markdown_pages: dict[str, str]) -> str:
    """Links to lessons (``X.ipynb``) and to the repository's Markdown files, to the site's pages."""

    def fix(match: re.Match) -> str:
        quote, target = match.group(1), match.group(2)
        path, _, anchor = target.partition("#")
        name = Path(path).name
        anchor = f"#{anchor}" if anchor else ""
        if name.endswith(".ipynb") and Path(name).stem in lessons:
            return f"href={quote}{Path(name).stem}.html{anchor}{quote}"
        key = path.removeprefix("../").removeprefix("./")
        if key in markdown_pages:
            return f"href={quote}{markdown_pages[key]}{anchor}{quote}"
        return match.group(0)

    return re.sub(r"href=([\"'])([^\"'#][^\"']*)\1", fix, page)


def _with_files(md: Path, into: Path) -> str:
    """The Markdown of ``md`` with its links to files beside it (``slurm_ddp.sbatch``) copied
    into ``into`` and pointed there."""
    text = md.read_text()

    def copy(match: re.Match) -> str:
        target = match.group(2)
        source = md.parent / target
        if re.match(r"[a-z]+:", target) or target.startswith("#") or target.endswith(".md"):
            return match.group(0)
        if not source.is_file():
            return match.group(0)
        into.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, into / source.name)
        return f"{match.group(1)}({into.name}/{source.name})"

    return re.sub(r"(\[[^\]]*\])\(([^)\s]+)\)", copy, text)


def markdown_page(title: str, body_markdown: str, links) -> str:
    body = mistune.html(body_markdown)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"{STYLE}</head><body>{bar(title, None, None, '')}"
        f'<main class="course-page">{links(body)}</main></body></html>'
    )


def build(notebooks: Path, out: Path, repository: str | None = None) -> list[Path]:
    """Write the site into ``out``; return the pages written. Every lesson of notebooks/ gets a
    page: its executed copy from ``notebooks`` where there is one, else the lesson without outputs
    (and a line saying so)."""
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    executed = {p.name for p in notebooks.glob("[0-9][0-9]_*.ipynb")}
    if not executed:
        raise SystemExit(
            f"no executed lessons in {notebooks}: run `make course` first (it executes every "
            "notebook into build/course/)"
        )
    missing = [p.name for p in sources if p.name not in executed]
    if missing:
        print(f"not executed, shown without outputs: {', '.join(missing)}", file=sys.stderr)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lessons = {p.stem for p in sources}
    # the repository's Markdown pages the README links to, as pages of their own
    markdown_pages = {"README.md": "index.html"}
    for md in sorted(ROOT.glob("*/README.md")):
        if not md.parent.name.startswith(".") and md.parent.name not in ("build", "book"):
            markdown_pages[f"{md.parent.name}/README.md"] = f"{md.parent.name}.html"
    for md in sorted((ROOT / "docs").glob("*.md")):  # docs/benchmarks.md -> benchmarks.html
        markdown_pages[f"docs/{md.name}"] = f"{md.stem}.html"
    links = lambda page: rewrite_links(page, lessons, markdown_pages)  # noqa: E731
    written = []
    exporter = HTMLExporter(template_name="lab")
    for i, source in enumerate(sources):
        prev = sources[i - 1] if i > 0 else None
        next_ = sources[i + 1] if i + 1 < len(sources) else None
        ran = source.name in executed
        notebook = nbformat.read(notebooks / source.name if ran else source, as_version=4)
        page, _ = exporter.from_notebook_node(notebook)
        nav = bar(source.stem, prev, next_, launch_links(repository, source.name))
        if not ran:
            nav += '<p class="course-page"><em>Not executed for this site: no outputs.</em></p>'
        page = page.replace("</head>", STYLE + "</head>", 1)
        page = re.sub(r"(<body[^>]*>)", lambda m, nav=nav: m.group(1) + nav, page, count=1)
        target = out / f"{source.stem}.html"
        target.write_text(links(page))
        written.append(target)
    readme = (ROOT / "README.md").read_text()
    for lesson in sorted(lessons):  # the lesson map's `08_sharding` cells become links
        readme = readme.replace(f"| `{lesson}` |", f"| [`{lesson}`]({lesson}.ipynb) |")
    index = out / "index.html"
    index.write_text(markdown_page("Parallel Deep Learning with PyTorch", readme, links))
    written.append(index)
    for key, name in markdown_pages.items():
        if key != "README.md":
            folder = Path(key).parent
            text = _with_files(ROOT / key, out / folder)  # its own files (scripts), copied along
            if folder.name == "docs":  # its figures live in docs/img/, copied below
                text = text.replace("](img/", "](docs/img/")
                # a link to a page beside it (architecture.md) names it as the README would
                text = re.sub(r"\]\(([\w-]+\.md)", r"](docs/\1", text)
            page = markdown_page(key, text, links)
            (out / name).write_text(page)
            written.append(out / name)
    if (ROOT / "docs" / "img").is_dir():  # the README's figures, at the same relative paths
        shutil.copytree(ROOT / "docs" / "img", out / "docs" / "img")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--notebooks", type=Path, default=ROOT / "build" / "course")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "site")
    p.add_argument("--repository", help="the course's public repository (for launch links)")
    args = p.parse_args(argv)
    pages = build(args.notebooks, args.out, repository_url(args.repository))
    print(f"{len(pages)} pages in {args.out} (open {args.out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
