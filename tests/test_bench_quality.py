"""`streamrnn bench quality` and its corpora: a real daemon on real sockets, fed a real
text once; the corpora read from trees the tests write where the Debian ones would be."""
from __future__ import annotations

import bz2
import json
import lzma
import math
import subprocess
import sys
import zlib

import pytest

from streamrnn.config import load_config
from streamrnn.tools import bench_quality, corpora
from streamrnn.tools.textdata import stdlib_files


def streamrnn(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "streamrnn", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_one_pass_through_the_daemon_trains_every_target_once(tmp_path):
    text = stdlib_files()[0].read_bytes()[:20_001]  # 20,001: the last byte is dropped
    source, out = tmp_path / "text.py", tmp_path / "quality.json"
    source.write_bytes(text)
    run = streamrnn("bench", "quality", "--corpora", f"path:{source},path:{tmp_path}/none",
                    "--bytes", "30000", "--streams", "2", "--json", str(out),
                    "--set", "model.hidden_size=32")
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    row, missing = result["corpora"]
    used = text[:20_000]
    assert (row["bytes_read"], row["bytes"], row["streams"]) == (20_001, 20_000, 2)
    assert row["tokens_trained"] == row["targets"] == 20_000 - 2  # first bytes: no target
    # the daemon's own totals, plus log2(256) = 8 bits for each stream's first byte
    assert math.isfinite(row["bits_per_byte"]) and 0 < row["bits_per_byte"] < 9
    assert row["bits_per_byte"] == pytest.approx((row["bits"] + 2 * 8) / 20_000)
    assert row["bytes_per_s"] == pytest.approx(20_000 / row["seconds"])
    assert row["xz"] == 8 * len(lzma.compress(used, preset=9 | lzma.PRESET_EXTREME)) / 20_000
    assert row["bzip2"] == 8 * len(bz2.compress(used, 9)) / 20_000
    assert row["gzip"] == 8 * len(zlib.compress(used, 9)) / 20_000
    assert row["vs_xz"] == pytest.approx(row["bits_per_byte"] / row["xz"])
    assert row["vs_bzip2"] == pytest.approx(row["bits_per_byte"] / row["bzip2"])
    if row["ppmd"] is None:
        assert "p7zip-full" in row["ppmd_missing"]
    else:
        assert 0 < row["ppmd"] < 8
    assert missing["skipped"].startswith(f"cannot read {tmp_path}/none")
    # the config serve would run: the defaults and --set, not the other modes' sgd
    assert result["config"]["model"]["hidden_size"] == 32
    assert result["config"]["train"]["optimizer"] == load_config().train.optimizer
    assert result["streams"] == 2 and "device" in result["info"]
    lines = run.stdout.splitlines()
    assert any(line.startswith(f"path:{source} (file, given): 20,000 bytes in 2 streams, "
                               f"{row['bits_per_byte']:.3f} bits/byte") for line in lines)
    assert any(line.startswith("corpus ") and "streamrnn" in line for line in lines)


def test_in_process_feeds_a_learner_the_same_way_without_sockets(tmp_path):
    """--in-process: the same streams and chunks into a Learner here; every target once,
    and the daemon's client (pyzmq) is never imported."""
    text = stdlib_files()[0].read_bytes()[:9_000]
    source, out = tmp_path / "text.py", tmp_path / "quality.json"
    source.write_bytes(text)
    probe = (f"import sys; from streamrnn.cli import main; code = main(['bench', 'quality', "
             f"'--in-process', '--corpora', 'path:{source}', '--streams', '3', '--json', "
             f"'{out}', '--set', 'model.hidden_size=16']); "
             "assert 'zmq' not in sys.modules, 'pyzmq imported'; sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    (row,) = result["corpora"]
    assert result["through"] == "learner in process"
    assert row["tokens_trained"] == row["targets"] == 9_000 - 3
    assert row["bits_per_byte"] == pytest.approx((row["bits"] + 3 * 8) / 9_000)


def test_a_missing_corpus_is_skipped_saying_what_to_install(tmp_path, monkeypatch):
    for name in ("python-docs", "debian-handbook", "dpkg-status", "apt-logs"):
        monkeypatch.setitem(corpora.ROOTS, name, str(tmp_path / "absent" / name))
    (tmp_path / "short").write_bytes(b"x")
    names = ["python-docs", "debian-handbook", "dpkg-status", "apt-logs",
             f"path:{tmp_path}/short"]
    lines = []
    result = bench_quality.run(load_config(), names, 1000, 2, str(tmp_path / "out.json"),
                               echo=lines.append)
    rows = {row["name"]: row for row in result["corpora"]}
    assert "apt-get install python3.11-doc" in rows["python-docs"]["skipped"]
    assert "apt-get install debian-handbook" in rows["debian-handbook"]["skipped"]
    assert "dpkg" in rows["dpkg-status"]["skipped"]
    assert "dpkg.log" in rows["apt-logs"]["skipped"]
    assert "fewer than 2 for each of 2 streams" in rows[f"path:{tmp_path}/short"]["skipped"]
    assert [(r["kind"], r["role"]) for r in result["corpora"][:4]] == [
        ("prose", "tune"), ("prose", "held-out"), ("structured", "tune"),
        ("structured", "held-out")]
    assert any("python-docs (prose, tune): skipped: " in line and "python3.11-doc" in line
               for line in lines)
    assert json.loads((tmp_path / "out.json").read_text())["corpora"] == result["corpora"]


def test_an_unknown_corpus_is_one_clear_error():
    run = streamrnn("bench", "quality", "--corpora", "stdlib,shakespeare", timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == ("streamrnn bench quality: no corpus 'shakespeare': the "
                                  f"corpora are {', '.join(corpora.CORPORA)}, or path:FILE")


# ---- the corpora ---------------------------------------------------------------------------
def write(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_python_docs_are_its_rst_sources_by_path(tmp_path, monkeypatch):
    monkeypatch.setitem(corpora.ROOTS, "python-docs", str(tmp_path))
    write(tmp_path, {"b.rst.txt": "B", "a/z.rst.txt": "Z", "a.rst.txt": "A",
                     "a/notes.txt": "-", "index.html": "-"})
    assert corpora.python_docs() == b"AZB"
    assert corpora.corpus_bytes("python-docs", 2) == b"AZ"
    assert corpora.corpus_bytes("python-docs", 100) == b"AZB"  # shorter: not repeated


def test_the_handbook_is_its_pages_as_plain_text(tmp_path, monkeypatch):
    monkeypatch.setitem(corpora.ROOTS, "debian-handbook", str(tmp_path))
    write(tmp_path, {
        "b.html": "<html><head><title>Two</title><style>p {}</style></head><body>"
                  "<p>second</p></body></html>",
        "a.html": "<p>one</p><script>var x = 1;</script>",
        "Common_Content/c.html": "<p>not a page of the book</p>"})
    assert corpora.debian_handbook() == b"one\n\nTwo\nsecond\n"


def test_html_to_text_keeps_text_and_line_structure():
    html = ("<h1>Title</h1>\n\n<div>\n\t\t<p>Some  <code>apt</code>\n\t\ttext,"
            "&nbsp;here &amp; there.</p>\n\n\n<p>Next</p></div><ul><li>one</li><li>two"
            "<br/>lines</li></ul><pre># ls\n  a  b</pre><table><tr><td>x</td><td>y</td>"
            "</tr></table><style>.a {}</style><script>alert(1)</script><p>end</p>")
    assert corpora.html_to_text(html) == (
        "Title\nSome apt text,\xa0here & there.\nNext\n\none\ntwo\nlines\n# ls\n  a  b\n"
        "xy\nend\n")


def test_dpkg_status_and_apt_logs_in_their_order(tmp_path, monkeypatch):
    monkeypatch.setitem(corpora.ROOTS, "dpkg-status", str(tmp_path / "dpkg" / "status"))
    monkeypatch.setitem(corpora.ROOTS, "apt-logs", str(tmp_path / "log"))
    write(tmp_path, {"dpkg/status": "Package: adduser\n", "log/dpkg.log.1": "older\n",
                     "log/apt/history.log": "apt\n", "log/dpkg.log": "dpkg\n",
                     "log/apt/term.log": "-"})
    assert corpora.dpkg_status() == b"Package: adduser\n"
    assert corpora.apt_logs() == b"dpkg\napt\nolder\n"
    (tmp_path / "log" / "dpkg.log").unlink()
    assert corpora.apt_logs() == b"apt\nolder\n"  # those that are there
    (tmp_path / "dpkg" / "status").unlink()
    with pytest.raises(corpora.CorpusMissing, match="dpkg"):
        corpora.dpkg_status()


def test_stdlib_and_torch_sources_read_only_what_is_asked():
    assert corpora.corpus_bytes("stdlib", 50_000) == b"".join(
        p.read_bytes() for p in stdlib_files(limit=3))[:50_000]
    # torch's sources are read, torch itself is not imported
    probe = ("import sys; from streamrnn.tools.corpora import corpus_bytes; "
             "data = corpus_bytes('torch-source', 100_000); "
             "print(len(data), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["100000", "False"]
