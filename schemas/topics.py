"""Topic specifications: name, key, value model, and cleanup policy of every topic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from schemas.messages import (
    BehaviorEvent,
    CatalogItem,
    DeadLetter,
    ErasureAudit,
    ErasureRequest,
    ProfileUpdate,
    Recommendation,
    RelatedItems,
    SimilarList,
    TrendingList,
)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's contract. `name` is the default; deployments add a prefix (RELATA_TOPIC_PREFIX)."""

    name: str
    key: str
    model: type[BaseModel]
    cleanup_policy: Literal["delete", "compact"]
    description: str

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"


BEHAVIOR_EVENTS = TopicSpec(
    "behavior-events", "user_id", BehaviorEvent, "delete", "Shopper actions, the input stream."
)
ITEM_CATALOG = TopicSpec(
    "item-catalog",
    "item_id",
    CatalogItem,
    "compact",
    "Products; a tombstone or available=false retires one.",
)
PROFILE_UPDATES = TopicSpec(
    "profile-updates",
    "user_id",
    ProfileUpdate,
    "delete",
    "Changed user profiles, from streams to the recommender.",
)
RELATED_ITEMS = TopicSpec(
    "related-items",
    "item_id",
    RelatedItems,
    "compact",
    "Bought-together / also-viewed neighbours per product, republished on material change.",
)
RECOMMENDATIONS = TopicSpec(
    "recommendations",
    "user_id",
    Recommendation,
    "compact",
    "The latest explained recommendations per user.",
)
SIMILAR_ITEMS = TopicSpec(
    "similar-items",
    "item_id",
    SimilarList,
    "compact",
    "Nearest neighbours by item vector per product, made by the item indexer; a tombstone "
    "retires one.",
)
TRENDING_ITEMS = TopicSpec(
    "trending-items",
    "placement",
    TrendingList,
    "compact",
    "The trending list per placement: the answer to a user with no list of their own.",
)
# A second configuration's lists, judged on live traffic beside the live ones (docs/operations.md
# "Shadow strategy"); no subscriber should serve them.
RECOMMENDATIONS_SHADOW = TopicSpec(
    "recommendations-shadow",
    "user_id",
    Recommendation,
    "compact",
    "The shadow recommender's lists, published beside the live ones and never served.",
)
DEAD_LETTER = TopicSpec(
    "dead-letter",
    "source key",
    DeadLetter,
    "delete",
    "Every input that could not be processed, verbatim, with the reason.",
)
ERASURE_REQUESTS = TopicSpec(
    "erasure-requests",
    "user_id",
    ErasureRequest,
    "delete",
    "Requests to erase a user from every state and output topic relata keeps (`relata erase`).",
)
ERASURE_AUDIT = TopicSpec(
    "erasure-audit",
    "request_id",
    ErasureAudit,
    "delete",
    "One record per erasure carried out, without personal data.",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    BEHAVIOR_EVENTS,
    ITEM_CATALOG,
    PROFILE_UPDATES,
    RELATED_ITEMS,
    RECOMMENDATIONS,
    SIMILAR_ITEMS,
    TRENDING_ITEMS,
    DEAD_LETTER,
    ERASURE_REQUESTS,
    ERASURE_AUDIT,
    RECOMMENDATIONS_SHADOW,
)
