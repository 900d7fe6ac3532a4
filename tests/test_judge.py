"""The toy judge (dd.judge): independent of the distillation's classifier, saves/loads exactly, learns digits."""
import pytest
import torch

from dd import data, judge


def test_judge_is_not_the_classifier_architecture():
    model = judge.DigitJudge(judge.JudgeConfig(image_size=16))
    classifier = data.DigitClassifier(data.DigitClassifierConfig(image_size=16))
    assert not isinstance(model, data.DigitClassifier)
    # residual blocks and global pooling in the judge; a max-pool stack with a flattened embedding in the classifier
    assert any(isinstance(m, judge.ResidualBlock) for m in model.modules())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    judge_shapes = sorted(tuple(p.shape) for p in model.parameters())
    classifier_shapes = sorted(tuple(p.shape) for p in classifier.parameters())
    assert judge_shapes != classifier_shapes
    assert judge.JUDGE_SEED != 0  # the pipeline's seeds in params.yaml are small integers


def test_features_shape_range_and_size_check():
    torch.manual_seed(0)
    model = judge.DigitJudge(judge.JudgeConfig(image_size=16)).eval()
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    feats = judge.features(model, images, batch_size=2)
    assert feats.shape == (5, model.config.feature_dim) and feats.dtype == torch.float32
    assert (feats >= 0).all()  # post-ReLU pooled features, like Inception pool3
    assert torch.allclose(feats, judge.features(model, images))  # batching does not change the result
    assert judge.classify(model, images).shape == (5,)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*image_size 16"):
        model.features(torch.zeros(2, 3, 32, 32))


def test_augment_keeps_background_and_moves_digits():
    images, _ = data.load_mnist("test", 16)
    generator = torch.Generator().manual_seed(0)
    out = judge.augment(images[:50], generator)
    assert out.shape == images[:50].shape
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5
    blank = judge.augment(torch.full((4, 3, 16, 16), -1.0), generator)
    assert torch.allclose(blank, torch.full_like(blank, -1.0), atol=1e-5)  # padding is background, not grey
    assert (out - images[:50]).abs().mean() > 0.05  # it actually moves the digits


def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(1)
    model = judge.DigitJudge(judge.JudgeConfig(image_size=16)).eval()
    path = tmp_path / judge.FILE
    judge.save_judge(model, path, {"test_accuracy": 0.5})
    loaded = judge.load_judge(path)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(judge.features(model, x), judge.features(loaded, x))
    assert loaded.config == model.config
    with pytest.raises(FileNotFoundError, match=r"no toy judge at .*dd teacher --setting"):
        judge.load_judge(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    data.save_classifier(data.DigitClassifier(), foreign)  # has a config, but the wrong one
    with pytest.raises(ValueError, match="not a DigitJudge config"):
        judge.load_judge(foreign)


def test_short_training_learns_digits_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, metrics = judge.train_judge(image_size=16, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)
    # two epochs already separate the digits far above chance (0.1); the default 8 epochs give ~0.98
    assert metrics["test_accuracy"] > 0.7, metrics
    assert metrics["seed"] == judge.JUDGE_SEED and metrics["image_size"] == 16
    assert not model.training
