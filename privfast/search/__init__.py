"""ATS policy search: the privacy score S_pri, the accuracy score S_acc, and the random search."""

from privfast.search.scores import accuracy_score, crop_and_flip, privacy_score
from privfast.search.search import PolicyScore, SearchResult, ats_search, describe_policy, search

__all__ = [
    "PolicyScore",
    "SearchResult",
    "accuracy_score",
    "ats_search",
    "crop_and_flip",
    "describe_policy",
    "privacy_score",
    "search",
]
