"""ATS policy search: the privacy score S_pri, the accuracy score S_acc, and the random search."""

from privfast.search.scores import accuracy_score, privacy_score
from privfast.search.search import PolicyScore, SearchResult, ats_search, describe_policy, search

__all__ = ["PolicyScore", "SearchResult", "accuracy_score", "ats_search", "describe_policy", "privacy_score", "search"]
