"""The Teacher seam (dd.teacher) on tiny random teachers of both families: the distribution the sampler
draws from equals next_probs on the same prefix, the flow map is deterministic and row-independent,
decoders, and load_teacher from toy and hub-style folders (strict loads, presets expanded to the
official layouts)."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from dd.errors import StageError
from dd.models.llamagen import sampling_probs as llamagen_sampling_probs
from dd.models.var import sampling_probs as var_sampling_probs
from dd.teacher import LlamaGenTeacher, VarTeacher, load_teacher
from dd.models.build import build_models, setting_model_kwargs
from tiny_teacher import REPO, TOY_SETTINGS, peaked_models, single_thread, tiny_project  # noqa: F401

MANIFEST_DIR = Path(os.environ.get("DD_MANIFESTS", REPO.parent / "shared" / "reference" / "manifests"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return tiny_project(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module", params=TOY_SETTINGS)
def teacher(request, project):
    setting = project.setting(request.param)
    return load_teacher(setting, project.path.parent / "results" / setting.name / "teacher")


def test_schedule_codebook_and_shapes(teacher):
    if teacher.family == "var":
        assert isinstance(teacher, VarTeacher) and teacher.schedule == [1, 4, 9, 16]
        assert torch.equal(teacher.codebook, teacher.tokenizer.quantize.embedding.weight)
    else:
        assert isinstance(teacher, LlamaGenTeacher) and teacher.schedule == [1] * 16
        torch.testing.assert_close(teacher.codebook.norm(dim=-1), torch.ones(16))  # l2-normalised rows
    assert teacher.num_tokens == sum(teacher.schedule) and teacher.step_starts[-1] == teacher.num_tokens
    assert teacher.codebook.shape == (teacher.vocab_size, teacher.token_dim) == (16, 8 if teacher.family == "var" else 4)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_next_probs_is_the_distribution_the_sampler_draws_from(teacher):
    """Record the probs handed to the draw hook during a full sampling run (multinomial draws), then ask
    next_probs for every step on the same sampled prefix: identical distributions."""
    labels = torch.tensor([0, 1, 2, 3, 1])
    generator = torch.Generator().manual_seed(11)
    seen = {}

    def recording_draw(probs, step):
        seen[step] = probs.clone()
        batch, n, vocab = probs.shape
        return torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).view(batch, n)

    tokens = teacher.sample_tokens(labels, draw=recording_draw)
    assert tokens.shape == (5, teacher.num_tokens) and tokens.dtype == torch.long
    assert sorted(seen) == list(range(teacher.num_steps))
    for step, start in enumerate(teacher.step_starts[:-1]):
        probs = teacher.next_probs(tokens[:, :start], labels)
        assert probs.shape == (5, teacher.schedule[step], teacher.vocab_size)
        torch.testing.assert_close(probs, seen[step], atol=1e-5, rtol=1e-4)
    # the probs are the family's own post-processed distribution, not raw softmax: with top-k 3 the
    # support shrinks to 3 codes everywhere (ties aside)
    narrow = dataclasses.replace(teacher.sampling, top_k=3)
    other = type(teacher)(teacher.tokenizer, teacher.model, narrow)
    assert ((other.next_probs(tokens[:, :teacher.step_starts[1]], labels) > 0).sum(-1) == 3).all()


def test_sampling_is_seeded_and_the_distribution_matches_the_family_sampling_probs(teacher):
    labels = torch.tensor([3, 0])
    a = teacher.sample_tokens(labels, generator=torch.Generator().manual_seed(5))
    b = teacher.sample_tokens(labels, generator=torch.Generator().manual_seed(5))
    c = teacher.sample_tokens(labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # greedy draw hook + prefix continuation reproduces the greedy run
    greedy = teacher.sample_tokens(labels, draw=lambda probs, step: probs.argmax(-1))
    cut = teacher.step_starts[2]
    resumed = teacher.sample_tokens(labels, draw=lambda probs, step: probs.argmax(-1), prefix=greedy[:, :cut])
    assert torch.equal(resumed, greedy)
    partial = teacher.sample_tokens(labels, draw=lambda probs, step: probs.argmax(-1), num_steps=2)
    assert torch.equal(partial, greedy[:, :cut])
    with pytest.raises(ValueError, match="step boundary"):
        teacher.step_of(cut + 1 if teacher.family == "var" else teacher.num_tokens + 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        teacher.sample_tokens(torch.tensor([4]))
    # the first step's distribution, recomputed from the models' own logits and sampling_probs
    s = teacher.sampling
    with torch.no_grad():
        if teacher.family == "var":
            x = teacher.tokenizer.idx_list_to_var_input(list(greedy.split(teacher.schedule, 1)))
            cond = teacher.model(labels, x)[:, :1]
            expected = var_sampling_probs(cond, s.top_k, s.var_top_p(), s.temperature)  # the cfg ramp is 0 at scale 0
        else:
            cond = teacher.model(greedy[:, :0], labels)[:, -1]
            uncond = teacher.model(greedy[:, :0], torch.full_like(labels, teacher.num_classes))[:, -1]
            expected = llamagen_sampling_probs(uncond + (cond - uncond) * s.cfg, s.temperature, s.top_k, s.top_p)[:, None]
    torch.testing.assert_close(teacher.next_probs(greedy[:, :0], labels), expected, atol=1e-5, rtol=1e-4)


def test_flow_tokens_are_deterministic_and_row_independent(teacher):
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(6, teacher.num_tokens, teacher.token_dim, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    tokens = teacher.flow_tokens(noise, labels)
    assert tokens.shape == (6, teacher.num_tokens) and tokens.dtype == torch.long
    assert torch.equal(tokens, teacher.flow_tokens(noise, labels))
    # a row's trajectory depends on its own noise and label only
    assert torch.equal(tokens[2:4], teacher.flow_tokens(noise[2:4], labels[2:4]))
    assert torch.equal(tokens[[5, 0]], teacher.flow_tokens(noise[[5, 0]], labels[[5, 0]]))
    # and on all of its noise: changing the last token's noise can only change the last token
    changed = noise.clone()
    changed[:, -1] = torch.randn(6, teacher.token_dim, generator=generator) * 3
    other = teacher.flow_tokens(changed, labels)
    assert torch.equal(other[:, :-1], tokens[:, :-1])
    with pytest.raises(ValueError, match="noise must be"):
        teacher.flow_tokens(noise[:, 1:], labels)


def test_decoders(teacher):
    tokens = teacher.sample_tokens(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0))
    images = teacher.decode_tokens(tokens)
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    x = teacher.embed(tokens).requires_grad_(True)
    continuous = teacher.decode_embeddings(x)
    torch.testing.assert_close(continuous, images, atol=1e-5, rtol=1e-5)
    continuous.square().sum().backward()  # DD's perceptual loss backpropagates through the decoder
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected"):
        teacher.decode_tokens(tokens[:, 1:])


def test_bfloat16_decoder_is_an_inference_option(teacher):
    """sample.decoder_dtype "bfloat16": every decode path (tokens, embeddings, prefixes) runs the decoder in bf16
    when autograd is off: float32 images close to the fp32 ones but not equal (so the option is really on); with
    autograd on (the distill stage's perceptual term) the decoder stays float32, bit for bit."""
    tokens = teacher.sample_tokens(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0))
    x = teacher.embed(tokens)
    prefix = tokens[:, :teacher.step_starts[-2]]
    with torch.no_grad():
        reference = [teacher.decode_tokens(tokens), teacher.decode_embeddings(x), teacher.decode_prefix(prefix)]
    trained = teacher.decode_embeddings(x.clone().requires_grad_(True))
    teacher.decoder_dtype = "bfloat16"
    try:
        with torch.no_grad():
            fast = [teacher.decode_tokens(tokens), teacher.decode_embeddings(x), teacher.decode_prefix(prefix)]
        torch.testing.assert_close(teacher.decode_embeddings(x.clone().requires_grad_(True)), trained, atol=0, rtol=0)
    finally:
        teacher.decoder_dtype = "float32"
    for got, want in zip(fast, reference):
        assert got.dtype == torch.float32 and got.shape == want.shape
        difference = (got - want).abs()
        # bf16 keeps 8 bits of mantissa: a few 1e-3 on images in [-1, 1] (one uint8 level is 7.8e-3)
        assert 0 < difference.max() < 0.1 and difference.mean() < 0.02


