"""Real English text from installed packages: the Wikipedia articles, their fixed split, news and pydoc."""

import pytest

from constrainedsparse.text import (
    HELD_OUT_EVERY,
    join_articles,
    news_documents,
    source_text,
    split_articles,
    wiki_articles,
)


def test_wiki_articles_are_real_prose_in_page_id_order():
    articles = wiki_articles()
    assert len(articles) == 94
    assert [a.page_id for a in articles] == sorted(a.page_id for a in articles)
    titles = [a.title for a in articles]
    assert titles[:3] == ["Anarchism", "Autism", "Albedo"]
    for article in articles:
        assert len(article.text) >= 2000 and not article.text.lower().startswith("#redirect")
        assert "'''" not in article.text and "(disambiguation)" not in article.title
    assert "Alabama is a state located in the southeastern region of the United States" in articles[4].text


def test_split_is_disjoint_by_article_fixed_and_every_fourth_held_out():
    articles = wiki_articles()
    calibration, held_out = split_articles(articles)
    assert len(held_out) == 24 and len(calibration) == 70
    assert {a.page_id for a in calibration}.isdisjoint(a.page_id for a in held_out)
    assert held_out == articles[::HELD_OUT_EVERY]
    assert [a.title for a in held_out[:3]] == ["Anarchism", "Alabama", "An American in Paris"]
    assert split_articles(articles) == (calibration, held_out)
    wiki = source_text("wiki")
    assert wiki == join_articles(calibration) and held_out[1].text[:200] not in wiki
    assert join_articles(held_out[:2]).startswith("Anarchism\n\n") and "\n\nAlabama\n\n" in join_articles(held_out[:2])


def test_news_and_pydoc_sources():
    news = news_documents()
    assert len(news) == 300 and news[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert source_text("news") == "\n\n".join(news)
    assert source_text("pydoc").startswith('The "assert" statement')
    with pytest.raises(ValueError, match=r"^--set calibration_text must be one of wiki, news, pydoc, got 'c4'$"):
        source_text("c4")
