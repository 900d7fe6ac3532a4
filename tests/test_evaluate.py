"""The evaluate stage's metrics (dd.evaluate): agreement with the reference implementations, behaviour on
constructed sets, the offline error, and a toy evaluation end to end on real digits.

Tolerances, and why:
  - FID: clean-fid's scipy sqrtm against torch-fidelity's eigenvalue formula and a closed form for diagonal
    covariances: relative 1e-6 (float64 throughout; sqrtm's own error is ~1e-12 relative on these sizes).
  - Precision / recall: counts of "inside a ball" decisions, compared with the ADM evaluator's formulas re-derived
    here in numpy (squared distances from |a|^2 - 2ab + |b|^2, np.partition for the k-th neighbour, `<=`): equal up
    to 2 decisions in N (torch.cdist and the expansion differ in the last float bits, which can flip a point lying
    exactly on a ball's boundary; none did in practice, but a test must not depend on it).
  - Inception Score: the ADM formula re-derived in numpy, relative 1e-9 (float64).
  - Inception features: our FidInception against clean-fid's legacy_pytorch extractor with the same random weights
    (nothing downloads: clean-fid's weight download is replaced by our random state dict): relative 1e-4 (float32
    convolutions in a different batch layout; observed ~1e-6). The ADM input path against torch-fidelity's TF1
    resize fed to the same trunk: relative 1e-5.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dd import evaluate as ev
from dd import hub
from dd.errors import StageError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# References re-derived from the ADM evaluator (openai/guided-diffusion evaluations/evaluator.py)
# --------------------------------------------------------------------------------------------------
def adm_squared_distances(a, b):
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]


def adm_radii(features, k=3):
    d = adm_squared_distances(features, features)
    return np.partition(d, k, axis=1)[:, k]  # k-th neighbour, the point itself being the 0-th


def adm_precision_recall(reference, samples, k=3):
    r_ref, r_smp = adm_radii(reference, k), adm_radii(samples, k)
    d = adm_squared_distances(reference, samples)  # (n_ref, n_samples)
    precision = (d <= r_ref[:, None]).any(axis=0).mean()  # samples inside some reference ball
    recall = (d <= r_smp[None, :]).any(axis=1).mean()  # reference inside some sample ball
    return precision, recall


def adm_inception_score(logits, split_size=5000):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero_and_a_shift_costs_its_squared_norm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    assert abs(ev.fid_from_features(a, a)) < 1e-6
    shift = np.full(16, 0.5)
    # same covariance, mean moved by `shift`: FID = |shift|^2 exactly
    assert ev.fid_from_features(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert ev.fid_from_features(a + 2 * shift, a) > ev.fid_from_features(a + shift, a)


def test_fid_agrees_with_torch_fidelity_and_the_closed_form():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3
    b = rng.normal(size=(300, 32)) * 1.5 + 0.2
    ours = ev.fid_from_features(a, b)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                      fid_features_to_statistics(torch.from_numpy(b)), verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    from cleanfid import fid

    assert ours == pytest.approx(fid.fid_from_feats(a, b), rel=1e-12)  # the same arithmetic as clean-fid's own
    # diagonal covariances: |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.5, 2, 8), rng.uniform(0.5, 2, 8)
    closed = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert ev.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-6)


def test_fid_falls_back_to_eigenvalues_when_clean_fid_refuses(monkeypatch):
    from cleanfid import fid
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 16)), rng.normal(size=(7, 16)) + 1  # rank-deficient covariances
    expected = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                        fid_features_to_statistics(torch.from_numpy(b)), verbose=False)

    def refuse(*args, **kwargs):
        raise ValueError("Imaginary component 0.5")

    monkeypatch.setattr(fid, "frechet_distance", refuse)
    assert ev.fid_from_features(a, b) == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------------
def test_precision_recall_agree_with_the_adm_formulas():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(600, 20))
    samples = rng.normal(size=(700, 20)) * 0.8 + 0.3
    ours = ev.precision_recall(samples, reference)
    adm = adm_precision_recall(reference, samples)
    assert abs(ours[0] - adm[0]) <= 2 / len(samples) and abs(ours[1] - adm[1]) <= 2 / len(reference)
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95  # a case where both are informative


def test_precision_recall_on_constructed_manifolds():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(400, 8))
    assert ev.precision_recall(reference.copy(), reference) == (1.0, 1.0)
    assert ev.precision_recall(reference + 100.0, reference) == (0.0, 0.0)
    # mode collapse: every sample sits next to one reference point -> precise, but recalls almost nothing
    collapsed = reference[:1] + rng.normal(size=(400, 8)) * 1e-3
    precision, recall = ev.precision_recall(collapsed, reference)
    assert precision == 1.0 and recall < 0.05
    with pytest.raises(StageError, match="N > k=3"):
        ev.precision_recall(reference[:3], reference)


# --------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------
def test_inception_score_agrees_with_the_adm_formula_and_its_bounds():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(7000, 50)) * 3  # two ADM splits: 5000 + 2000
    assert ev.inception_score(logits) == pytest.approx(adm_inception_score(logits), rel=1e-9)
    assert ev.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)  # no information -> 1
    confident = np.eye(10)[np.arange(1000) % 10] * 50.0  # sharp and evenly spread -> number of classes
    assert ev.inception_score(confident) == pytest.approx(10.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Same-class diversity and pixels
# --------------------------------------------------------------------------------------------------
def test_same_class_diversity():
    a = torch.zeros(3, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[1] += 0.5  # distance 0.5 * sqrt(48)
    images = torch.cat([a, b])
    labels = torch.tensor([0, 0, 0, 1, 1])
    expected = np.mean([0.0, 0.5 * np.sqrt(16)])  # grey images: 4x4 pixels
    assert ev.same_class_diversity(images, labels) == pytest.approx(expected)
    with pytest.raises(StageError, match="at least two"):
        ev.same_class_diversity(a[:1], labels[:1])


def test_uint8_round_trip_of_the_sample_stage_rule():
    from dd.sample_stage import to_uint8

    x = torch.rand(4, 3, 8, 8) * 2 - 1
    back = ev.uint8_to_unit(to_uint8(x))
    assert back.shape == x.shape and (back - x).abs().max() <= 1 / 127.5  # within one byte
    assert ev.uint8_to_unit(torch.tensor([[[[0, 255, 0]]]], dtype=torch.uint8)).flatten().tolist() == [-1, 1, -1]


# --------------------------------------------------------------------------------------------------
# The paper's Inception: same network and preprocessing as clean-fid legacy_pytorch (random weights)
# --------------------------------------------------------------------------------------------------
def test_fid_inception_matches_clean_fid_legacy_pytorch(monkeypatch):
    from cleanfid import features as cf_features
    from cleanfid import inception_pytorch
    from cleanfid.resize import make_resizer

    torch.manual_seed(0)
    ours = ev.FidInception()  # random weights
    state = {k: v.clone() for k, v in ours.net.state_dict().items()}
    monkeypatch.setattr(inception_pytorch, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = cf_features.feature_extractor(name="pytorch_inception", device=torch.device("cpu"),
                                           use_dataparallel=False)
    resize = make_resizer("PyTorch", False, "bilinear", (299, 299))  # clean-fid's legacy_pytorch resizer

    images = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    pool3, logits = ours(images)
    batch = torch.stack([torch.from_numpy(resize(img.numpy().astype(np.float32)).transpose(2, 0, 1))
                         for img in images])
    reference = theirs(batch)
    assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.allclose(pool3, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert torch.allclose(logits, pool3 @ ours.net.fc.weight.T)  # ADM: no bias
    # the ADM path: TF1 resize (torch-fidelity's port) and (x - 128) / 128 into the same trunk
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    tf_input = (interpolate_bilinear_2d_like_tensorflow1x(images.permute(0, 3, 1, 2).float(), size=(299, 299),
                                                          align_corners=False) - 128) / 128
    adm_pool3, adm_logits = ours(images, adm=True)
    with torch.no_grad():
        expected = ours.trunk(tf_input).flatten(1)
    assert torch.allclose(adm_pool3, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (adm_pool3 - pool3).abs().max() > 1e-3 * pool3.abs().max()  # the two input paths really differ
    with pytest.raises(ValueError, match="uint8"):
        ours(images.float())


def test_paper_artifacts_are_registered_and_offline_fails_with_one_line(tmp_path, monkeypatch):
    from dd.config import load_params

    for name in (ev.INCEPTION_WEIGHTS, ev.ADM_REFERENCE):
        art = hub.EVAL_ARTIFACTS[name]
        assert art.url.startswith("https://") and art.url.endswith(art.basename)
    assert hub.ARTIFACTS[ev.FID_STATISTIC].kind == "fid_stat"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DD_CHECKPOINTS", str(tmp_path / "ckpt"))
    params = load_params(REPO / "params.yaml")
    with pytest.raises(hub.HubError) as err:
        ev.load_inception(params, "cpu")
    message = str(err.value)
    assert "\n" not in message
    assert hub.EVAL_ARTIFACTS[ev.INCEPTION_WEIGHTS].url in message
    assert str(tmp_path / "ckpt" / "eval" / "pt_inception-2015-12-05-6726825d.pth") in message
    with pytest.raises(hub.HubError, match="VIRTUAL_imagenet256_labeled.npz"):
        hub.fetch(ev.ADM_REFERENCE, tmp_path / "ckpt" / "eval")


def test_npz_layout_loads_without_pickle(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    loaded = hub.load_checkpoint(path, "npz")
    assert loaded["arr_0"].dtype == torch.uint8 and loaded["arr_0"].shape == (2, 4, 4, 3)
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(hub.HubError, match="bad.npz"):
        hub.load_checkpoint(tmp_path / "bad.npz", "npz")


# --------------------------------------------------------------------------------------------------
# The toy stage end to end: a judge, a samples folder, the metrics file, the summary
# --------------------------------------------------------------------------------------------------
def _write_samples(folder: Path, setting, method: str, images_u8: torch.Tensor, labels: torch.Tensor) -> None:
    from dd.sample_stage import FORMAT, MANIFEST

    folder.mkdir(parents=True)
    save_file({"images": images_u8.contiguous(), "labels": labels.contiguous()},
              str(folder / "shard-00000.safetensors"))
    manifest = {"format": FORMAT, "complete": True, "setting": setting.name, "method": method,
                "num_samples": len(labels), "shard_size": len(labels), "image_size": setting.image_size, "seed": 0,
                "steps": 7, "source": "teacher",
                "shards": [{"file": "shard-00000.safetensors", "count": len(labels),
                            "sha256": hub.sha256_of(folder / "shard-00000.safetensors")}]}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def toy_project(tmp_path, monkeypatch):
    from dd import judge
    from dd.config import load_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(tmp_path / "params.yaml")
    setting = params.setting("toy-var")
    torch.manual_seed(0)
    model = judge.DigitJudge(judge.JudgeConfig(image_size=setting.image_size))  # random weights are enough here
    (tmp_path / "results" / setting.name / "teacher").mkdir(parents=True)
    judge.save_judge(model, tmp_path / "results" / setting.name / "teacher" / judge.FILE)
    return params, setting


def test_missing_samples_folder_is_one_clear_error(toy_project):
    params, setting = toy_project
    with pytest.raises(StageError, match=r"no samples of method 'dd-1step'.*dd sample --setting toy-var --method "
                                         r"dd-1step"):
        ev.run_evaluate_stage(params, setting, "dd-1step", latency=False)
    with pytest.raises(StageError, match="no method 'nope'"):
        ev.run_evaluate_stage(params, setting, "nope", latency=False)
    assert not (params.path.parent / "results" / setting.name / "metrics").exists()


def test_toy_evaluation_of_real_digits_hits_the_reference(toy_project):
    from dd import data
    from dd.sample_stage import samples_dir, to_uint8

    params, setting = toy_project
    test_x, test_y = data.load_mnist("test", setting.image_size)
    _write_samples(samples_dir(params, setting, "teacher"), setting, "teacher", to_uint8(test_x), test_y)
    path = ev.run_evaluate_stage(params, setting, "teacher", device="cpu", latency=False)
    record = json.loads(path.read_text())
    interface = {"fid", "is", "precision", "recall", "n_samples", "steps", "latency_s", "params", "device",
                 "torch_version", "num_threads", "method", "setting", "class_accuracy", "diversity", "fid_floor",
                 "diversity_real", "judge"}
    assert interface <= set(record), interface - set(record)
    # the "samples" are the reference digits themselves: nothing separates them
    assert abs(record["fid"]) < 1e-6 and record["precision"] == 1.0 and record["recall"] == 1.0
    assert record["diversity"] == pytest.approx(record["diversity_real"])
    assert record["is"] is None and record["latency_s"] is None and record["params"] is None
    assert record["n_samples"] == 1000 and record["steps"] == 7 and record["fid_floor"] > 0

    # a corrupted copy (half the digits replaced by blank frames) is measurably worse
    broken = to_uint8(test_x)
    broken[::2] = 0
    _write_samples(samples_dir(params, setting, "skip-1"), setting, "skip-1", broken, test_y)
    worse = json.loads(ev.run_evaluate_stage(params, setting, "skip-1", device="cpu", latency=False).read_text())
    assert worse["fid"] > 10 * record["fid_floor"]
    assert worse["recall"] < record["recall"] and worse["diversity"] < record["diversity"]

    rows = ev.summary_rows(params, setting)
    by_method = {r["method"]: r for r in rows}
    assert by_method["dd-1step"]["status"] == "not run" and by_method["teacher"]["status"] == "ok"
    assert by_method["teacher"]["fid_vs_teacher"] == pytest.approx(1.0)
    assert by_method["skip-1"]["fid_vs_teacher"] > 10
    table = ev.summary_table(setting, rows)
    assert "| dd-1step | not run |" in table and "real: train vs test digits" in table


class TinyInception(torch.nn.Module):
    """FidInception's interface (uint8 (N, H, W, 3) -> (pool features, logits)) at a fraction of its cost, and with
    64-d features (scipy's sqrtm of a 2048x2048 product takes minutes on a busy CPU): the stage's wiring is under
    test here; the network itself is checked against clean-fid above."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3 * 8 * 8, 64)
        self.fc = torch.nn.Linear(64, 1008, bias=False)

    @torch.no_grad()
    def forward(self, images, adm=False):
        x = torch.nn.functional.adaptive_avg_pool2d(images.permute(0, 3, 1, 2).float() / 255, 8).flatten(1)
        x = x.flip(1) if adm else x  # the two input paths must not be mixed up
        pool3 = torch.relu(self.embed(x))
        return pool3, self.fc(pool3)


def test_paper_evaluation_end_to_end_with_hand_placed_artifacts(tmp_path, monkeypatch):
    """A paper row through run_evaluate_stage: the FID statistic and the ADM reference batch placed by hand (a
    made-up statistic, a 5-image reference batch), nothing downloads; the numbers in the metrics file are the
    formulas applied to the network's own features."""
    from dd.config import load_params
    from dd.sample_stage import samples_dir

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DD_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = load_params(tmp_path / "params.yaml")
    setting = params.setting("var-d16")
    size = setting.image_size

    torch.manual_seed(0)
    net = TinyInception()
    folder = tmp_path / "ckpt" / "eval"
    folder.mkdir(parents=True)
    # the real loader would need the 95 MB weights; the stage only asks load_inception for a network
    weights = folder / hub.EVAL_ARTIFACTS[ev.INCEPTION_WEIGHTS].basename
    weights.write_bytes(b"stand-in")  # adm_reference_features keys its cache on this file's hash
    monkeypatch.setattr(ev, "load_inception", lambda params, device: net)
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=64), np.eye(64) * 0.01
    torch.save({"m": mu, "s": sigma}, folder / hub.ARTIFACTS[ev.FID_STATISTIC].basename)
    reference = torch.from_numpy(rng.integers(0, 256, (5, size, size, 3), dtype=np.uint8))
    np.savez(folder / hub.EVAL_ARTIFACTS[ev.ADM_REFERENCE].basename, arr_0=reference.numpy())

    images = torch.from_numpy(rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8))
    _write_samples(samples_dir(params, setting, "dd-1step"), setting, "dd-1step", images,
                   torch.arange(6, dtype=torch.int64))
    record = json.loads(ev.run_evaluate_stage(params, setting, "dd-1step", device="cpu", latency=False).read_text())

    pool3 = net(images)[0].double().numpy()
    adm_pool3, adm_logits = (t.double().numpy() for t in net(images, adm=True))
    ref_pool3 = net(reference, adm=True)[0].double().numpy()
    sample_mu, sample_sigma = ev.feature_statistics(pool3)
    assert record["fid"] == pytest.approx(ev.frechet_distance(sample_mu, sample_sigma, mu, sigma), rel=1e-6)
    assert record["is"] == pytest.approx(adm_inception_score(adm_logits), rel=1e-6)
    assert (record["precision"], record["recall"]) == pytest.approx(adm_precision_recall(ref_pool3, adm_pool3))
    assert record["n_samples"] == 6 and "class_accuracy" not in record
    assert list(folder.glob("VIRTUAL_imagenet256_labeled.adm-pool3-*.npy"))  # reference features cached
    assert (folder / "statistic.pth.sha256").is_file()  # hand-placed files are verified and recorded
