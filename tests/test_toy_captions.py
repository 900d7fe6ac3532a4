"""dd.toy_captions on the real toy digits: the attribute words react to the image edits they name, carry
information beyond the class, and the offline toy text encoder understands every caption word."""
import pytest
import torch
import torch.nn.functional as F

from dd.data import load_mnist
from dd.toy_captions import DIGIT_NAMES, AttributeBins, measure_attributes, toy_caption_encoder


@pytest.fixture(scope="module")
def digits():
    images, labels = load_mnist("train", 16)
    return images, labels


def shear(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Horizontal shear: output (x, y) reads input (x + amount * y), y growing downwards, so a positive
    amount moves the bottom of the digit left and its top right: a right slant."""
    theta = torch.tensor([[1.0, amount, 0.0], [0.0, 1.0, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def test_attributes_follow_the_edits_they_name(digits):
    images = digits[0][::40]  # 100 digits, 10 per class
    before = measure_attributes(images)
    thicker = F.max_pool2d(images, 3, stride=1, padding=1)  # dilate the white strokes
    assert (measure_attributes(thicker)["thickness"] > before["thickness"]).all()
    narrower = F.interpolate(images, size=(16, 10), mode="bilinear", antialias=True)
    narrower = F.pad(narrower, (3, 3, 0, 0), value=-1.0)
    assert (measure_attributes(narrower)["width"] < before["width"]).float().mean() > 0.95
    assert (measure_attributes(shear(images, 0.4))["slant"] > before["slant"]).float().mean() > 0.95
    assert (measure_attributes(shear(images, -0.4))["slant"] < before["slant"]).float().mean() > 0.95


def test_captions_name_the_class_and_carry_more_than_it(digits):
    images, labels = digits
    bins = AttributeBins.fit(images)
    captions = bins.captions(images, labels)
    assert all(f"digit {DIGIT_NAMES[int(label)]} " in caption for caption, label in zip(captions, labels))
    measured = bins.bins(images)
    for name, values in measured.items():
        assert (torch.bincount(values, minlength=3) - len(values) / 3).abs().max() <= 1  # terciles
        # inside most classes at least two words of each attribute are common: not a function of the label
        spread = [(torch.bincount(values[labels == c], minlength=3) >= 40).sum() >= 2 for c in range(10)]
        assert sum(spread) >= 7, (name, spread)
    with pytest.raises(ValueError, match="labels"):
        bins.captions(images[:3], labels[:2])


def test_toy_encoder_is_offline_deterministic_and_knows_every_word(digits):
    images, labels = digits
    captions = AttributeBins.fit(images).captions(images[::400], labels[::400])
    encoder = toy_caption_encoder(max_length=12, d_model=16, seed=0)
    ids, mask = encoder.tokenize(captions)
    assert not (ids == encoder.tokenizer.unk_token_id).any()
    features, left_mask = encoder.encode(captions)
    assert features.shape == (10, 12, 16) and left_mask[:, -1].all()
    again, _ = toy_caption_encoder(max_length=12, d_model=16, seed=0).encode(captions)
    torch.testing.assert_close(again, features)
    other, _ = toy_caption_encoder(max_length=12, d_model=16, seed=1).encode(captions)
    assert not torch.allclose(other, features)
    assert not torch.allclose(features[0], features[1])
