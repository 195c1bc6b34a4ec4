"""bench/celeba_sample_variants.py: each variant changes only what it says, and the shipped one nothing."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from mtlue_fast.data.synthetic import celeba

PATCHED = ("_celeba_patterns", "_celeba_floor", "_celeba_paint_order", "_CELEBA_GRID", "_CELEBA_PAINT_OVERRIDES")


@pytest.fixture()
def variants():
    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        import celeba_sample_variants
    finally:
        sys.path.remove(str(bench))
    saved = {name: getattr(celeba, name) for name in PATCHED}
    yield celeba_sample_variants
    for name, value in saved.items():
        setattr(celeba, name, value)


def _looks():
    return celeba._celeba_patterns(), [celeba._celeba_floor(n) for n in celeba.CELEBA_ATTRIBUTES], celeba._celeba_paint_order()


def test_shipped_variant_changes_nothing(variants):
    before = _looks()
    variants._apply(variants.VARIANTS["shipped"][1])
    assert _looks() == before
    assert before[2] == list(range(40))  # the shipped sample paints in file order


def test_shipped_sample_is_version_3_with_bald_green_over_white(variants):
    shipped = _looks()
    variants._apply(variants.VARIANTS["v3"][1])
    patterns, floors, order = _looks()
    assert (floors, order) == shipped[1:]
    bald = celeba.CELEBA_ATTRIBUTES.index("Bald")
    assert (patterns[bald].color, patterns[bald].color2) == (celeba._CELEBA_PAINTS[0], celeba._CELEBA_PAINTS[5])
    assert (shipped[0][bald].color, shipped[0][bald].color2) == (celeba._CELEBA_PAINTS[2], celeba._CELEBA_PAINTS[6])
    same_paint = dict(color=patterns[bald].color, color2=patterns[bald].color2)
    assert dataclasses.replace(shipped[0][bald], **same_paint) == patterns[bald]
    assert [p for k, p in enumerate(shipped[0]) if k != bald] == [p for k, p in enumerate(patterns) if k != bald]
    variants._apply(variants.VARIANTS["bald_green_white"][1])
    assert _looks() == shipped  # version 6 is the variant that was screened


def test_bald_3x_is_version_4(variants):
    variants._apply(variants.VARIANTS["v3"][1])
    patterns, floors, order = _looks()
    variants._apply(variants.VARIANTS["bald_3x"][1])
    new_patterns, new_floors, new_order = _looks()
    bald = celeba.CELEBA_ATTRIBUTES.index("Bald")
    assert patterns[bald].r == max(celeba._CELEBA_RADII) and new_patterns[bald].r == pytest.approx(3 * patterns[bald].r)
    assert [p for k, p in enumerate(new_patterns) if k != bald] == [p for k, p in enumerate(patterns) if k != bald]
    assert (new_floors, new_order) == (floors, order)


def test_bald_variants_touch_bald_only(variants):
    variants._apply(variants.VARIANTS["v3"][1])
    patterns, floors, order = _looks()
    variants._apply(variants.VARIANTS["rare_last_bald_white_2x"][1])
    new_patterns, new_floors, new_order = _looks()
    bald = celeba.CELEBA_ATTRIBUTES.index("Bald")
    assert new_patterns[bald].r == pytest.approx(2 * patterns[bald].r)
    assert new_patterns[bald].color == celeba._CELEBA_PAINTS[6] and new_patterns[bald].color2 == celeba._CELEBA_PAINTS[5]
    assert [p for k, p in enumerate(new_patterns) if k != bald] == [p for k, p in enumerate(patterns) if k != bald]
    assert new_floors == floors
    # the rarest mark is painted last, the most even first, each once
    assert sorted(new_order) == order and new_order[-1] == bald
    assert new_order[0] == celeba.CELEBA_ATTRIBUTES.index("Attractive")


def test_rare_large_scales_rare_marks_within_bounds(variants):
    variants._apply(variants.VARIANTS["v3"][1])
    patterns, floors, _ = _looks()
    variants._apply(variants.VARIANTS["rare_large"][1])
    new_patterns, new_floors, _ = _looks()
    for k, name in enumerate(celeba.CELEBA_ATTRIBUTES):
        ratio = new_patterns[k].r / patterns[k].r
        if variants._minority(celeba, name) < 0.25:
            assert 1.0 <= ratio <= 1.5 and 0.0 < new_floors[k] <= 0.6
        else:
            assert ratio == 1.0
    assert new_floors[celeba.CELEBA_ATTRIBUTES.index("Bald")] > floors[celeba.CELEBA_ATTRIBUTES.index("Bald")] - 1e-12


def test_bald_centre_swaps_two_places_only(variants):
    variants._apply(variants.VARIANTS["v3"][1])
    patterns, floors, order = _looks()
    variants._apply(variants.VARIANTS["bald_centre"][1])
    new_patterns, new_floors, new_order = _looks()
    bald, cheek = celeba.CELEBA_ATTRIBUTES.index("Bald"), celeba.CELEBA_ATTRIBUTES.index("High_Cheekbones")
    assert (new_patterns[bald].cy, new_patterns[bald].cx) == (patterns[cheek].cy, patterns[cheek].cx)
    assert (new_patterns[cheek].cy, new_patterns[cheek].cx) == (patterns[bald].cy, patterns[bald].cx)
    moved = dict(cy=patterns[0].cy, cx=patterns[0].cx)  # any place: compare everything else
    same = [dataclasses.replace(p, **moved) for p in patterns]
    assert [dataclasses.replace(p, **moved) for p in new_patterns] == same
    assert [p for k, p in enumerate(new_patterns) if k not in (bald, cheek)] == [
        p for k, p in enumerate(patterns) if k not in (bald, cheek)
    ]
    assert (new_floors, new_order) == (floors, order)


def _places(patterns):
    return {name: (p.cy, p.cx) for name, p in zip(celeba.CELEBA_ATTRIBUTES, patterns)}


def test_places_moves_each_named_mark_to_the_place_it_names(variants):
    before = _places(_looks()[0])
    settings = variants.VARIANTS["bald_centre_blurry_hairline"][1]
    variants._apply(settings)
    after = _places(_looks()[0])
    for name, whose in settings["places"].items():
        assert after[name] == before[whose]
    assert {n: xy for n, xy in after.items() if n not in settings["places"]} == {
        n: xy for n, xy in before.items() if n not in settings["places"]
    }


def test_move_leaves_the_old_row_in_place_and_spreads_the_new_one(variants):
    before = _places(_looks()[0])
    variants._apply(variants.VARIANTS["bald_chin"][1])
    after = _places(_looks()[0])
    last_row = set(celeba._CELEBA_GRID[-1])
    assert celeba._CELEBA_GRID[0][1] is None and celeba._CELEBA_GRID[-1][2] == "Bald"
    assert after["Bald"][0] == pytest.approx(max(y for y, _ in before.values()))
    assert {n: xy for n, xy in after.items() if n not in last_row} == {n: xy for n, xy in before.items() if n not in last_row}
    xs = sorted(after[n][1] for n in last_row)
    assert len(xs) == 6 and xs[0] == pytest.approx(min(x for _, x in before.values()))
    assert xs[-1] == pytest.approx(max(x for _, x in before.values()))


def test_majority_rates_read_the_test_partition(variants, tmp_path):
    (tmp_path / "list_attr_celeba.txt").write_text("3\r\nA B \r\n1.jpg  1 -1\r\n2.jpg -1 -1\r\n3.jpg  1  1\r\n")
    (tmp_path / "list_eval_partition.txt").write_text("1.jpg 0\n2.jpg 2\n3.jpg 2\n")
    assert variants._majority_rates(tmp_path) == {"A": 0.5, "B": 0.5}


def test_paint_variants_repaint_only_the_marks_they_name(variants):
    shipped = _looks()
    variants._apply(variants.VARIANTS["distinct_paints_4"][1])
    patterns, floors, order = _looks()
    assert (floors, order) == shipped[1:]
    repainted = variants._DISTINCT_PAINTS_4
    for name, old, new in zip(celeba.CELEBA_ATTRIBUTES, shipped[0], patterns):
        if name in repainted:
            upper, lower = repainted[name]
            assert (new.color, new.color2) == (celeba._CELEBA_PAINTS[upper], celeba._CELEBA_PAINTS[lower])
            assert dataclasses.replace(new, color=old.color, color2=old.color2) == old
        else:
            assert new == old, name


def test_shipped_rare_large_keeps_bald_and_the_shipped_paints(variants):
    shipped = _looks()
    variants._apply(variants.VARIANTS["shipped_rare_large"][1])
    patterns, _, _ = _looks()
    bald = celeba.CELEBA_ATTRIBUTES.index("Bald")
    assert patterns[bald].r == pytest.approx(shipped[0][bald].r)
    assert [(p.color, p.color2) for p in patterns] == [(p.color, p.color2) for p in shipped[0]]
    assert any(p.r > q.r for p, q in zip(patterns, shipped[0]))


def test_prior_bias_starts_each_head_at_its_log_odds_and_draws_the_rest_as_before(variants, monkeypatch):
    import math

    import torch

    from mtlue_fast.models import build_model, multitask

    monkeypatch.setattr(multitask.MultiTaskNet, "__init__", multitask.MultiTaskNet.__init__)  # undone after the test
    torch.manual_seed(0)
    plain = build_model([2] * 40, backbone="resnet18", width=0.25)
    variants._start_heads_at_the_prior()
    torch.manual_seed(0)
    prior = build_model([2] * 40, backbone="resnet18", width=0.25)
    p = celeba.CELEBA_PREVALENCE["Bald"]
    assert prior.head.bias[celeba.CELEBA_ATTRIBUTES.index("Bald")].item() == pytest.approx(math.log(p / (1 - p)))
    assert all(torch.equal(a, b) for (name, a), (_, b) in zip(plain.named_parameters(), prior.named_parameters())
               if name != "head.bias")  # fmt: skip
    other = build_model([2, 3], backbone="resnet18", width=0.25)  # not CelebA's 40 binary heads: untouched
    assert other.head.bias.abs().max() < 1.0