def test_load_teacher_round_trips_the_toy_folder(project):
    """The loaded teacher holds exactly the saved weights (strict load from meta-built models)."""
    setting = project.setting("toy-llamagen")
    _, model, _, _ = peaked_models(setting)
    loaded = load_teacher(setting, project.path.parent / "results" / setting.name / "teacher")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert set(loaded.files) == {"tokenizer", "model"} and all(p.is_file() for p in loaded.files.values())
    with pytest.raises(StageError, match="no teacher.json"):
        load_teacher(setting, project.path.parent / "nowhere")
    with pytest.raises(StageError, match="family"):
        load_teacher(project.setting("toy-var"), project.path.parent / "results" / setting.name / "teacher")


def test_load_teacher_refuses_a_trained_folder_made_from_other_settings(project):
    """A toy teacher left in results/ by an older params.yaml (Snakemake does not re-run outputs it did not make
    itself) is refused with the differing keys and the command that rebuilds it, for either model."""
    folder = project.path.parent / "results" / "toy-llamagen" / "teacher"
    setting = project.setting("toy-llamagen")
    model = dict(setting.teacher.model, n_layer=setting.teacher.model["n_layer"] + 1)
    edited = dataclasses.replace(setting, teacher=dataclasses.replace(setting.teacher, model=model))
    with pytest.raises(StageError, match=r"trained model .*n_layer: 2 in the folder, 3 from params.yaml.*"
                                         r"dd teacher --setting toy-llamagen"):
        load_teacher(edited, folder)
    tokenizer = dict(setting.teacher.tokenizer, codebook_size=32)
    edited = dataclasses.replace(setting, teacher=dataclasses.replace(setting.teacher, tokenizer=tokenizer))
    with pytest.raises(StageError, match="trained tokenizer .*codebook_size: 16 in the folder, 32 from params.yaml"):
        load_teacher(edited, folder)


