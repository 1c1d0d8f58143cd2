"""Named corpora of real text found on this machine, for `streamrnn bench quality`.

Three kinds of text a daemon meets (source code, prose, structured records and logs),
each in two corpora: one to tune the defaults on, one held out, so that a default that
only suits one text shows up. Nothing is downloaded: each corpus is files that Python,
torch or a Debian package put there, read in a fixed order (sorted paths), so a corpus
is the same bytes on every machine with the same packages. A corpus that is not there
raises CorpusMissing, saying what to install.

    corpus_bytes("python-docs", 1 << 20)   # its first MiB (or all of it, if shorter)

`path:FILE` is a corpus too: the bytes of any file. ROOTS says where the Debian
corpora live; tests point it at trees of their own.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable

from .textdata import stdlib_files

# where the Debian corpora are: a folder, or for dpkg-status the file itself
ROOTS = {
    "python-docs": "/usr/share/doc/python3.11/html/_sources",
    "debian-handbook": "/usr/share/doc/debian-handbook/html/en-US",
    "dpkg-status": "/var/lib/dpkg/status",
    "apt-logs": "/var/log",
}
APT_LOGS = ("dpkg.log", "apt/history.log", "dpkg.log.1")  # in this order, those present
DEBIAN = "a Debian or Ubuntu system"


class CorpusMissing(Exception):
    """The corpus is not on this machine; the message says what to install."""


@dataclass(frozen=True)
class Corpus:
    name: str
    kind: str    # source | prose | structured (file: a path:FILE corpus)
    role: str    # tune | held-out (given: a path:FILE corpus)
    about: str   # what it is, in a few words
    read: Callable[[int | None], bytes]  # its bytes, at least the first max_bytes of them


def stdlib(max_bytes: int | None = None) -> bytes:
    try:
        files = stdlib_files()
    except RuntimeError as e:
        raise CorpusMissing(f"{e}: needs a Python installed with its standard library "
                            "sources (the *.py files)") from None
    return _concatenated(files, max_bytes)


def torch_source(max_bytes: int | None = None) -> bytes:
    # find_spec, not import: importing torch costs seconds and memory, reading it none
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissing("torch is not installed: pip install torch")
    root = Path(list(spec.submodule_search_locations)[0])
    return _concatenated(_sorted_under(root, "*.py", "pip install torch"), max_bytes)


def python_docs(max_bytes: int | None = None) -> bytes:
    root = Path(ROOTS["python-docs"])
    files = _sorted_under(root, "*.rst.txt", "apt-get install python3.11-doc")
    return _concatenated(files, max_bytes)


def debian_handbook(max_bytes: int | None = None) -> bytes:
    root = Path(ROOTS["debian-handbook"])
    pages = _sorted_under(root, "*.html", "apt-get install debian-handbook", recursive=False)
    texts = (html_to_text(_read(p).decode("utf-8", "replace")).encode() for p in pages)
    return _joined(texts, max_bytes)


def dpkg_status(max_bytes: int | None = None) -> bytes:
    path = Path(ROOTS["dpkg-status"])
    if not path.is_file():
        raise CorpusMissing(f"no {path}: dpkg's package database, found on {DEBIAN}")
    return _concatenated([path], max_bytes)


def apt_logs(max_bytes: int | None = None) -> bytes:
    root = Path(ROOTS["apt-logs"])
    logs = [root / name for name in APT_LOGS if (root / name).is_file()]
    if not logs:
        raise CorpusMissing(f"none of {', '.join(str(root / n) for n in APT_LOGS)}: the "
                            f"logs dpkg and apt write on {DEBIAN} that installed packages")
    return _concatenated(logs, max_bytes)


CORPORA = {c.name: c for c in [
    Corpus("stdlib", "source", "tune", "the Python standard library's *.py files of "
           "20,000+ bytes, largest first", stdlib),
    Corpus("torch-source", "source", "held-out", "the installed torch package's *.py "
           "files", torch_source),
    Corpus("python-docs", "prose", "tune", "the reStructuredText sources of Python's "
           "documentation (Debian's python3.11-doc)", python_docs),
    Corpus("debian-handbook", "prose", "held-out", "The Debian Administrator's Handbook "
           "as plain text (Debian's debian-handbook)", debian_handbook),
    Corpus("dpkg-status", "structured", "tune", "dpkg's package database, Debian "
           "control records", dpkg_status),
    Corpus("apt-logs", "structured", "held-out", "dpkg's and apt's logs", apt_logs),
]}


def corpus(name: str) -> Corpus:
    """The corpus called `name`: one of CORPORA, or path:FILE. ValueError if neither."""
    if name.startswith("path:"):
        path = Path(name[len("path:"):])
        return Corpus(name, "file", "given", f"the file {path}",
                      lambda max_bytes: _concatenated([path], max_bytes))
    if name not in CORPORA:
        raise ValueError(f"no corpus {name!r}: the corpora are {', '.join(CORPORA)}, "
                         "or path:FILE")
    return CORPORA[name]


def corpus_bytes(name: str, max_bytes: int) -> bytes:
    """The corpus's first `max_bytes` bytes; all of it if it is shorter (never repeated).
    Raises CorpusMissing if it is not on this machine or empty."""
    data = corpus(name).read(max_bytes)[:max_bytes]
    if not data:
        raise CorpusMissing(f"corpus {name} is empty")
    return data


# ---- reading files --------------------------------------------------------------------
def _sorted_under(root: Path, pattern: str, install: str, recursive: bool = True
                  ) -> list[Path]:
    """The files matching `pattern` under `root`, by relative path (a plain string order,
    the same on every Python); CorpusMissing naming `install` if there are none."""
    found = [p for p in (root.rglob(pattern) if recursive else root.glob(pattern))
             if p.is_file()] if root.is_dir() else []
    if not found:
        raise CorpusMissing(f"no {pattern} files under {root}: {install}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CorpusMissing(f"cannot read {path}: {e.strerror}") from None


def _concatenated(paths: Iterable[Path], max_bytes: int | None) -> bytes:
    return _joined((_read(p) for p in paths), max_bytes, separator=b"")


def _joined(pieces: Iterable[bytes], max_bytes: int | None, separator: bytes = b"\n"
            ) -> bytes:
    """The pieces one after the other, read only until `max_bytes` are there."""
    out, size = [], 0
    for piece in pieces:
        if max_bytes is not None and size >= max_bytes:
            break
        if out and separator:
            out.append(separator)
            size += len(separator)
        out.append(piece)
        size += len(piece)
    return b"".join(out)


# ---- HTML to plain text -----------------------------------------------------------------
BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "pre", "tr", "br",
          "title", "dt", "dd"}
HIDDEN = {"script", "style"}
HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # not \s: a no-break space is text


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # inside this many script/style elements
        self.pre = 0     # inside this many pre elements: their whitespace is kept

    def handle_starttag(self, tag, attrs):
        if tag in HIDDEN:
            self.hidden += 1
        elif tag == "pre":
            self.pre += 1
        elif tag == "br":  # <br> and <br/>: it has no end tag
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in BLOCKS and tag != "br":
            self.pre = max(0, self.pre - (tag == "pre"))
            self.parts.append("\n")

    def handle_data(self, data):
        if self.hidden:
            return
        if not self.pre:  # as a browser shows it: the source's line breaks and indents
            data = HTML_SPACE.sub(" ", data)                        # are one space each
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        if data:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The page's text: script and style dropped; outside pre, whitespace shown as a
    browser shows it (a run of it is one space, none at a line's start); a line break
    after each block element (p, div, h1-h6, li, pre, tr, br; and title, dt, dd);
    trailing spaces cut, and runs of blank lines made one blank line."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    lines, blank = [], True  # no blank lines at the start
    for line in "".join(parser.parts).split("\n"):
        line = line.rstrip()
        if line or not blank:
            lines.append(line)
        blank = not line
    return "\n".join(lines).strip("\n") + "\n"
