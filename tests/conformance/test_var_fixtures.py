"""Golden vectors of the official VAR code (fixtures/var): rebuild the VQVAE, VAR and VAR-DD models from the json
sidecars, load the official state_dicts strictly, and replay every call listed in config.json `calls`
(vqvae_io, var_io, dd_io), RNG-dependent sampling included. Driven by the folder's content: every model sidecar
(a json with `cls` and `state_file`) builds and loads, every call of config.json replays (a call without a replay
fails), every file and io tensor must be named by the sidecars or the calls; sizes come from the sidecars.

Tolerances (fixture README): logits / latents / continuous outputs atol 1e-4 rtol 1e-4, images atol 1e-4, token
indices exact, -inf positions compared as a mask.
Fixture folder: $DD_FIXTURES_VAR, default ../shared/fixtures/var next to the repository.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dd import sampling
from dd.models.dd_var import VARDD
from dd.models.var import VAR, filter_logits, var_config_for_depth
from dd.models.var_vqvae import VQVAE, phi_index_per_scale
from fixture_env import recorded_numerics, require_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("DD_FIXTURES_VAR", REPO_ROOT.parent / "shared" / "fixtures" / "var"))
ABSENT = f"VAR fixture folder {FIXTURES} is absent (set DD_FIXTURES_VAR)"


# ----------------------------------------------------------------------------------- comparisons
def assert_float_close(got, ref, what, atol=1e-4, rtol=1e-4):
    assert got.shape == ref.shape, f"{what}: shape {list(got.shape)} != {list(ref.shape)}"
    got, ref = got.detach().float().cpu(), ref.float()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), inf), f"{what}: -inf positions differ"
    assert torch.equal(got[inf], ref[inf]), f"{what}: signs of the infinite entries differ"
    torch.testing.assert_close(got[~inf], ref[~inf], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_image_close(got, ref, what):
    assert_float_close(got, ref, what, atol=1e-4, rtol=0.0)


def assert_tokens_equal(got, ref, what):
    assert got.dtype == torch.long and got.shape == ref.shape, f"{what}: {got.dtype} {list(got.shape)}"
    assert torch.equal(got.cpu(), ref), f"{what}: {(got.cpu() != ref).sum().item()} token(s) differ"


# ----------------------------------------------------------------------------------- models from the sidecars
def var_config_from_official(kwargs: dict, vae: VQVAE):
    assert kwargs["drop_rate"] == 0.0 and kwargs["attn_drop_rate"] == 0.0
    config = var_config_for_depth(
        kwargs["depth"], num_classes=kwargs["num_classes"], vocab_size=vae.V, latent_channels=vae.Cvae,
        patch_nums=kwargs["patch_nums"], mlp_ratio=kwargs["mlp_ratio"], norm_eps=kwargs["norm_eps"],
        shared_aln=kwargs["shared_aln"], cond_drop_rate=kwargs["cond_drop_rate"], attn_l2_norm=kwargs["attn_l2_norm"])
    assert (config.embed_dim, config.num_heads) == (kwargs["embed_dim"], kwargs["num_heads"])
    assert config.drop_path_rate == pytest.approx(kwargs["drop_path_rate"])
    return config


OFFICIAL_CLASSES = ("VQVAE", "VAR", "DD_Model")


def model_sidecars(folder: Path) -> dict[str, dict]:
    """Every model of the folder: json sidecars naming an official class and a state file, by file stem."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        side = json.loads(path.read_text())
        if isinstance(side, dict) and "state_file" in side:
            assert side.get("cls") in OFFICIAL_CLASSES, f"{path.name}: official class {side.get('cls')!r} has no " \
                                                        f"counterpart here ({', '.join(OFFICIAL_CLASSES)})"
            found[path.stem] = side
    return found


def the_one(sidecars: dict, cls: str) -> dict:
    matches = [side for side in sidecars.values() if side["cls"] == cls]
    assert len(matches) == 1, f"expected one {cls} sidecar in the fixture folder, found {len(matches)}"
    return matches[0]


def vqvae_from_official(kw: dict) -> tuple[VQVAE, dict]:
    assert not kw["using_znorm"] and kw["quant_conv_ks"] == 3 and kw["default_qresi_counts"] == 0
    kwargs = dict(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
                  share_quant_resi=kw["share_quant_resi"], patch_nums=kw["v_patch_nums"],
                  dropout=kw["dropout"], beta=kw["beta"], quant_resi=kw["quant_resi"])
    return VQVAE(**kwargs).eval(), kwargs


