"""Escaping text that came from data, one function per target format.

Categories, source names, scenario and cluster names, questions and answers come from files users did
not write (scraped filings, shared datasets), so every card, report and Prefect artifact renders them
through one of these functions and never with a bare f-string:

- :func:`md_text`: inline Markdown (a sentence, a heading, a list item): newlines become spaces, Markdown
  punctuation that could open a link, code span, table cell or escape is backslash-escaped, and HTML
  special characters become entities (the Prefect UI renders artifact Markdown in a browser);
- :func:`md_cell`: one Markdown table cell: :func:`md_text`, so a ``|`` stays in its cell and a newline
  cannot split the row;
- :func:`md_code`: an inline code span that holds any text (a fence longer than its longest backtick
  run; ``|`` escaped inside tables, where GFM splits cells before it parses code spans);
- :func:`md_table`: a whole table of cells, with as many cells in each row as in the header;
- :func:`plot_text`: a matplotlib label (one line; ``$`` would start mathtext);
- :func:`html_text`: text in HTML (:func:`html.escape`, quotes included);
- :func:`yaml_scalar`: one YAML value, quoted by ``yaml.safe_dump`` as needed (front matter is always
  written with ``yaml.safe_dump`` of the whole mapping, which quotes the same way);
- :func:`slug`: a name that goes into a file name, a Hub ``source_datasets`` entry or a config name.
"""

from __future__ import annotations

import html
import re
from typing import Any

import yaml

# line breaks of every kind (CR, LF, NEL, LS, PS, VT, FF) and other C0 controls but TAB
_BREAKS = re.compile(r"[\r\n\x0b\x0c\x85\u2028\u2029]+")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
# one pass, so a backslash in the data is escaped like the rest; not "_" (GFM does not emphasise inside
# words); "[" only where a link could form (below)
_MD_PUNCT = re.compile(r"([\\`|*~])")
_LINK = re.compile(r"\]\s*[(\[]")  # "](" or "][": what makes "[...]" a link or an image
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def one_line(value: Any) -> str:
    """``str(value)`` on one line: every line break becomes one space, other control characters go."""
    return _CONTROLS.sub("", _BREAKS.sub(" ", "" if value is None else str(value)))


def md_text(value: Any) -> str:
    """Inline Markdown that shows ``value`` as literal text."""
    text = _MD_PUNCT.sub(r"\\\1", one_line(value))
    if _LINK.search(text):  # plain brackets ("0.25 [0.00, 0.50]") stay as they are
        text = text.replace("[", "\\[")
    return "".join(_HTML.get(c, c) for c in text)


def md_cell(value: Any) -> str:
    """One Markdown table cell showing ``value`` as literal text (never an extra column or row)."""
    return md_text(value)


def md_code(value: Any, *, in_table: bool = False) -> str:
    """An inline code span showing ``value`` verbatim (code spans render HTML as text)."""
    text = one_line(value)
    if in_table:
        text = text.replace("|", "\\|")
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_table(header: list[Any], rows: list[list[Any]], *, raw: bool = False) -> str:
    """A Markdown table; each cell through :func:`md_cell` unless ``raw`` (cells already rendered, e.g.
    with :func:`md_code`). A row shorter or longer than the header is an error, not a broken table."""
    cell = (lambda c: one_line(c)) if raw else md_cell
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"table row has {len(r)} cells for {len(header)} columns: {r!r}")
        out.append("| " + " | ".join(cell(c) for c in r) + " |")
    return "\n".join(out)


def plot_text(value: Any) -> str:
    """A matplotlib label showing ``value`` as it is: one line, ``$`` escaped (mathtext)."""
    return one_line(value).replace("$", r"\$")


def html_text(value: Any) -> str:
    """Text for HTML content or a quoted attribute value."""
    return html.escape("" if value is None else str(value), quote=True)


def yaml_scalar(value: Any) -> str:
    """One YAML value (a string, number, bool or None) as ``yaml.safe_dump`` writes it, on one line
    when it can be: safe to put after ``key: `` in front matter."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.removesuffix("\n...\n").rstrip("\n")


def slug(name: Any) -> str:
    """A name safe in file names and Hub ids: runs of anything but ``A-Za-z0-9_./-`` become ``-``;
    no ``..`` path step survives."""
    s = re.sub(r"[^A-Za-z0-9_./-]+", "-", "" if name is None else str(name))
    return re.sub(r"\.{2,}", ".", s)


def text_table(header: list[Any], rows: list[list[Any]], *, right: tuple[int, ...] = ()) -> str:
    """An aligned plain-text table for a terminal: each cell on one line (:func:`one_line`, so no
    control character or line break from data reaches the terminal), columns padded to their widest
    cell and separated by two spaces, a dashed rule under the header; ``right``: column indexes
    aligned right. A row shorter or longer than the header is an error."""
    cells = [[one_line(c) for c in header]]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row has {len(r)} cells, header {len(header)}: {r!r}")
        cells.append([one_line(c) for c in r])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])])