def test_load_teacher_from_hub_files(tmp_path, project):
    """A hub-style teacher folder (teacher.json `files` with load layouts, torch.save'd checkpoints) for
    a LlamaGen setting given by presets plus overrides: strict load, and a wrong checkpoint is one error."""
    base = project.setting("toy-llamagen")
    teacher_block = dataclasses.replace(
        base.teacher, source="hub", tokenizer_artifact="llamagen-vq-16", model_artifact="llamagen-gpt-b",
        tokenizer={"preset": "VQ-16", "codebook_size": 16, "codebook_embed_dim": 4, "ch": 32,
                   "encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "z_channels": 32},
        model={"preset": "GPT-B", "dim": 64, "n_layer": 2, "n_head": 4, "block_size": 16, "num_classes": 4})
    setting = dataclasses.replace(base, teacher=teacher_block)
    tok_kwargs, model_kwargs = setting_model_kwargs(setting)
    assert model_kwargs["vocab_size"] == 16 and model_kwargs["multiple_of"] == 256  # GPT-B preset fields kept
    torch.manual_seed(0)
    tokenizer, model = build_models("llamagen", tok_kwargs, model_kwargs)
    torch.save({"model": tokenizer.state_dict()}, tmp_path / "vq.pt")
    torch.save({"model": model.state_dict(), "args": None}, tmp_path / "gpt.pt")
    files = {"tokenizer": {"file": "vq.pt", "load_layout": "model"}, "model": {"file": "gpt.pt", "load_layout": "model"}}
    (tmp_path / "teacher.json").write_text(json.dumps({"family": "llamagen", "source": "hub", "files": files}))
    loaded = load_teacher(setting, tmp_path)
    assert torch.equal(loaded.model.output.weight, model.output.weight)
    wrong = dataclasses.replace(setting, teacher=dataclasses.replace(teacher_block, model={**teacher_block.model, "dim": 32}))
    with pytest.raises(StageError, match="does not fit the LlamaGenGPT"):
        load_teacher(wrong, tmp_path)


PAPER_MANIFESTS = [("var-d16", "var-vqvae-ch160v4096z32", "tokenizer"), ("var-d16", "var-d16", "model"),
                   ("var-d20", "var-d20", "model"), ("var-d24", "var-d24", "model"),
                   ("llamagen-b", "llamagen-vq-16", "tokenizer"), ("llamagen-b", "llamagen-gpt-b-c2i-256", "model"),
                   ("llamagen-l", "llamagen-gpt-l-c2i-256", "model")]


@pytest.mark.parametrize("setting_name,stem,role", [pytest.param(*row, id=row[1]) for row in PAPER_MANIFESTS])
def test_paper_settings_build_the_official_layouts(setting_name, stem, role):
    """The models load_teacher builds from params.yaml's paper rows have the official checkpoints' exact
    state_dict (key set, shapes, dtypes), so hub files load strictly."""
    path = MANIFEST_DIR / f"{stem}.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} absent (set DD_MANIFESTS)")
    from dd.config import load_params

    setting = load_params(REPO / "params.yaml").setting(setting_name)
    with torch.device("meta"):
        tokenizer, model = build_models(setting.family, *setting_model_kwargs(setting))
    state = (tokenizer if role == "tokenizer" else model).state_dict()
    expected = json.loads(path.read_text())["state_dict"]
    assert set(state) == set(expected)
    wrong = [k for k, v in state.items()
             if list(v.shape) != expected[k]["shape"] or str(v.dtype) != "torch." + expected[k]["dtype"]]
    assert not wrong, wrong[:5]


