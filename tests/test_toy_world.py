"""The toy world: prompts, parsing, the held-out split and rendering."""

import math

import pytest
import torch

from mixgrpo.toy.world import (
    CENTER_JITTER,
    COLORS,
    SHAPES,
    ToyPrompt,
    all_prompts,
    color_tensor,
    parse_prompt,
    render,
    render_batch,
    shape_coverage,
    train_test_split,
)


def test_all_prompts_are_distinct_parseable_and_never_same_coloured():
    prompts = all_prompts()
    assert len(prompts) == len(COLORS) * (len(COLORS) - 1) * len(SHAPES) == 90
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        parsed = parse_prompt(prompt)
        assert parsed.text == prompt
        assert parsed.object_color != parsed.background


def test_parse_prompt_reads_the_three_slots_ignoring_case_and_spaces():
    assert parse_prompt("  A Red   circle on a BLUE background ") == ToyPrompt("red", "circle", "blue")


@pytest.mark.parametrize(
    "prompt",
    ["a purple circle on a blue background", "a red hexagon on a blue background", "a red circle", "red circle on blue"],
)
def test_parse_prompt_rejects_prompts_outside_the_vocabulary(prompt):
    with pytest.raises(ValueError, match="expected 'a {object_color} {shape} on a {background} background'"):
        parse_prompt(prompt)


def test_parse_prompt_rejects_same_object_and_background_colour():
    with pytest.raises(ValueError, match="two different colours"):
        parse_prompt("a red circle on a red background")


def test_split_is_deterministic_disjoint_and_holds_out_new_combinations():
    train, test = train_test_split(seed=0)
    assert (train, test) == train_test_split(seed=0)
    assert train_test_split(seed=1) != (train, test)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(all_prompts())
    assert 0.2 <= len(test) / len(all_prompts()) <= 0.25
    parsed = [parse_prompt(p) for p in train]
    assert {p.object_color for p in parsed} == set(COLORS) == {p.background for p in parsed}
    assert {p.shape for p in parsed} == set(SHAPES)


def test_split_rejects_a_fraction_that_cannot_hold_out_combinations():
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(test_fraction=0.6)


def test_render_is_seeded_in_range_and_uses_the_prompt_colours():
    prompt = parse_prompt("a yellow triangle on a blue background")
    image = render(prompt, torch.Generator().manual_seed(3))
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
    assert torch.equal(image, render(prompt, torch.Generator().manual_seed(3)))
    assert not torch.equal(image, render(prompt, torch.Generator().manual_seed(4)))
    blue, yellow = color_tensor(["blue", "yellow"])
    pixels = image.flatten(1).T
    is_blue = (pixels - blue).norm(dim=1) < 1e-6
    is_yellow = (pixels - yellow).norm(dim=1) < 1e-6
    assert is_blue[0] and is_blue.sum() > 500  # corners are background: shapes keep a margin
    assert is_yellow.sum() >= 20  # the smallest triangle has 50 px, ~30 fully inside
    edge = ~(is_blue | is_yellow)
    assert edge.any(), "edges should be anti-aliased mixes of the two colours"
    # every edge pixel is a mix of the two colours: on the segment between them
    mix = (pixels[edge] - blue) @ (yellow - blue) / (yellow - blue).square().sum()
    assert torch.allclose(blue + mix[:, None] * (yellow - blue), pixels[edge], atol=1e-6)


def test_render_batch_draws_each_shape_at_a_random_size_near_the_centre():
    prompts = [parse_prompt("a red square on a white background")] * 16
    images = render_batch(prompts, torch.Generator().manual_seed(0))
    red = (images[:, 1] < 0.5).float()
    red_area = red.flatten(1).sum(1)
    assert red_area.min() >= 130 and red_area.max() <= 410  # half-sides in [6, 10] px
    assert red_area.std() > 20
    coords = torch.arange(32.0) + 0.5
    cx = (red.sum(1) * coords).sum(1) / red_area
    cy = (red.sum(2) * coords).sum(1) / red_area
    assert (cx - 16).abs().max() <= CENTER_JITTER + 0.5 and (cy - 16).abs().max() <= CENTER_JITTER + 0.5
    assert cx.std() > 1.0 and cy.std() > 1.0  # the centre moves


@pytest.mark.parametrize("shape,area_per_r2", [("circle", math.pi), ("square", 4.0), ("triangle", 2.0)])
def test_shape_coverage_has_the_analytic_area(shape, area_per_r2):
    r = torch.tensor([7.3])
    coverage = shape_coverage(torch.tensor([SHAPES.index(shape)]), torch.tensor([[15.2, 16.7]]), r, 32)
    assert coverage.sum().item() == pytest.approx(area_per_r2 * r.item() ** 2, rel=0.02)
