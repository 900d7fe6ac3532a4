"""Model construction from a setting, for every source (trained toy teachers and official checkpoints alike):
the full constructor kwargs of a setting's tokenizer and AR model (LlamaGen presets expanded, checked against the
image size and each other), and fresh modules built from them (or from the kwargs a teacher.json records).
dd.teacher (loading any teacher) and dd.toy_teacher (training one) both build their models here."""
from __future__ import annotations

import dataclasses
import inspect
import json

from dd.config import Setting
from dd.errors import StageError
from dd.models.llamagen import GPT_CONFIGS, GPTConfig, LlamaGenGPT
from dd.models.llamagen_vq import VQ_CONFIGS, VQConfig, VQModel
from dd.models.var import VAR, VARConfig, var_config_for_depth
from dd.models.var_vqvae import VQVAE


def _construct(cls, kwargs: dict, where: str):
    """cls(**kwargs) with one clear error for unknown keys or values the class rejects."""
    allowed = [name for name in inspect.signature(cls).parameters]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise StageError(f"{where}: unknown key '{unknown[0]}' for {cls.__name__} "
                         f"(allowed: {', '.join(allowed)}); fix the block in params.yaml")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise StageError(f"{where}: {cls.__name__} rejects {kwargs}: {err}") from None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list))


def tokenizer_kwargs(setting: Setting) -> dict:
    """The full constructor kwargs of the setting's tokenizer (VQConfig fields or VQVAE arguments),
    checked against the image size."""
    where = f"settings.{setting.name}.teacher.tokenizer"
    spec = dict(setting.teacher.tokenizer)
    if setting.family == "llamagen":
        config = _construct(VQConfig, spec, where)
        if setting.image_size % config.downsample:
            raise StageError(f"{where}: image_size {setting.image_size} is not divisible by the VQ downsampling "
                             f"{config.downsample} (2^(len(encoder_ch_mult)-1))")
        return _jsonable(dataclasses.asdict(config))
    defaults = {name: p.default for name, p in inspect.signature(VQVAE).parameters.items()}
    unknown = sorted(set(spec) - set(defaults))
    if unknown:
        raise StageError(f"{where}: unknown key '{unknown[0]}' for VQVAE (allowed: {', '.join(defaults)})")
    kwargs = _jsonable({**defaults, **spec})
    side = kwargs["patch_nums"][-1] * 2 ** (len(kwargs["ch_mult"]) - 1)
    if side != setting.image_size:
        raise StageError(f"{where}: patch_nums[-1] * 2^(len(ch_mult)-1) = {side} must equal image_size "
                         f"{setting.image_size}")
    return kwargs


def teacher_kwargs(setting: Setting, tokenizer: dict) -> dict:
    """The full constructor config of the AR teacher: the setting's model block plus what the tokenizer
    and the setting fix (vocabulary, latent width, scales or grid, number of classes)."""
    where = f"settings.{setting.name}.teacher.model"
    spec = dict(setting.teacher.model)
    if spec.get("num_classes", setting.num_classes) != setting.num_classes:
        raise StageError(f"{where}: num_classes {spec['num_classes']} differs from the setting's "
                         f"num_classes {setting.num_classes}")
    spec["num_classes"] = setting.num_classes
    if setting.family == "llamagen":
        grid = setting.image_size // 2 ** (len(tokenizer["encoder_ch_mult"]) - 1)
        if spec.get("block_size", grid * grid) != grid * grid:
            raise StageError(f"{where}: block_size {spec['block_size']} must be the tokenizer's "
                             f"{grid}x{grid} = {grid * grid} tokens")
        spec.update(block_size=grid * grid, vocab_size=tokenizer["codebook_size"])
        return _jsonable(dataclasses.asdict(_construct(GPTConfig, spec, where)))
    if "depth" not in spec:
        raise StageError(f"{where}: needs 'depth' (VAR's width, heads and drop-path follow from it)")
    fixed = dict(vocab_size=tokenizer["vocab_size"], latent_channels=tokenizer["z_channels"],
                 patch_nums=tuple(tokenizer["patch_nums"]))
    clash = sorted(set(spec) & set(fixed))
    if clash:
        raise StageError(f"{where}: '{clash[0]}' comes from the tokenizer block; remove it here")
    allowed = {f.name for f in dataclasses.fields(VARConfig)}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise StageError(f"{where}: unknown key '{unknown[0]}' for VARConfig (allowed: {', '.join(sorted(allowed))})")
    try:
        config = var_config_for_depth(**spec, **fixed)
    except (TypeError, ValueError) as err:
        raise StageError(f"{where}: VARConfig rejects {spec}: {err}") from None
    return _jsonable(dataclasses.asdict(config))


def build_models(family: str, tokenizer: dict, model: dict):
    """Fresh (tokenizer, AR teacher) from the constructor kwargs stored in teacher.json."""
    if family == "llamagen":
        return VQModel(VQConfig(**tokenizer)), LlamaGenGPT(GPTConfig(**model))
    if family == "var":
        return VQVAE(**tokenizer), VAR(VARConfig(**model))
    raise StageError(f"unknown family {family!r}; expected 'var' or 'llamagen'")


def _expand_preset(block: dict, presets: dict, where: str) -> dict:
    """A LlamaGen block {preset: NAME, **overrides} -> the preset's full config fields with the overrides."""
    block = dict(block)
    if "preset" not in block:
        return block
    name = block.pop("preset")
    if name not in presets:
        raise StageError(f"{where}.preset: unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    return {**dataclasses.asdict(presets[name]), **block}


def setting_model_kwargs(setting: Setting) -> tuple[dict, dict]:
    """The full constructor kwargs (tokenizer, AR model) of a setting's teacher block, presets expanded
    and checked against the image size and each other (the same derivation the toy teacher stores)."""
    t = setting.teacher
    where = f"settings.{setting.name}.teacher"
    if setting.family == "llamagen":
        t = dataclasses.replace(t, tokenizer=_expand_preset(t.tokenizer, VQ_CONFIGS, f"{where}.tokenizer"),
                                model=_expand_preset(t.model, GPT_CONFIGS, f"{where}.model"))
    expanded = dataclasses.replace(setting, teacher=t)
    tokenizer = tokenizer_kwargs(expanded)
    return tokenizer, teacher_kwargs(expanded, tokenizer)