def test_distribution_gates_fail_a_collapsed_sampler():
    """The teacher stage's distribution gates: the real train digits pass, one prototype per class fails both
    the diversity and the Frechet-distance gate (class accuracy alone would pass it)."""
    from dd import data
    from dd.config import Gates
    from dd.toy_teacher import distribution_metrics, gate_table

    torch.manual_seed(0)
    classifier = data.DigitClassifier(data.DigitClassifierConfig(image_size=16))  # random features suffice here
    train_x, train_y = data.load_mnist("train", 16)
    test_x, test_y = data.load_mnist("test", 16)
    gates = Gates(classifier_accuracy=0.0, reconstruction_accuracy=0.0, sample_accuracy=0.0, num_samples=400,
                  enforce=True, sample_diversity=0.7, sample_fid_ratio=6.0)
    pick = torch.arange(0, 4000, 10)
    real = distribution_metrics(classifier, train_x[pick], train_y[pick], train_x[1::10], test_x, test_y)
    prototypes = train_x[train_y * 400][pick]  # the first train digit of each class, repeated
    collapsed = distribution_metrics(classifier, prototypes, train_y[pick], train_x[1::10], test_x, test_y)
    base = {"classifier_accuracy": 1.0, "reconstruction_accuracy": 1.0, "sample_accuracy": 1.0}
    assert gate_table("toy", {**base, **real}, gates)[1] == []
    failed = gate_table("toy", {**base, **collapsed}, gates)[1]
    assert [f.split()[0] for f in failed] == ["sample_diversity", "sample_fid_ratio"]
