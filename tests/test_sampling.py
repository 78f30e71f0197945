"""`eval.max_samples` draws a seeded sample of whole source groups that covers every category."""

from __future__ import annotations

from collections import Counter

import pytest

from loraops.stages.evaluate import select_rows

CATEGORIES = ["마감하자", "마감재", "시공", "인테리어", "건축구조", "타 하자", "기타"]


def _rows(per_category=(200, 120, 80, 40, 20, 12, 6), paraphrases=4):
    rows = []
    for category, groups in zip(CATEGORIES, per_category):
        for g in range(groups // paraphrases):
            rows += [{"id": f"{category}-{g}-{k}", "group": f"{category}-{g}", "category": category} for k in range(paraphrases)]
    return rows


@pytest.mark.parametrize("n", [150, 40, 7])
def test_every_category_is_scored_even_in_a_small_sample(n):
    sample = select_rows(_rows(), n, seed=0)
    assert set(Counter(r["category"] for r in sample)) == set(CATEGORIES)
    assert n <= len(sample) <= n + 4 * len(CATEGORIES)


def test_groups_stay_whole_and_the_sample_is_seeded_and_proportional():
    rows = _rows()
    sample = select_rows(rows, 150, seed=0)
    sizes = Counter(r["group"] for r in sample)
    assert set(sizes.values()) == {4}
    assert [r["id"] for r in sample] == [r["id"] for r in select_rows(rows, 150, seed=0)]
    assert [r["id"] for r in sample] != [r["id"] for r in select_rows(rows, 150, seed=1)]
    counts = Counter(r["category"] for r in sample)
    assert counts["마감하자"] > counts["시공"] > counts["기타"]


def test_no_limit_or_a_large_one_keeps_everything():
    rows = _rows()
    assert len(select_rows(rows, None)) == len(select_rows(rows, 10_000)) == len(rows)
