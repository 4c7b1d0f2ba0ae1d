"""Real encoder wrappers, exercised on tiny randomly initialised models saved to local folders
(the real weights are not available offline; the wrappers' loading, shapes, masking and latent
normalisation are what is tested)."""

from __future__ import annotations

import pytest
import torch

from stafinetune.data import DataConfig, build_text_encoder, build_video_encoder

WORDS = (
    "a red blue circle square moving left right up down at on background pixels per frame".split()
)


def save_word_tokenizer(path, extra_special=()):
    """A local WordLevel fast tokenizer (no download) that AutoTokenizer can load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", *extra_special]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)  # kept whole, like Llama-3's header tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.save_pretrained(path)
    return len(vocab)


def test_wan_vae_wrapper_normalises_with_config_stats(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.5, -0.5, 1.0, 0.0], latents_std=[2.0, 1.0, 0.5, 4.0])  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    cfg = DataConfig(video_encoder="wan", video_encoder_path=str(tmp_path / "vae"))
    enc = build_video_encoder(cfg)
    assert (enc.latent_channels, enc.temporal_compression, enc.spatial_compression) == (4, 4, 8)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (1, 4, 2, 2, 2) and z.dtype == torch.float32
    raw = vae.encode(video).latent_dist.mode()
    mean = torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([2.0, 1.0, 0.5, 4.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    out = enc.decode(z)
    torch.testing.assert_close(out, vae.decode(raw).sample)
    assert out.shape == (1, 3, 5, 16, 16)


def test_hunyuan_vae_wrapper_scales_latents(tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4, scaling_factor=0.5)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    enc = build_video_encoder(
        DataConfig(video_encoder="hunyuan", video_encoder_path=str(tmp_path / "vae"))
    )
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (1, 4, 2, 2, 2)
    torch.testing.assert_close(z, vae.encode(video).latent_dist.mode() * 0.5)


def test_umt5_wrapper_masks_and_pads(tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    vocab = save_word_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                        pad_token_id=0, eos_token_id=3)  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(tmp_path / "te")
    cfg = DataConfig(text_encoder="umt5", text_encoder_path=str(tmp_path / "te"),
                     tokenizer_path=str(tmp_path / "tok"), text_len=8)  # fmt: skip
    enc = build_text_encoder(cfg)
    text, mask, pooled = enc.encode(["a red circle moving left", "a blue square"])
    assert text.shape == (2, 8, 16) and mask.shape == (2, 8) and pooled.shape == (2, 16)
    assert mask.sum(1).tolist() == [5, 3]
    assert (text[~mask] == 0).all() and (text[mask].abs().sum(-1) > 0).all()
    torch.testing.assert_close(pooled[1], text[1, :3].mean(0))


def test_missing_local_folder_names_the_field(tmp_path):
    cfg = DataConfig(video_encoder="wan", video_encoder_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="data.video_encoder_path"):
        build_video_encoder(cfg)


def test_hunyuan_text_wrapper_crops_template_and_pools_with_clip(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    vocab = save_word_tokenizer(
        tmp_path / "tok", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    )
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
               ).save_pretrained(tmp_path / "llama")  # fmt: skip
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, eos_token_id=3)
                  ).save_pretrained(tmp_path / "clip")  # fmt: skip
    cfg = DataConfig(text_encoder="hunyuan", text_encoder_path=str(tmp_path / "llama"),
                     text_encoder_2_path=str(tmp_path / "clip"), tokenizer_path=str(tmp_path / "tok"),
                     tokenizer_2_path=str(tmp_path / "tok"), text_len=12)  # fmt: skip
    enc = build_text_encoder(cfg)
    text, mask, pooled = enc.encode(["a red circle moving left", "a blue square"])
    assert text.shape == (2, 12, 16) and pooled.shape == (2, 8)
    # The caption's words plus the template's closing "<|eot_id|>" survive the crop.
    assert mask.sum(1).tolist() == [5 + 1, 3 + 1]
    assert (text[~mask] == 0).all()