def dd_from_official(kwargs: dict, vae: VQVAE) -> VARDD:
    # the official n_d_embed_enable=False crashes in its own forward (self.n_d_embed is never built)
    assert kwargs["n_d_embed_enable"], "n_d_embed_enable=False cannot run in the official code either"
    return VARDD(var_config_from_official(kwargs, vae), layerwise_n_d_embed=kwargs["layerwise_n_d_embed"])


def load_state(folder: Path, side: dict) -> dict:
    """float16-stored states (the VQVAE: every value exactly representable) upcast to the float32 weights."""
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in load_file(folder / side["state_file"]).items()}


class Fixtures:
    """The fixture folder: config, io tensors, and our models loaded from the official states (eval mode)."""

    def __init__(self, folder: Path):
        self.config = json.loads((folder / "config.json").read_text())
        self.io = {name: load_file(folder / f"{name}.safetensors") for name in self.config["calls"]}
        self.sidecars = model_sidecars(folder)

        vq = the_one(self.sidecars, "VQVAE")
        kw = vq["kwargs"]
        self.vae, self.vae_kwargs = vqvae_from_official(kw)
        self.vae_state = load_state(folder, vq)
        self.vae.load_state_dict(self.vae_state, strict=True)
        self.phi_index = vq["phi_index_per_scale"]

        var_side = the_one(self.sidecars, "VAR")
        self.var_config = var_config_from_official(var_side["kwargs"], self.vae)
        self.var = VAR(self.var_config).eval()
        self.var_state = load_state(folder, var_side)
        self.var.load_state_dict(self.var_state, strict=True)

        # the dd_io calls replay the folder's DD model (its sidecar's options, layerwise_n_d_embed included)
        self.dd_side = the_one(self.sidecars, "DD_Model")
        self.dd_state = load_state(folder, self.dd_side)
        self.dd = self.new_student()

    def new_student(self) -> VARDD:
        student = dd_from_official(self.dd_side["kwargs"], self.vae).eval()
        student.load_state_dict(self.dd_state, strict=True)
        student.attach_codebook(self.vae.quantize.embedding.weight)
        return student


@pytest.fixture(scope="module")
def fx():
    require_folder(FIXTURES, "DD_FIXTURES_VAR")
    return Fixtures(FIXTURES)


def call_params():
    config_path = FIXTURES / "config.json"
    if not config_path.is_file():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=ABSENT), id="fixtures-absent")]
    calls = json.loads(config_path.read_text())["calls"]
    return [pytest.param(io_name, call, id=f"{io_name}:{call['name']}") for io_name, group in calls.items()
            for call in group]


def steps(t: int, B: int):
    return torch.zeros([B]) + t   # float t, exactly as the official sample.py passes it


# ----------------------------------------------------------------------------------- vqvae_io replays
def idx_inputs(io, call):
    return [io[k] for k in call["inputs"]]


def replay_encoder_quant_conv(fx, io, call):
    assert_float_close(fx.vae.img_to_f(io[call["inputs"][0]]), io[call["outputs"][0]], call["name"])


def replay_img_to_idxBl(fx, io, call):
    idx_list = fx.vae.img_to_idx_list(io[call["inputs"][0]])
    assert len(idx_list) == len(call["outputs"])
    for got, key in zip(idx_list, call["outputs"]):
        assert_tokens_equal(got, io[key], key)


def replay_f_to_fhat(fx, io, call):
    fhat_list = fx.vae.quantize.f_to_fhat_list(io[call["inputs"][0]])
    for got, key in zip(fhat_list, call["outputs"], strict=True):
        assert_float_close(got, io[key], key)


def replay_idxBl_to_img_all(fx, io, call):
    images = fx.vae.idx_list_to_img(idx_inputs(io, call), last_one=False)
    for got, key in zip(images, call["outputs"], strict=True):
        assert_image_close(got, io[key], key)


def replay_idxBl_to_img_last(fx, io, call):
    got = fx.vae.idx_list_to_img(idx_inputs(io, call), last_one=True)
    assert_image_close(got, io[call["outputs"][0]], call["name"])


