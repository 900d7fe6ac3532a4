"""dd.text_encoder: caption features in the official t2i layout from a T5 encoder, and the flan-t5-xl folder
artifact in dd.hub. Offline: a tiny randomly initialised T5 encoder and a word-level tokenizer built here."""
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from dd import hub
from dd.errors import StageError
from dd.hub import HubError, fetch_folder
from dd.text_encoder import T5CaptionEncoder, left_pad_captions

WORDS = ["<pad>", "</s>", "<unk>", "a", "digit", "zero", "one", "seven", "thick", "thin", "slanted", "left",
         "right", "small", "large", "stroke", "in", "the", "centre"]
LENGTH = 12  # caption window (120 for flan-t5-xl)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace words -> ids, </s> appended, <pad> = 0: the shape of the T5 tokenizer's output."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_encoder(seed=0) -> T5CaptionEncoder:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5CaptionEncoder(T5EncoderModel(config), tiny_tokenizer(), max_length=LENGTH)


CAPTIONS = ["a thick digit seven", "a small thin digit one slanted left in the centre", "zero"]


def test_encode_gives_left_padded_features_and_mask():
    encoder = tiny_encoder()
    features, mask = encoder.encode(CAPTIONS)
    assert features.shape == (3, LENGTH, 16) and features.dtype == torch.float32
    lengths = [len(c.split()) + 1 for c in CAPTIONS]  # words + </s>
    assert mask.sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert mask[row, LENGTH - n:].all() and not mask[row, :LENGTH - n].any()  # real tokens at the end
        assert not features[row, :LENGTH - n].any()  # padding is zero
        assert features[row, LENGTH - n:].abs().sum(-1).gt(0).all()
    # the real tokens are the encoder's right-padded output moved to the end of the window
    ids, right_mask = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        raw = encoder.encoder(input_ids=ids, attention_mask=right_mask).last_hidden_state
    for row, n in enumerate(lengths):
        torch.testing.assert_close(features[row, LENGTH - n:], raw[row, :n])


def test_a_caption_does_not_depend_on_its_batch():
    """The attention mask keeps padding out of the real tokens: alone or among longer captions, same features."""
    encoder = tiny_encoder()
    together, _ = encoder.encode(CAPTIONS)
    alone, _ = encoder.encode(CAPTIONS[2:])
    torch.testing.assert_close(together[2:], alone, atol=1e-6, rtol=1e-5)


def test_long_captions_are_truncated_to_the_window():
    encoder = tiny_encoder()
    features, mask = encoder.encode([" ".join(["digit"] * 40)])
    assert features.shape[1] == LENGTH and mask.all()


def test_left_pad_rejects_a_mask_that_is_not_right_padded():
    with pytest.raises(ValueError, match="right-padded"):
        left_pad_captions(torch.ones(1, 4, 2), torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="list of strings"):
        tiny_encoder().encode("one caption, not a list")


