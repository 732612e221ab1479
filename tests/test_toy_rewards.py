"""Toy rewards: high on rendered ground truth, low on wrong colours, shapes and noise; the registry."""

import math

import pytest
import torch

from mixgrpo.rewards import available_rewards, build_reward
from mixgrpo.toy.rewards import HELDOUT_REWARDS, TRAINING_REWARDS, background, contrast, object_color, realism, shape
from mixgrpo.toy.world import MAX_HALF_SIZE, MIN_HALF_SIZE, all_prompts, color_tensor, parse_prompt, render_batch

ALL = TRAINING_REWARDS + HELDOUT_REWARDS


def rendered(prompts, seed=0):
    return render_batch([parse_prompt(p) for p in prompts], torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def world():
    prompts = all_prompts()
    return prompts, rendered(prompts)


def test_ground_truth_scores_high(world):
    prompts, images = world
    assert object_color(images, prompts).min() > 0.95
    assert shape(images, prompts).mean() > 0.9 and shape(images, prompts).min() > 0.75
    assert background(images, prompts).mean() > 0.99 and background(images, prompts).min() > 0.97  # no size is preferred
    assert realism(images, prompts).min() > 0.99


def test_wrong_object_colour_scores_low():
    images = rendered(["a green circle on a blue background"] * 4)
    prompts = ["a red circle on a blue background"] * 4
    assert object_color(images, prompts).max() < 0.05
    assert shape(images, prompts).max() == 0  # no red region to fit
    assert background(images, prompts).min() > 0.75  # the background is right


def test_wrong_background_scores_low():
    images = rendered(["a red circle on a green background"] * 4)
    prompts = ["a red circle on a blue background"] * 4
    assert background(images, prompts).max() < 0.05
    assert realism(images, prompts).max() < 0.4


@pytest.mark.parametrize("drawn,asked", [("circle", "square"), ("square", "triangle"), ("triangle", "circle"),
                                         ("circle", "triangle"), ("square", "circle"), ("triangle", "square")])
def test_wrong_shape_scores_low_and_right_shape_high(drawn, asked):
    images = rendered([f"a white {drawn} on a black background"] * 8)
    wrong = shape(images, [f"a white {asked} on a black background"] * 8)
    right = shape(images, [f"a white {drawn} on a black background"] * 8)
    assert right.min() > 0.9 and wrong.max() < 0.7 and (right - wrong).min() > 0.25


def test_noise_scores_low_on_everything_but_contrast(world):
    prompts, _ = world
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert object_color(noise, prompts).mean() < 0.2
    assert background(noise, prompts).max() < 0.1
    assert shape(noise, prompts).max() < 0.1
    assert realism(noise, prompts).max() < 0.05


def test_a_tall_bar_does_not_pass_for_any_shape():
    # A template stretched to the region's bounding box was gamed by bars; ours stays square.
    red, blue = color_tensor(["red", "blue"])
    bar = blue.view(1, 3, 1, 1).repeat(1, 1, 32, 32)
    bar[:, :, 2:30, 12:18] = red.view(1, 3, 1, 1)
    for name in ("circle", "square", "triangle"):
        assert shape(bar, [f"a red {name} on a blue background"]).item() < 0.05


def test_contrast_is_one_for_half_black_half_white_and_zero_for_flat():
    images = torch.zeros(2, 3, 32, 32)
    images[0, :, :, 16:] = 1.0
    images[1] = 0.5
    scores = contrast(images, ["a white square on a black background"] * 2)
    assert scores.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("half_size", [MIN_HALF_SIZE, (MIN_HALF_SIZE + MAX_HALF_SIZE) / 2, MAX_HALF_SIZE])
def test_realism_gives_rendered_shapes_of_every_size_full_marks(half_size):
    # Counting anti-aliased edge pixels as implausible made a larger drawing look less real (0.97 -> 0.95).
    prompts = all_prompts()
    images = render_batch([parse_prompt(p) for p in prompts], torch.Generator().manual_seed(0),
                          half_sizes=torch.full((len(prompts),), half_size))
    assert realism(images, prompts).min() > 0.99


def test_realism_catches_haze_and_a_wide_transition(world):
    prompts, images = world
    bg = color_tensor([parse_prompt(p).background for p in prompts]).view(-1, 3, 1, 1)
    obj = color_tensor([parse_prompt(p).object_color for p in prompts]).view(-1, 3, 1, 1)
    hazy = images.clone()
    hazy[:, :, :8, :] = 0.6 * bg + 0.4 * obj  # a band of half-mixed colour, touching no pure pixel of the object
    assert (realism(hazy, prompts) < realism(images, prompts) - 0.15).all()
    wide = torch.nn.functional.avg_pool2d(images, 5, 1, 2, count_include_pad=False)
    assert realism(wide, prompts).mean() < realism(images, prompts).mean() - 0.1


def test_blur_is_caught_by_shape_and_realism(world):
    prompts, images = world
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    assert shape(blurred, prompts).mean() < shape(images, prompts).mean() - 0.1
    assert realism(blurred, prompts).mean() < realism(images, prompts).mean() - 0.05


@pytest.mark.parametrize("name", ALL)
def test_registered_rewards_are_vectorised_bounded_and_mark_failed_rows(name, world):
    assert name in available_rewards()
    reward = build_reward(name)
    assert reward.name == name
    prompts, images = world
    images = images[:12].clone()
    images[3] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = prompts[:12]
    batch = reward(images, prompts)
    assert batch.shape == (12,) and batch.min() >= 0 and batch.max() <= 1
    rows = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(12)])
    assert torch.allclose(batch, rows, atol=1e-6)
    images[5, 0, 0, 0] = math.nan
    marked = reward(images, prompts)
    assert torch.isnan(marked[5]) and not torch.isnan(marked[torch.arange(12) != 5]).any()


def test_rewards_name_the_fix_for_bad_inputs():
    reward = build_reward("toy_shape")
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(2, 3, 32, 32), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.rand(3, 32, 32), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        reward(torch.rand(1, 3, 32, 32), ["a cat"])


@pytest.mark.parametrize("arm", [3, 4, 5, 6])
def test_one_compromise_drawing_scores_for_at_most_one_shape_word(arm):
    """A plus-shaped cross (what the tuned model drew for every shape word before): the lead term of the
    shape reward lets it score for at most one word, so one drawing cannot serve every prompt."""
    from mixgrpo.toy.world import SHAPES, ToyPrompt

    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 16 - arm:16 + arm, 8:24] = 1.0
    image[0, 0, 8:24, 16 - arm:16 + arm] = 1.0  # red cross on black
    scores = [float(shape(image, [ToyPrompt("red", asked, "black").text])) for asked in SHAPES]
    assert sum(score > 0.05 for score in scores) <= 1, scores


def test_validation_split_is_disjoint_from_training_and_test_and_keeps_every_word():
    from mixgrpo.toy.world import COLORS, SHAPES, parse_prompt, train_test_split, train_validation_test_split

    train, validation, test = train_validation_test_split()
    assert test == train_test_split()[1]
    assert not set(train) & set(validation) and not set(validation) & set(test)
    assert sorted(train + validation) == sorted(train_test_split()[0])
    parsed = [parse_prompt(p) for p in train]
    assert {p.shape for p in parsed} == set(SHAPES) and {p.object_color for p in parsed} == set(COLORS)
    assert train_validation_test_split() == (train, validation, test)
