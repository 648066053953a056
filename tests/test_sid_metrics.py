"""SID metrics against values computed by hand."""

import math

import pytest

from trainers.evaluators.sid_metrics import entropy_bits, sid_metrics

import numpy as np


def test_sid_metrics_by_hand():
    # 6 items, 2 levels of K = 4: SIDs (0,1) x3, (0,2), (1,1) x2
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1], [1, 1]])
    m = sid_metrics(codes, [4, 4])
    assert m["collision_rate"] == pytest.approx(5 / 6)     # all but (0,2) share their SID
    assert m["icr"] == pytest.approx(1 / 6)
    assert m["unique_sids"] == 3 and m["largest_group"] == 3
    assert m["cur/level_1"] == pytest.approx(2 / 4)        # codes {0, 1}
    assert m["cur/level_2"] == pytest.approx(2 / 4)        # codes {1, 2}
    assert m["cur/l1xl2"] == pytest.approx(3 / 16)
    assert m["cur/total"] == pytest.approx(3 / 16)
    assert m["dead_codes/level_1"] == 2 and m["dead_codes/level_2"] == 2
    h1 = -(4 / 6 * math.log2(4 / 6) + 2 / 6 * math.log2(2 / 6))    # level 1: 4 zeros, 2 ones
    h2 = -(5 / 6 * math.log2(5 / 6) + 1 / 6 * math.log2(1 / 6))    # level 2: 5 ones, 1 two
    hs = -(3 / 6 * math.log2(3 / 6) + 1 / 6 * math.log2(1 / 6) + 2 / 6 * math.log2(2 / 6))
    assert m["entropy/level_1"] == pytest.approx(h1)
    assert m["entropy/level_2"] == pytest.approx(h2)
    assert m["entropy/sid"] == pytest.approx(hs)
    assert m["perplexity/level_1"] == pytest.approx(2 ** h1)


def test_uniform_codes_have_full_entropy_and_no_collision():
    codes = np.array([[i // 4, i % 4] for i in range(16)])
    m = sid_metrics(codes, [4, 4])
    assert m["collision_rate"] == 0 and m["icr"] == 1 and m["cur/total"] == 1 and m["largest_group"] == 1
    assert m["entropy/level_1"] == pytest.approx(2.0) and m["entropy/sid"] == pytest.approx(4.0)
    assert m["perplexity/level_2"] == pytest.approx(4.0)
    assert entropy_bits(np.array([1, 0, 1])) == pytest.approx(1.0)
