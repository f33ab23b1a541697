"""Real English text that ships with installed packages: Wikipedia articles, news, Python docs.

- **Wikipedia**: the ``gensim`` wheel's test data holds a shortened dump of the English Wikipedia
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, 206 pages). Pages are
  read with ``gensim.corpora.wikicorpus.extract_pages`` and turned into plain text with
  ``filter_wiki``; redirects, disambiguation pages, lists and stubs are dropped, which leaves the
  articles (:func:`wiki_articles`, title and page id kept).
- **News**: ``lee_background.cor`` from the same folder, 300 short Australian news articles
  (the Lee corpus), one per line (:func:`news_documents`).
- **Python docs**: CPython's ``pydoc_data.topics`` (:func:`constrainedsparse.data.load_text`).

:func:`split_articles` is the fixed calibration / evaluation split of the Wikipedia articles.
"""

from __future__ import annotations

import bz2
import functools
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HELD_OUT_EVERY",
    "NEWS_FILE",
    "TEXT_SOURCES",
    "WIKI_FILE",
    "Article",
    "join_articles",
    "news_documents",
    "source_text",
    "split_articles",
    "wiki_articles",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
HELD_OUT_EVERY = 4
MIN_ARTICLE_CHARS = 2000
TEXT_SOURCES = ("wiki", "news", "pydoc")


@dataclass(frozen=True)
class Article:
    """One Wikipedia article as plain text."""

    title: str
    page_id: int
    text: str


def _gensim_test_data() -> Path:
    try:
        import gensim
    except ImportError:
        raise ValueError("the Wikipedia and news text need the package gensim: pip install gensim") from None
    return Path(gensim.__file__).parent / "test" / "test_data"


def _data_file(name: str) -> Path:
    path = _gensim_test_data() / name
    if not path.is_file():
        raise ValueError(f"gensim's test data file {str(path)!r} is missing (reinstall gensim)")
    return path


def _plain(markup: str) -> str:
    """Wiki markup to plain prose: ``filter_wiki``, then bold/italic quotes and the empty parentheses
    left by removed templates (``Alabama () is``) dropped, blank lines collapsed."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = re.sub(r"'{2,}", "", filter_wiki(markup))
    text = re.sub(r"[ \t]*\([\s,;]*\)", "", text)
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _is_article(title: str, text: str, min_chars: int) -> bool:
    lowered = text[:200].lower()
    return not (
        ":" in title
        or "(disambiguation)" in title
        or title.startswith("List of")
        or lowered.startswith("#redirect")
        or "may refer to" in lowered
        or len(text) < min_chars
    )


@functools.lru_cache(maxsize=2)
def wiki_articles(min_chars: int = MIN_ARTICLE_CHARS) -> tuple[Article, ...]:
    """The articles of gensim's shortened English Wikipedia dump, in page-id order.

    Redirects, disambiguation pages (title or "may refer to"), "List of" pages, pages outside the
    main namespace and pages shorter than ``min_chars`` characters of plain text are dropped.

    Raises:
        ValueError: If gensim or its test data file is missing.
    """
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(_data_file(WIKI_FILE)) as handle:
        for title, markup, page_id in extract_pages(handle):
            text = _plain(markup)
            if _is_article(title, text, min_chars):
                articles.append(Article(title, int(page_id), text))
    return tuple(sorted(articles, key=lambda a: a.page_id))


def split_articles(articles: tuple[Article, ...]) -> tuple[tuple[Article, ...], tuple[Article, ...]]:
    """The fixed split into (calibration, held-out) articles: every 4th article is held out.

    Articles are taken in page-id order and article ``i`` is held out when ``i % 4 == 0``, so the
    two sets are disjoint *by article* (no sentence of a held-out article is ever calibrated on)
    while both spread over the whole dump's mix of topics. The split does not depend on the seed.
    """
    held_out = articles[::HELD_OUT_EVERY]
    calibration = tuple(a for i, a in enumerate(articles) if i % HELD_OUT_EVERY)
    return calibration, held_out


def join_articles(articles: tuple[Article, ...]) -> str:
    """One text stream: each article as its title line, a blank line and its text; articles separated by blank lines."""
    return "\n\n".join(f"{a.title}\n\n{a.text}" for a in articles)


@functools.lru_cache(maxsize=1)
def news_documents() -> tuple[str, ...]:
    """The 300 news articles of the Lee background corpus (one per line in ``lee_background.cor``).

    Raises:
        ValueError: If gensim or its test data file is missing.
    """
    lines = _data_file(NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def source_text(source: str) -> str:
    """Calibration text of a named source.

    Args:
        source: ``"wiki"`` (the calibration articles of :func:`split_articles`, never the held-out
            ones), ``"news"`` (the Lee corpus) or ``"pydoc"`` (CPython's reference documentation).

    Raises:
        ValueError: If the source is unknown or its data is missing.
    """
    if source == "wiki":
        return join_articles(split_articles(wiki_articles())[0])
    if source == "news":
        return "\n\n".join(news_documents())
    if source == "pydoc":
        from constrainedsparse.data import load_text

        return load_text()
    raise ValueError(f"--set calibration_text must be one of {', '.join(TEXT_SOURCES)}, got {source!r}")