def replay_idxBl_to_img_not_same_shape(fx, io, call):
    got = fx.vae.idx_list_to_img(idx_inputs(io, call), last_one=True, same_shape=False)
    assert_image_close(got, io[call["outputs"][0]], call["name"])


def replay_img_to_reconstructed_img(fx, io, call):
    got = fx.vae.img_to_reconstructed_img(io[call["inputs"][0]], last_one=True)
    assert_image_close(got, io[call["outputs"][0]], call["name"])


def replay_fhat_to_img(fx, io, call):
    assert_image_close(fx.vae.fhat_to_img(io[call["inputs"][0]]), io[call["outputs"][0]], call["name"])


def replay_idxBl_to_var_input(fx, io, call):
    got = fx.vae.idx_list_to_var_input(idx_inputs(io, call))
    assert_float_close(got, io[call["outputs"][0]], call["name"])


def replay_get_next_autoregressive_input(fx, io, call):
    B, C, pn_last = io[call["inputs"][0]].shape[0], fx.vae.Cvae, fx.vae.patch_nums[-1]
    f_hat = torch.zeros(B, C, pn_last, pn_last)
    for k, key in enumerate(call["inputs"]):
        f_hat, next_map = fx.vae.next_autoregressive_input(k, f_hat, io[key])
        assert_float_close(f_hat, io[f"{call['name']}.out.f_hat.{k}"], f"f_hat after scale {k}")
        assert_float_close(next_map, io[f"{call['name']}.out.next.{k}"], f"next input after scale {k}")


# ----------------------------------------------------------------------------------- var_io replays
def replay_forward(fx, io, call):
    label, x = (io[k] for k in call["inputs"])
    captured = {}
    hooks = [fx.var.blocks[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("x_in", args[0]))]
    for i, block in enumerate(fx.var.blocks):
        hooks.append(block.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(f"block{i}", out)))
    try:
        logits = fx.var(label, x)
    finally:
        for hook in hooks:
            hook.remove()
    captured["cond_BD"] = fx.var.class_emb(label)
    assert_float_close(logits, io[call["outputs"][0]], call["name"])
    for key in call.get("debug", []):
        assert_float_close(captured[key.rsplit(".", 1)[-1]], io[key], key)


def replay_forward_null(fx, io, call):
    label, x = (io[k] for k in call["inputs"])
    assert (label == fx.var.num_classes).all()
    assert_float_close(fx.var(label, x), io[call["outputs"][0]], call["name"])


def replay_autoregressive(fx, io, call):
    """autoregressive_infer_cfg; RNG-dependent cases need the official draw order on a CPU generator."""
    args, name = call["args"], call["name"]
    label = io[call["inputs"][0]]
    assert label.shape[0] == args["B"]
    generator = torch.Generator().manual_seed(args["g_seed"])
    guided = {}
    img, idx_list = fx.var.sample(fx.vae, label, cfg=args["cfg"], top_k=args["top_k"], top_p=args["top_p"],
                                  generator=generator, more_smooth=args["more_smooth"],
                                  logits_hook=lambda k, logits: guided.__setitem__(k, logits))
    assert len(idx_list) == fx.var.num_scales
    for k, got in enumerate(idx_list):
        assert_tokens_equal(got, io[f"{name}.out.idx.{k}"], f"{name} scale {k}")
        assert_float_close(guided[k], io[f"{name}.dbg.cfg_logits.{k}"], f"{name} guided logits scale {k}")
    assert_image_close(img, io[f"{name}.out.img"], f"{name} image")
    if not args["more_smooth"]:   # the final f_hat is the sum over scales of the drawn codes
        f_hat = fx.vae.tokens_to_fhat(fx.vae.idx_list_to_tokens(idx_list))
        assert_float_close(f_hat, io[f"{name}.dbg.f_hat"], f"{name} f_hat")


def replay_topk_topp_filter(fx, io, call):
    logits = io[call["inputs"][0]]
    for case in call["cases"]:
        before = logits.clone()
        got = filter_logits(logits, top_k=case["top_k"], top_p=case["top_p"])
        assert torch.equal(logits, before), "filter_logits must work out of place"
        assert_float_close(got, io[case["key"]], case["key"], atol=0, rtol=0)
    assert {case["key"] for case in call["cases"]} == set(call["outputs"])


