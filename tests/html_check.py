"""Reading rendered HTML in tests: the tables (cells per row), the elements with their attributes and
the text of a page or fragment (standard library only)."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """Tables (rows of cell counts), tags with attributes, and the text of an HTML fragment."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[tuple[str, int]]] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._row: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(tag)

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.tables[-1].append((self._row[0] if self._row else "", len(self._row)))
            self._row = None

    def handle_data(self, data):
        self.text.append(data)

    def handler_elements(self) -> list[tuple[str, dict]]:
        """Elements with an ``on*`` event-handler attribute."""
        return [(t, a) for t, a in self.tags if any(k.startswith("on") for k in a)]