def test_from_folder_reads_a_saved_encoder_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = tiny_encoder(seed=3)
    encoder.encoder.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    loaded = T5CaptionEncoder.from_folder(tmp_path, max_length=LENGTH)
    expected, mask = encoder.encode(CAPTIONS)
    got, got_mask = loaded.encode(CAPTIONS)
    torch.testing.assert_close(got, expected)
    assert torch.equal(got_mask, mask)
    with pytest.raises(FileNotFoundError, match="fetch_folder"):
        T5CaptionEncoder.from_folder(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------ hub

def test_flan_t5_xl_is_a_folder_of_registered_files():
    members = hub.FOLDERS["flan-t5-xl"]
    assert {hub.ARTIFACTS[m].filename for m in members} >= {"config.json", "spiece.model", "tokenizer.json"}
    for m in members:
        art = hub.ARTIFACTS[m]
        assert art.repo_id == "google/flan-t5-xl" and art.kind == "text_encoder" and art.load_layout == "hf_folder"
    with pytest.raises(ValueError, match="fetch_folder"):
        hub.load_checkpoint(__file__, "hf_folder")


def test_offline_error_names_the_file_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubError) as info:
        fetch_folder("flan-t5-xl", tmp_path / "dest", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "https://huggingface.co/google/flan-t5-xl/resolve/main/config.json" in msg
    assert str(tmp_path / "dest" / "flan-t5-xl" / "config.json") in msg
    with pytest.raises(HubError, match="unknown folder artifact 'flan-t5-xxl'"):
        fetch_folder("flan-t5-xxl", tmp_path)


def test_hand_placed_folder_is_verified_and_used_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "flan-t5-xl"
    folder.mkdir()
    for member in hub.FOLDERS["flan-t5-xl"]:
        (folder / hub.ARTIFACTS[member].filename).write_bytes(member.encode())
    assert fetch_folder("flan-t5-xl", tmp_path) == folder
    assert all(hub.sidecar_path(folder / hub.ARTIFACTS[m].filename).is_file() for m in hub.FOLDERS["flan-t5-xl"])
    (folder / "spiece.model").write_bytes(b"changed after the first fetch")
    with pytest.raises(HubError, match="sha256 mismatch"):
        fetch_folder("flan-t5-xl", tmp_path)


# ------------------------------------------------------------------------------------------- cache

def test_caption_features_are_cached_in_shards_and_read_back(tmp_path):
    from dd.caption_features import CaptionFeatures, write_caption_features

    encoder = tiny_encoder()
    captions = CAPTIONS + ["a large digit zero", "one"]
    folder = write_caption_features(encoder, captions, tmp_path / "features", shard_size=2, batch_size=1,
                                    encoder_id={"name": "tiny", "seed": 0})
    assert sorted(p.name for p in folder.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    cache = CaptionFeatures(folder)
    assert len(cache) == 5 and cache.captions == captions
    expected, mask = encoder.encode(captions)
    features, got_mask = cache.rows([4, 0, 3])
    torch.testing.assert_close(features, expected[[4, 0, 3]], atol=1e-6, rtol=1e-5)
    assert torch.equal(got_mask.long(), mask[[4, 0, 3]].long())
    assert cache.rows([])[0].shape == (0, *expected.shape[1:])


def test_caption_features_verify_each_shard_when_first_read(tmp_path, monkeypatch):
    """The reader is lazy (the paper's 20k training prompts are ~20 GB of features): opening checks the folder,
    a shard is hashed the first time one of its rows is read, and a damaged shard is refused then."""
    from dd import hub
    from dd.caption_features import CaptionFeatures, write_caption_features

    captions = CAPTIONS + ["a large digit zero", "one"]
    folder = write_caption_features(tiny_encoder(), captions, tmp_path / "features", shard_size=2, batch_size=2)
    (folder / "shard-00001.safetensors").write_bytes(b"damaged")
    hashed = []
    real_sha = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda path: (hashed.append(Path(path).name), real_sha(path))[1])
    cache = CaptionFeatures(folder)
    assert hashed == []
    cache.rows([0, 1, 4])
    assert hashed == ["shard-00000.safetensors", "shard-00002.safetensors"]  # once each, shard 1 never read
    cache.rows([1, 0])
    assert len(hashed) == 2
    with pytest.raises(StageError, match="shard-00001.safetensors.*sha256"):
        cache.rows([2])
    (folder / "shard-00002.safetensors").unlink()
    with pytest.raises(StageError, match="shard-00002.safetensors: missing"):
        CaptionFeatures(folder)


def test_caption_features_resume_after_a_kill(tmp_path):
    from dd.caption_features import CaptionFeatures, write_caption_features

    encoder = tiny_encoder()
    calls = []
    real_encode = encoder.encode

    def dying_encode(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding the second shard
        return real_encode(rows)

    encoder.encode = dying_encode
    with pytest.raises(KeyboardInterrupt):
        write_caption_features(encoder, CAPTIONS, tmp_path / "features", shard_size=2, batch_size=2)
    assert not (tmp_path / "features").exists()  # nothing finished-looking
    calls.clear()
    encoder.encode = lambda rows: (calls.append(len(rows)), real_encode(rows))[1]
    write_caption_features(encoder, CAPTIONS, tmp_path / "features", shard_size=2, batch_size=2)
    assert calls == [1]  # only the unfinished shard (1 caption) was encoded again
    torch.testing.assert_close(CaptionFeatures(tmp_path / "features").rows([0, 1, 2])[0], real_encode(CAPTIONS)[0],
                               atol=1e-6, rtol=1e-5)
