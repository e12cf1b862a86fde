"""item_text: the single text encoded per item."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import CatalogItem
from workers.item_text import MAX_DESCRIPTION_CHARS, item_categories, item_text


def test_title_brand_and_specific_categories() -> None:
    item = CatalogItem(
        item_id="1",
        title="Matte Lipstick Ruby",
        brand="Acme",
        categories=["Beauty", "Makeup", "Lips", "Lipstick"],
    )
    text = item_text(item)
    assert text.startswith("Matte Lipstick Ruby")
    assert "Brand: Acme" in text
    assert "Makeup > Lips > Lipstick" in text
    assert "Beauty" not in text


def test_brand_already_in_title_is_not_repeated() -> None:
    text = item_text(CatalogItem(item_id="1", title="Prada Candy Eau de Parfum", brand="prada"))
    assert text == "Prada Candy Eau de Parfum"


def test_stray_quoting_and_duplicates_in_categories_are_cleaned() -> None:
    item = CatalogItem(
        item_id="1", categories=["\"'Beauty", '""Women\'s""', "women's", " ", "Eau'\""]
    )
    assert item_categories(item, limit=5) == ["Beauty", "Women's", "Eau"]


def test_description_is_truncated_at_a_word_boundary() -> None:
    text = item_text(CatalogItem(item_id="1", title="T", description="lorem ipsum " * 200))
    description = text.split(". ", 1)[1]
    assert len(description) <= MAX_DESCRIPTION_CHARS + 1
    assert description.endswith("…")
    assert not description.endswith(" …")


def test_item_without_text_fields_falls_back_to_its_id() -> None:
    assert (
        item_text(CatalogItem(item_id="sku-9", title="  ", brand="", categories=[""]))
        == "Item sku-9"
    )


# What a catalog text may hold: no control characters but tab and line breaks.
texts = st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r")


@given(
    title=st.none() | st.text(texts, max_size=200),
    brand=st.none() | st.text(texts, max_size=50),
    categories=st.lists(st.text(texts, max_size=30), max_size=8),
    description=st.none() | st.text(texts, max_size=3000),
)
def test_never_empty_and_bounded(
    title: str | None, brand: str | None, categories: list[str], description: str | None
) -> None:
    item = CatalogItem(
        item_id="x", title=title, brand=brand, categories=categories, description=description
    )
    text = item_text(item)
    assert text.strip() == text
    assert text
    assert len(text) <= 200 + 50 + 3 * 30 + MAX_DESCRIPTION_CHARS + 40