# ----------------------------------------------------------------------------------- dd_io replays
def tokens_of_test_images(fx):
    vq_io = fx.io["vqvae_io"]
    return [vq_io[f"img_to_idxBl.out.{k}"] for k in range(len(fx.vae.patch_nums))]


def replay_dd_inputs(fx, io, call):
    assert_float_close(fx.vae.idx_list_to_tokens(tokens_of_test_images(fx)), io["x_data"], "x_data")
    assert io["noise"].shape == io["x_data"].shape


def key_t(key: str, pattern: str) -> int:
    return int(re.search(pattern, key).group(1))


def replay_perturb_data(fx, io, call):
    x_data, noise = (io[k] for k in call["inputs"])
    for key in call["outputs"]:
        t = key_t(key, r"\.t(\d+)\.")
        got = fx.dd.perturb(x_data, steps(t, x_data.shape[0]), noise)
        assert torch.equal(got, io[key]), f"{key}: perturb must copy, not mix"


def replay_dd_forward(fx, io, call):
    label = io[call["inputs"][0]]
    for key in call["inputs"][1:]:
        t = key_t(key, r"\.t(\d+)\.")
        x_BLCv, x_BLV = fx.dd(label, io[key], steps(t, label.shape[0]))
        assert_float_close(x_BLCv, io[f"forward.t{t}.out.x_BLCv"], f"forward t={t} x_BLCv")
        assert_float_close(x_BLV, io[f"forward.t{t}.out.x_BLV"], f"forward t={t} x_BLV")


def replay_forward_mixed_t(fx, io, call):
    label, t, x = (io[k] for k in call["inputs"])
    assert t.unique().numel() > 1, "the case is meant to mix steps within the batch"
    x_BLCv, x_BLV = fx.dd(label, x, t)
    assert_float_close(x_BLCv, io[call["outputs"][0]], call["outputs"][0])
    assert_float_close(x_BLV, io[call["outputs"][1]], call["outputs"][1])


def replay_final_predict(fx, io, call):
    label = io[call["inputs"][0]]
    for key in call["inputs"][1:]:
        t = key_t(key, r"\.t(\d+)\.")
        conti, logits = fx.dd.final_predict(label, io[key], steps(t, label.shape[0]))
        assert_float_close(conti, io[f"final_predict.t{t}.out.conti"], f"final_predict t={t} conti")
        assert_float_close(logits, io[f"final_predict.t{t}.out.logits"], f"final_predict t={t} logits")


def replay_get_final_sequence(fx, io, call):
    for key in call["outputs"]:
        t, split = key_t(key, r"\.t(\d+)\."), key_t(key, r"\.split(\d+)\.")
        conti, logits = io[f"final_predict.t{t}.out.conti"], io[f"final_predict.t{t}.out.logits"]
        assert_float_close(fx.dd.final_sequence(conti, logits, split), io[key], key)


def replay_fewstep(fx, io, call):
    """The official sample.py loop, step by step, then the same through our sampler (dd.sampling.dd_sample, which
    the sample stage and distillation use)."""
    label, noise = (io[k] for k in call["inputs"])
    split = fx.config["dd_sampling"]["loss_split_t"]
    t_list = [key_t(key, r"\.step_t(\d+)\.") for key in call["outputs"] if ".step_t" in key]
    x = noise
    for t in t_list:
        tt = steps(t, label.shape[0])
        x = fx.dd.perturb(x, tt, noise)
        x = fx.dd.final_sequence(*fx.dd.final_predict(label, x, tt), split)
        assert_float_close(x, io[f"{call['name']}.step_t{t}.out"], f"{call['name']} after step t={t}")
    generated = sampling.dd_sample(sampling.student_ops(fx.dd), label, noise, t_list, split)
    assert_float_close(generated, x, "dd_sample vs the step-by-step loop", atol=0, rtol=0)
    assert_image_close(fx.vae.tokens_to_img(generated), io[f"{call['name']}.out.img"], f"{call['name']} image")


