"""The report's HTML: one self-contained page (inline style, figures as base64 PNG, no network).

Kept apart from the figures and the folder reading so the page can be checked on its own: every
value that reaches the page goes through `html.escape`, and nothing refers to a URL.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.3em; }
p.caption { color: #444; max-width: 60em; }
dl.header { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; font-family: ui-monospace, monospace; }
div.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0.5em 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
div.figs.pair figure { max-width: calc(50% - 0.5em); }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, td.text { text-align: left; }
tr.best td { background: #e6f4e6; font-weight: 600; }
div.scroll { overflow-x: auto; }
nav ul { columns: 2; } .note { color: #8a5a00; }
"""


@dataclass
class Figure:
    """A PNG saved next to the page and embedded in it."""

    path: Path
    alt: str
    caption: str = ""


@dataclass
class Section:
    """One heading with a plain-language caption (what to look for), then tables and figures."""

    title: str
    caption: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # HTML made by `html_table` / `markdown_table`
    notes: list[str] = field(default_factory=list)  # plain text, escaped when rendered


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _numeric(s: str) -> bool:
    """A table cell that reads as a number (or mean ± sd), right-aligned like numbers."""
    return bool(re.fullmatch(r"[-+]?[0-9.eE+-]+( ± [0-9.eE+-]+)?|–", s.strip()))


def html_table(
    columns: list[str], rows: list[list], best_row: int | None = None, caption: str = ""
) -> str:
    """An escaped HTML table; `best_row` (index into rows) is marked with class `best` and a ★."""
    out = ['<div class="scroll"><table>']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append(
        "<thead><tr>"
        + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        + "</tr></thead><tbody>"
    )
    for i, row in enumerate(rows):
        cells = [_cell(v) for v in row]
        if i == best_row and cells:
            cells[0] = "★ " + cells[0]
        cls = ' class="best"' if i == best_row else ""
        text = ' class="text"'
        tds = [
            f"<td{text if isinstance(v, str) and not _numeric(v) else ''}>{html.escape(c)}</td>"
            for v, c in zip(row, cells)
        ]
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def markdown_table(md: str) -> tuple[str, list[str]]:
    """(HTML table, the other non-empty lines) of a Markdown text holding one pipe table.

    Only what `raycell experiment` writes is needed: a `# title`, notes and one `| a | b |` table.
    """
    rows, notes = [], []
    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                continue  # the |---|---| rule
            rows.append(cells)
        elif s and not s.startswith("#"):
            notes.append(s.replace("`", ""))
    if not rows:
        return "", notes
    return html_table(rows[0], rows[1:]), notes


def _img(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return (
        f'<figure><img alt="{html.escape(fig.alt, quote=True)}" '
        f'src="data:image/png;base64,{data}">{cap}</figure>'
    )


def _anchor(i: int) -> str:
    return f"s{i}"


def render_page(title: str, header: dict[str, str], sections: list[Section]) -> str:
    """The whole page as a string (UTF-8, no external resources)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<header><h1>{html.escape(title)}</h1>",
        '<dl class="header">',
    ]
    for k, v in header.items():
        parts.append(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>")
    parts.append("</dl></header>")
    if len(sections) > 1:
        parts.append("<nav><h2>Contents</h2><ul>")
        parts += [
            f'<li><a href="#{_anchor(i)}">{html.escape(s.title)}</a></li>'
            for i, s in enumerate(sections)
        ]
        parts.append("</ul></nav>")
    parts.append("<main>")
    for i, s in enumerate(sections):
        parts.append(f'<section id="{_anchor(i)}"><h2>{html.escape(s.title)}</h2>')
        parts.append(f'<p class="caption">{html.escape(s.caption)}</p>')
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
        parts += s.tables
        if s.figures:  # side by side where they fit (scatter plots, confusion matrices)
            cls = "figs pair" if len(s.figures) > 1 else "figs"  # two to a row, scaled down
            parts += [f'<div class="{cls}">'] + [_img(f) for f in s.figures] + ["</div>"]
        parts.append("</section>")
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
