import numpy as np
import pytest
import torch

from dd.data import (DigitClassifier, classify, image_grid, load_classifier, load_mnist, save_classifier,
                     train_classifier)


@pytest.fixture(scope="module")
def trained():
    return train_classifier(seed=0)


@pytest.mark.parametrize("split,count,per_class", [("train", 4000, 400), ("test", 1000, 100)])
def test_split_sizes_are_stratified(split, count, per_class):
    images, labels = load_mnist(split)
    assert images.shape == (count, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [per_class] * 10


def test_split_is_deterministic_and_independent_of_global_rng():
    first_images, first_labels = load_mnist("test")
    torch.manual_seed(123)
    np.random.seed(123)
    second_images, second_labels = load_mnist("test")
    assert torch.equal(first_images, second_images) and torch.equal(first_labels, second_labels)
    first_images.zero_()  # callers own their copy: the cache must not be corrupted
    assert not torch.equal(load_mnist("test")[0], first_images)


def test_splits_are_disjoint():
    train_images, _ = load_mnist("train")
    test_images, _ = load_mnist("test")
    train_keys = {row.tobytes() for row in train_images[:, 0].numpy()}
    test_keys = {row.tobytes() for row in test_images[:, 0].numpy()}
    assert len(train_keys & test_keys) == 0


def test_value_range_padding_and_channels():
    images, _ = load_mnist("train")
    assert images.min() == -1.0 and images.max() == 1.0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                        images[..., :, :2].flatten(), images[..., :, -2:].flatten()])
    assert torch.all(border == -1.0)  # the 28x28 digit is centred with a 2 px background margin


def test_other_image_size_resamples_the_frame():
    images, labels = load_mnist("test", image_size=16)
    assert images.shape == (1000, 3, 16, 16)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(labels, load_mnist("test")[1])


@pytest.mark.parametrize("kwargs", [dict(split="val"), dict(split="train", image_size=4)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        load_mnist(**kwargs)


def test_classifier_reaches_quality_gate(trained):
    model, metrics = trained
    test_images, test_labels = load_mnist("test")
    accuracy = (classify(model, test_images, batch_size=256) == test_labels).float().mean().item()
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(metrics["test_accuracy"])
    assert model.features(test_images[:5]).shape == (5, model.config.feature_dim)


def test_training_is_deterministic_given_seed():
    state_before = torch.get_rng_state()
    first, _ = train_classifier(seed=3, epochs=1)
    second, _ = train_classifier(seed=3, epochs=1)
    other, _ = train_classifier(seed=4, epochs=1)
    assert torch.equal(torch.get_rng_state(), state_before)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_save_load_round_trip(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "classifier.safetensors"
    save_classifier(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["classifier.safetensors"]  # no temp file left behind
    loaded = load_classifier(path)
    images, _ = load_mnist("test")
    with torch.no_grad():
        assert torch.equal(model(images[:64]), loaded(images[:64]))
    assert loaded.config == model.config


def test_wrong_input_shape_raises():
    with pytest.raises(ValueError, match="expects images of shape"):
        DigitClassifier()(torch.zeros(2, 1, 32, 32))


def test_image_grid_shape_and_values():
    images = -torch.ones(10, 3, 32, 32)
    images[0] = 1.0
    grid = image_grid(images, nrow=4)
    assert grid.mode == "RGB" and grid.size == (2 + 4 * 34, 2 + 3 * 34)  # (width, height)
    pixels = np.asarray(grid)
    assert (pixels[2:34, 2:34] == 255).all() and (pixels[2:34, 36:68] == 0).all()
    unit_grid = image_grid(torch.full((3, 1, 8, 8), 0.5), nrow=8, value_range=(0, 1), padding=0)
    assert unit_grid.size == (24, 8) and (np.asarray(unit_grid) == 128).all()
    with pytest.raises(ValueError):
        image_grid(torch.full((1, 3, 8, 8), 255.0))