def replay_init_with_teacher(fx, io, call):
    """Ours restores the official intent: lvl_embed row 1 is re-drawn and class_emb stays the teacher's; the rows
    the official draws at random are compared by construction (same global RNG, same draw order and sizes)."""
    seed = int(re.search(r"manual_seed\((\d+)\)", call["code"]).group(1))
    init_std = float(re.search(r"init_std=([\d.]+)", call["code"]).group(1))
    student = fx.new_student()
    torch.manual_seed(seed)
    student.init_from_teacher(fx.var, init_std=init_std)
    ours = student.state_dict()
    official = {key.removeprefix("init_with_teacher.out."): io[key] for key in call["outputs"]}

    for name in ("word_embed.weight", "word_embed.bias", "pos_start", "pos_1LC", "n_d_embed.weight"):
        assert_float_close(ours[name], official[name], name, atol=0, rtol=0)
    # class_emb: the official re-drew row 1 (its bug); every other row is the teacher's in both
    keep = torch.arange(ours["class_emb.weight"].shape[0]) != 1
    assert_float_close(ours["class_emb.weight"][keep], official["class_emb.weight"][keep], "class_emb rows != 1", 0, 0)
    assert torch.equal(ours["class_emb.weight"], fx.var.class_emb.weight), "class_emb must stay the teacher's"
    assert not torch.equal(official["class_emb.weight"][1], fx.var.class_emb.weight[1])
    # lvl_embed: rows 0, 2.. copied in both; row 1 re-drawn by us with the numbers the official put in class_emb[1]
    copied_rows = [0, *range(2, student.num_scales + 1)]
    assert_float_close(ours["lvl_embed.weight"][copied_rows], official["lvl_embed.weight"][copied_rows],
                       "lvl_embed rows != 1", 0, 0)
    assert not torch.equal(ours["lvl_embed.weight"][1], fx.dd_state["lvl_embed.weight"][1]), "lvl_embed[1] not re-drawn"
    assert torch.equal(ours["lvl_embed.weight"][1], official["class_emb.weight"][1])
    # everything the official copies from the teacher / leaves alone
    teacher = fx.var.state_dict()
    for name, value in ours.items():
        if name.startswith(("blocks.", "head", "shared_ada_lin")):
            assert torch.equal(value, teacher[name]), f"{name} not copied from the teacher"
        if name.startswith(("layerwise_n_d_embed.", "final_layer_conti.")):
            assert torch.equal(value, fx.dd_state[name]), f"{name} must keep the student's value"


REPLAY = {
    "vqvae_io": {
        "encoder_quant_conv": replay_encoder_quant_conv,
        "img_to_idxBl": replay_img_to_idxBl,
        "f_to_fhat": replay_f_to_fhat,
        "idxBl_to_img_all": replay_idxBl_to_img_all,
        "idxBl_to_img_last": replay_idxBl_to_img_last,
        "idxBl_to_img_not_same_shape": replay_idxBl_to_img_not_same_shape,
        "img_to_reconstructed_img": replay_img_to_reconstructed_img,
        "fhat_to_img": replay_fhat_to_img,
        "idxBl_to_var_input": replay_idxBl_to_var_input,
        "get_next_autoregressive_input": replay_get_next_autoregressive_input,
    },
    "var_io": {
        "forward": replay_forward,
        "forward_null": replay_forward_null,
        "topk_topp_filter": replay_topk_topp_filter,
    },
    "dd_io": {
        "inputs": replay_dd_inputs,
        "perturb_data": replay_perturb_data,
        "forward": replay_dd_forward,
        "forward_mixed_t": replay_forward_mixed_t,
        "final_predict": replay_final_predict,
        "get_final_sequence": replay_get_final_sequence,
        "init_with_teacher": replay_init_with_teacher,
    },
}


def replay_for(io_name: str, call: dict):
    if io_name == "var_io" and call["name"].startswith("ar_"):
        return replay_autoregressive
    if io_name == "dd_io" and call["name"].startswith("fewstep_"):
        return replay_fewstep
    return REPLAY.get(io_name, {}).get(call["name"])


@pytest.mark.parametrize("io_name,call", call_params())
def test_replay_official_call(fx, io_name, call):
    replay = replay_for(io_name, call)
    assert replay is not None, f"fixture call {io_name}:{call['name']} has no replay here: add one"
    with torch.no_grad(), recorded_numerics(fx.config.get("deterministic")):
        replay(fx, fx.io[io_name], call)


def sidecar_params():
    if not FIXTURES.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="fixtures-absent")]
    return [pytest.param(stem, id=stem) for stem in model_sidecars(FIXTURES)]


