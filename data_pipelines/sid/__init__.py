"""Semantic-ID data: item embeddings as a training source, the SID table (item id -> codes) and the prefix
trie a constrained decoder walks."""
