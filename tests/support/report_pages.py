"""Read a run report's HTML as data: each section's text and every image's src (tests of the report and of what it
shows, e.g. goodput). A support module, so tests import it at the top instead of importing another test module
mid-test (pytest rewrote that module's asserts inside a running test: CPython 3.11's parser failed there once)."""

from html.parser import HTMLParser


class Sections(HTMLParser):
    """Each <section id=...>'s text, and every <img>'s src."""

    def __init__(self):
        super().__init__()
        self.text, self.srcs, self._open = {}, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._open.append(attrs.get("id"))
            self.text.setdefault(attrs.get("id"), "")
        elif tag == "img":
            self.srcs.append(attrs.get("src", ""))
        elif tag in ("td", "th", "br") and self._open:  # keep table cells apart in the text
            self.text[self._open[-1]] += " "

    def handle_endtag(self, tag):
        if tag == "section" and self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open:
            self.text[self._open[-1]] += data


def sections(page: str) -> Sections:
    parser = Sections()
    parser.feed(page)
    return parser
