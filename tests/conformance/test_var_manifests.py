"""Every official VAR-family checkpoint layout (reference/manifests/var-*.json: the VQVAE, VAR d16-d30, VAR-DD
d16-d24): build the full-size model on the meta device from the manifest's `config` and compare the state_dict with
the manifest exactly (key set and order, shapes, dtypes, persistent buffers) plus the parameter count.

Manifest folder: $DD_MANIFESTS, default ../shared/reference/manifests next to the repository.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from dd.models.dd_var import VARDD
from dd.models.var import VAR, var_config_for_depth
from dd.models.var_vqvae import VQVAE

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = Path(os.environ.get("DD_MANIFESTS", REPO_ROOT.parent / "shared" / "reference" / "manifests"))


def manifest_params():
    paths = sorted(MANIFEST_DIR.glob("var-*.json"))
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no var-*.json manifests in {MANIFEST_DIR} "
                                                                  "(set DD_MANIFESTS)"), id="no-manifests")]
    return [pytest.param(path, id=path.stem) for path in paths]


def build_from_manifest(manifest: dict) -> torch.nn.Module:
    """Our model for the manifest's official constructor, from its recorded config."""
    config = manifest["config"]
    if manifest["constructor"].startswith("VQVAE("):
        hard_coded = config["hard_coded"]
        assert not config["using_znorm"] and config["quant_conv_ks"] == 3 and config["default_qresi_counts"] == 0
        assert hard_coded["using_sa"] and hard_coded["using_mid_sa"] and hard_coded["groupnorm_groups"] == 32
        return VQVAE(vocab_size=config["vocab_size"], z_channels=config["z_channels"], ch=config["ch"],
                     share_quant_resi=config["share_quant_resi"], patch_nums=config["v_patch_nums"],
                     ch_mult=hard_coded["ch_mult"], num_res_blocks=hard_coded["num_res_blocks"],
                     dropout=config["dropout"], beta=config["beta"], quant_resi=config["quant_resi"],
                     in_channels=hard_coded["in_channels"])
    is_student = manifest["constructor"].startswith("build_vae_dd(")
    if is_student:
        assert config["n_d_embed_enable"] and config["layerwise_n_d_embed"]
        assert tuple(config["patch_nums_internal"]) == (1, *config["patch_nums_argument"])
    assert config["drop_rate"] == 0.0 and config["attn_drop_rate"] == 0.0
    var_config = var_config_for_depth(
        config["depth"], num_classes=config["num_classes"], vocab_size=config["V"], latent_channels=config["Cvae"],
        patch_nums=config["patch_nums_argument"] if is_student else config["patch_nums"],
        mlp_ratio=config["mlp_ratio"], norm_eps=config["norm_eps"], shared_aln=config["shared_aln"],
        cond_drop_rate=config["cond_drop_rate"], attn_l2_norm=config["attn_l2_norm"])
    # the builder rule must reproduce the recorded width / heads / drop-path rate
    assert (var_config.embed_dim, var_config.num_heads) == (config["embed_dim"], config["num_heads"])
    assert var_config.drop_path_rate == pytest.approx(config["drop_path_rate"], abs=1e-12)
    return VARDD(var_config) if is_student else VAR(var_config)


@pytest.mark.parametrize("manifest_path", manifest_params())
def test_state_dict_matches_manifest(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    with torch.device("meta"):
        model = build_from_manifest(manifest)
    state = model.state_dict()
    expected = manifest["state_dict"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert list(state) == list(expected), "same keys, different order"
    wrong = [(k, list(v.shape), str(v.dtype), expected[k]) for k, v in state.items()
             if list(v.shape) != expected[k]["shape"] or str(v.dtype) != "torch." + expected[k]["dtype"]]
    assert not wrong, f"{len(wrong)} keys differ, e.g. {wrong[:3]}"
    assert len(state) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(v.numel() for v in state.values()) == manifest["num_state_dict_elements"]
    buffers = sorted(name for name, _ in model.named_buffers() if name in state)
    assert buffers == sorted(manifest["buffers_in_state_dict"])
