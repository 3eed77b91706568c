"""The prefix index behind prefix-aware routing: chained block hashes, longest match, bounds."""

from server.cluster.prefix_index import PrefixIndex, prefix_hashes


def test_hashes_name_whole_prefixes_so_one_changed_block_changes_every_later_hash():
    a = prefix_hashes("x" * 64 + "y" * 64 + "z" * 64, 64)
    b = prefix_hashes("x" * 64 + "Y" * 64 + "z" * 64, 64)
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1] and a[2] != b[2]


def test_a_trailing_partial_block_is_not_named():
    assert len(prefix_hashes("a" * 100, 64)) == 1
    assert prefix_hashes("short", 64) == []


def test_the_replica_holding_the_longest_prefix_matches_longest():
    index = PrefixIndex(block_chars=8)
    index.insert("system: you help. user: hi", "r1")
    index.insert("system: you help. user: what is two plus two", "r2")
    matched, blocks = index.longest_match(
        "system: you help. user: what is two plus two? assistant:", ["r1", "r2"]
    )
    assert blocks == 7
    assert matched["r2"] > matched["r1"] >= 16


def test_only_candidates_count_and_unknown_text_matches_nothing():
    index = PrefixIndex(block_chars=8)
    index.insert("a conversation that was held", "r1")
    assert index.longest_match("a conversation that was held", ["r2"])[0] == {}
    assert index.longest_match("another text entirely, longer", ["r1"])[0] == {}


def test_forget_drops_a_replica_and_its_block_count():
    index = PrefixIndex(block_chars=8)
    index.insert("0123456789abcdef", "r1")
    index.insert("0123456789abcdef", "r2")
    assert index.held == {"r1": 2, "r2": 2}
    index.forget("r1")
    assert index.longest_match("0123456789abcdef", ["r1", "r2"])[0] == {"r2": 16}
    assert "r1" not in index.held and len(index) == 2


def test_the_index_keeps_at_most_max_blocks_dropping_the_least_recently_used():
    index = PrefixIndex(block_chars=4, max_blocks=3)
    index.insert("aaaabbbb", "r1")  # 2 blocks
    index.insert("ccccdddd", "r2")  # 2 more: the oldest block goes
    assert len(index) == 3
    assert index.held["r1"] + index.held["r2"] == 3
    assert index.longest_match("aaaabbbb", ["r1"])[0] == {}  # its first block was dropped