@pytest.mark.parametrize("stem", sidecar_params())
def test_every_model_file_loads_strict(fx, stem):
    """Every model file of the folder (not only the ones the calls use) builds from its sidecar and loads strictly;
    our state_dict round-trips key for key and tensor for tensor."""
    side = fx.sidecars[stem]
    state = load_state(FIXTURES, side)
    if side["cls"] == "VQVAE":
        model = vqvae_from_official(side["kwargs"])[0]
    elif side["cls"] == "VAR":
        model = VAR(var_config_from_official(side["kwargs"], fx.vae))
    else:
        model = dd_from_official(side["kwargs"], fx.vae)
    model.load_state_dict(state, strict=True)
    ours = model.state_dict()
    assert set(ours) == set(state)
    for name, value in state.items():
        assert torch.equal(ours[name], value), name


def test_phi_rule_matches_the_sidecar(fx):
    """The sidecar's Phi table is the official tick rule's."""
    share = fx.vae_kwargs["share_quant_resi"]
    assert phi_index_per_scale(len(fx.vae.patch_nums), share) == fx.phi_index
    assert fx.vae.quantize.quant_resi.index_of_scale == fx.phi_index


def test_every_file_and_tensor_of_the_folder_is_used(fx):
    """Another fixture set of this format replays without code changes, and nothing in it goes unchecked: every
    file is the config, a README, a model sidecar or state, or an io file of the calls; every io tensor is named
    by a call (inputs, outputs, debug or filter cases); DD variants, if listed, need a replay here."""
    known = {"README.md", "config.json"}
    for stem, side in fx.sidecars.items():
        known |= {f"{stem}.json", side["state_file"]}
    known |= {f"{name}.safetensors" for name in fx.config["calls"]}
    assert sorted(p.name for p in FIXTURES.iterdir() if p.name not in known) == []
    for io_name, group in fx.config["calls"].items():
        named = set()
        for call in group:
            named |= set(call.get("inputs", [])) | set(call.get("outputs", [])) | set(call.get("debug", []))
            named |= {case["key"] for case in call.get("cases", [])}
        assert sorted(set(fx.io[io_name]) - named) == [], f"{io_name}: tensors no call names"
    assert not fx.config.get("dd_variants"), "the fixture lists DD variants: add their replay"


def test_dd_without_layerwise_projections_is_the_layerwise_model_with_identity_projections(fx):
    """The official layerwise_n_d_embed=False adds the raw noise/data embedding where True adds its per-block
    projection: with identity projections (weight I, bias 0) the two are the same function, and the False model
    has exactly the official keys (no layerwise_n_d_embed.*)."""
    plain = dd_from_official({**fx.dd_side["kwargs"], "layerwise_n_d_embed": False}, fx.vae).eval()
    state = {k: v for k, v in fx.dd_state.items() if not k.startswith("layerwise_n_d_embed.")}
    plain.load_state_dict(state, strict=True)
    assert set(plain.state_dict()) == set(state)
    identity = fx.new_student()
    with torch.no_grad():
        for proj in identity.layerwise_n_d_embed:
            proj.weight.copy_(torch.eye(proj.weight.shape[0]))
            proj.bias.zero_()
    io = fx.io["dd_io"]
    label, x = io["label_B"], io["perturb_data.t1.out"]
    with torch.no_grad():
        for ours, ref in zip(plain(label, x, steps(1, label.shape[0])), identity(label, x, steps(1, label.shape[0]))):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # and the projections matter: the released (layerwise) model differs
        assert not torch.allclose(plain(label, x, steps(1, label.shape[0]))[1], fx.dd(label, x, steps(1, label.shape[0]))[1],
                                  atol=1e-3)


def test_vqvae_accepts_statistics_of_another_scale_count(fx):
    """As the official VQVAE.load_state_dict: ema_vocab_hit_SV with another first dim is replaced, not an error."""
    state = dict(fx.vae_state)
    state["quantize.ema_vocab_hit_SV"] = torch.ones(7, fx.vae.V)
    vae = VQVAE(**fx.vae_kwargs)
    vae.load_state_dict(state, strict=True)
    assert vae.quantize.ema_vocab_hit_SV.shape == (len(fx.vae.patch_nums), fx.vae.V)
    assert torch.equal(vae.quantize.embedding.weight, fx.vae.quantize.embedding.weight)
