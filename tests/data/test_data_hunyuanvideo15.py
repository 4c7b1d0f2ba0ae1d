"""HunyuanVideo 1.5's real-data encoders on tiny random components saved to local folders
(a Qwen2.5-VL text model with a word tokenizer and a chat template, ByT5, the 16x VAE), loaded
through the real loaders: equal to ``HunyuanVideo15Pipeline.encode_prompt`` and the pipeline's
latent scaling, and a preprocess + distillation run of ``hunyuanvideo15_tiny`` on them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stafinetune.data import DataConfig, build_text_encoder, build_video_encoder, prepare_data
from stafinetune.data.cache import LatentCache
from stafinetune.data.loader import CachedLatents, OnTheFlyLatents, collate
from stafinetune.data.real_encoders import HUNYUANVIDEO15_SYSTEM
from stafinetune.data.sources import build_source, synthetic_dir

WORDS = "a red blue circle square moving left right sign open shop on background".split()
SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's chat template, reduced to what the pipeline's system + user conversation uses
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_LEN, TEXT_2_LEN = 12, 24
CAPTIONS = ['a red circle moving left on a sign "OPEN"', "a blue square", 'a shop "Shop" sign']


def save_components(root: Path) -> dict[str, str]:
    """Tiny HunyuanVideo 1.5 encoders in ``root`` (widths of ``hunyuanvideo15_tiny``: text 32,
    glyph 24, latents 16); returns the ``data.*`` path overrides."""
    from diffusers import AutoencoderKLHunyuanVideo15
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        ByT5Tokenizer,
        PreTrainedTokenizerFast,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        T5Config,
        T5EncoderModel,
    )

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    qwen_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                       unk_token="<unk>", eos_token="<|im_end|>")  # fmt: skip
    qwen_tok.chat_template = CHAT_TEMPLATE
    qwen_tok.save_pretrained(root / "tokenizer")
    ByT5Tokenizer().save_pretrained(root / "tokenizer_2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=3,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
        )).save_pretrained(root / "text_encoder")  # fmt: skip
        T5EncoderModel(T5Config(vocab_size=384, d_model=24, d_kv=6, d_ff=48, num_layers=2,
                                num_heads=4)).save_pretrained(root / "text_encoder_2")  # fmt: skip
        AutoencoderKLHunyuanVideo15(latent_channels=16, block_out_channels=(8, 8, 8, 8, 32),
                                    layers_per_block=1, scaling_factor=0.75,
                                    ).save_pretrained(root / "vae")  # fmt: skip
    return {name: str(root / name) for name in
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")}  # fmt: skip


def data_overrides(paths: dict[str, str]) -> dict[str, Any]:
    """The ``data`` fields of the HunyuanVideo 1.5 encoders at ``paths``."""
    return {
        "video_encoder": "hunyuanvideo15", "video_encoder_path": paths["vae"],
        "text_encoder": "hunyuanvideo15", "text_encoder_path": paths["text_encoder"],
        "tokenizer_path": paths["tokenizer"], "text_encoder_2_path": paths["text_encoder_2"],
        "tokenizer_2_path": paths["tokenizer_2"], "text_len": TEXT_LEN, "text_2_len": TEXT_2_LEN,
    }  # fmt: skip


@pytest.fixture(scope="module")
def components(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return save_components(tmp_path_factory.mktemp("hv15_components"))


def test_text_and_glyph_states_equal_the_pipeline(components: dict[str, str]) -> None:
    """Qwen2.5-VL states and masks equal ``encode_prompt``'s over the valid tokens (template
    cropped right before the caption), and ByT5's glyph stream exactly its quoted text's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    enc = build_text_encoder(DataConfig(**data_overrides(components)))
    text, mask, pooled = enc.encode(CAPTIONS)
    text_2, mask_2 = enc.encode_glyph(CAPTIONS)
    assert (text.shape, text_2.shape) == ((3, TEXT_LEN, 32), (3, TEXT_2_LEN, 24))
    # the crop ends where the caption starts: its first word is the first kept token
    ids = enc.tokenizer.apply_chat_template(
        [[{"role": "system", "content": HUNYUANVIDEO15_SYSTEM}, {"role": "user", "content": "red"}]],
        add_generation_prompt=True, tokenize=True, return_dict=True,
    )["input_ids"][0]  # fmt: skip
    assert ids[enc.crop_start] == enc.tokenizer.convert_tokens_to_ids("red")

    pipe = HunyuanVideo15Pipeline(
        text_encoder=enc.qwen, tokenizer=enc.tokenizer, transformer=None,
        vae=build_video_encoder(DataConfig(**data_overrides(components))).vae,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=enc.byt5,
        tokenizer_2=enc.tokenizer_2, guider=ClassifierFreeGuidance(),
    )  # fmt: skip
    assert pipe.system_message == HUNYUANVIDEO15_SYSTEM
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = TEXT_LEN, TEXT_2_LEN
    pipe.prompt_template_encode_start_idx = enc.crop_start
    ref, ref_mask, ref_2, ref_mask_2 = pipe.encode_prompt(
        CAPTIONS, device=torch.device("cpu"), dtype=torch.float32, batch_size=3
    )
    assert torch.equal(mask, ref_mask.bool()) and torch.equal(mask_2, ref_mask_2.bool())
    assert mask.sum(1).tolist()[1] > 0 and mask_2.sum(1).tolist()[1] == 0  # no quotes: no glyph
    torch.testing.assert_close(text[mask], ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_2[mask_2], ref_2[mask_2], rtol=1e-5, atol=1e-5)
    assert (text[~mask] == 0).all() and (text_2[~mask_2] == 0).all()
    torch.testing.assert_close(pooled[0], text[0, mask[0]].mean(0))


def test_vae_latents_are_the_pipelines_16x_scaled_latents(components: dict[str, str]) -> None:
    """Latents are the VAE mode times ``scaling_factor`` on the 16x / 4x grid (as the i2v
    pipeline encodes), and ``decode`` divides it back out (as the pipelines decode)."""
    from diffusers import AutoencoderKLHunyuanVideo15

    enc = build_video_encoder(DataConfig(**data_overrides(components)))
    vae = AutoencoderKLHunyuanVideo15.from_pretrained(components["vae"]).eval()
    assert (enc.latent_channels, enc.temporal_compression, enc.spatial_compression) == (16, 4, 16)
    video = torch.rand(2, 3, 5, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = enc.encode(video)
    assert z.shape == (2, 16, 2, 2, 3)
    with torch.no_grad():
        ref = torch.cat([vae.encode(v[None]).latent_dist.mode() for v in video]) * 0.75
        torch.testing.assert_close(z, ref)
        torch.testing.assert_close(enc.decode(z[1:]), vae.decode(ref[1:] / 0.75).sample)
    cfg = DataConfig(**data_overrides(components), num_frames=9, height=64, width=96)
    assert cfg.latent_grids() == [(3, 4, 6)]
    with pytest.raises(ValueError, match="data.buckets.*multiple of 16"):
        DataConfig(**data_overrides(components), height=72)


def test_glyph_encoder_needs_its_folder() -> None:
    with pytest.raises(ValueError, match="data.text_encoder_2_path"):
        DataConfig(text_encoder="hunyuanvideo15", text_encoder_path="/m/te")


def quoted_manifest(root: Path, data: DataConfig) -> Path:
    """A manifest of the synthetic clips of ``data`` with their captions, every other one
    with a quoted sign text (a glyph stream)."""
    build_source(data)  # writes the clips
    lines = (synthetic_dir(data) / "manifest.jsonl").read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        record = json.loads(line)
        record["path"] = str(synthetic_dir(data) / record["path"])
        if i % 2 == 0:
            record["caption"] += ' under a sign "OPEN"'
        records.append(json.dumps(record))
    manifest = root / "clips.jsonl"
    manifest.write_text("\n".join(records) + "\n")
    return manifest


def test_preprocess_and_distill_hunyuanvideo15_tiny(
    components: dict[str, str], tmp_path: Path
) -> None:
    """Preprocess clips with the HunyuanVideo 1.5 encoders, then distil ``hunyuanvideo15_tiny``
    on them: the cache holds each caption's glyph states, batches carry them to the model
    (they change exactly the rows with quoted text) and training and validation sampling run."""
    from stafinetune.config import compose_job_config
    from stafinetune.training.distill import model_inputs
    from stafinetune.training.trainer import Trainer

    synthetic = DataConfig(root=str(tmp_path / "data"), num_clips=4)
    manifest = quoted_manifest(tmp_path, synthetic)
    overrides = {**data_overrides(components), "source": "folder", "manifest": str(manifest),
                 "root": str(tmp_path / "data"), "num_frames": 5, "decode_workers": 0}  # fmt: skip
    cache_dir = prepare_data(DataConfig(**overrides), verbose=False)
    cache = LatentCache(cache_dir)
    enc = build_text_encoder(DataConfig(**overrides))
    assert cache.info["text_2_len"] == TEXT_2_LEN and cache.info["text_2_dim"] == 24
    for i in range(len(cache)):
        sample = cache[i]
        assert sample.latents.shape == (16, 2, 8, 8)
        text_2, mask_2 = enc.encode_glyph([sample.caption])
        assert ('"OPEN"' in sample.caption) == bool(mask_2.any())
        torch.testing.assert_close(sample.text_2, text_2[0, mask_2[0]])
    # the loader encoding on the fly (data.use_cache=false) gives the cached sample
    records = DataConfig(**overrides, use_cache=False)
    info = json.loads((prepare_data(records, verbose=False) / "cache.json").read_text())
    live, cached = OnTheFlyLatents(records, info)[0], CachedLatents(cache_dir, TEXT_LEN)[0]
    for key in ("latents", "text", "text_2", "text_2_mask"):
        torch.testing.assert_close(live[key], cached[key], atol=1e-6, rtol=1e-5)

    job = compose_job_config([
        "model=hunyuanvideo15_tiny", "distill.allow_random_teacher=true", "logging=none",
        "logging.progress=false", "train.device=cpu", "train.steps=2", "train.batch_size=2",
        "train.val_every=2", "train.sample_steps=2", "train.export=false", "data.num_workers=0",
        *(f"data.{k}={v}" for k, v in overrides.items()),
    ])  # fmt: skip
    trainer = Trainer(job, tmp_path / "run")
    samples = CachedLatents(cache_dir, TEXT_LEN)
    batch = collate([samples[0], samples[1]])  # clip 0 with quoted text, clip 1 without
    assert batch["text_2"].shape == (2, TEXT_2_LEN, 24)
    quoted = batch["text_2_mask"].any(dim=1)  # (B,)
    assert quoted.tolist() == [True, False]
    sigma = torch.full((2,), 0.5)
    inputs = model_inputs(batch, batch["latents"], sigma, torch.device("cpu"))
    with torch.no_grad():
        out = trainer.student(**inputs)
        plain = trainer.student(**{k: v for k, v in inputs.items() if k != "condition"})
    changed = (out - plain).flatten(1).abs().amax(dim=1) > 1e-6  # (B,)
    assert changed.tolist() == quoted.tolist()
    result = trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in result.val_history[-1].values())


def test_guided_sampling_gives_each_forward_its_prompts_glyph_stream(
    components: dict[str, str],
) -> None:
    """``generate`` with guidance equals the guided Euler loop written out by hand, where the
    conditional forward takes its prompt's glyph stream and the negative forward the negative
    prompt's own."""
    from stafinetune.diffusion.sampling import Schedule
    from stafinetune.inference.generate import generate, prompt_noise
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    enc = build_text_encoder(DataConfig(**data_overrides(components)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = build_model(ModelConfig(flavor="hunyuanvideo15_tiny"), AttentionConfig(mode="full"))
    dit.eval()
    schedule, scale, shape, negative = Schedule.flow(2), 4.0, (16, 2, 4, 4), 'a sign "NO"'
    videos = generate(dit, CAPTIONS[:2], enc, latent_shape=shape, seed=5, schedule=schedule,
                      guidance_scale=scale, negative_prompt=negative, warmup=False,
                      progress=False)  # fmt: skip
    text, mask, pooled = enc.encode(CAPTIONS[:2])
    text_2, mask_2 = enc.encode_glyph(CAPTIONS[:2])
    neg_text, neg_mask, neg_pooled = enc.encode([negative])
    neg_text_2, neg_mask_2 = enc.encode_glyph([negative])
    assert bool(mask_2[0].any()) and not bool(mask_2[1].any()) and bool(neg_mask_2.any())
    sigmas = schedule.levels(torch.device("cpu"))
    for k, video in enumerate(videos):
        x = prompt_noise(shape, 5 + k)  # (1, C, T, H, W)
        for i in range(schedule.steps):
            timestep = (sigmas[i] * 1000.0).expand(1)
            with torch.no_grad():
                cond = dit(x, timestep, text[k : k + 1], mask[k : k + 1], pooled[k : k + 1],
                           step_index=i, condition={"text_2": text_2[k : k + 1],
                                                    "text_2_mask": mask_2[k : k + 1]})  # fmt: skip
                neg = dit(x, timestep, neg_text, neg_mask, neg_pooled, step_index=i,
                          condition={"text_2": neg_text_2, "text_2_mask": neg_mask_2})  # fmt: skip
            x = x + (sigmas[i + 1] - sigmas[i]) * (neg + scale * (cond - neg))
        torch.testing.assert_close(video.latents, x[0], atol=1e-5, rtol=1e-5)


def test_a_glyph_stream_the_model_cannot_take_is_named() -> None:
    """Start-up names ``data.text_encoder`` when a model has no glyph stream and
    ``data.text_encoder_2_path`` when the glyph width does not fit."""
    from stafinetune.build import check_glyph_fits_model
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    data = DataConfig(text_encoder="hunyuanvideo15", text_encoder_path="/m/te",
                      text_encoder_2_path="/m/byt5")  # fmt: skip
    for flavor, width, field in (("wan_tiny", 24, "data.text_encoder="),
                                 ("hunyuanvideo15_tiny", 16, "data.text_encoder_2_path=")):  # fmt: skip
        model = ModelConfig(flavor=flavor)
        dit = build_model(model, AttentionConfig(mode="full"), device="meta")
        with pytest.raises(ValueError, match=field):
            check_glyph_fits_model(width, dit, data, model)
    check_glyph_fits_model(24, dit, data, model)  # ByT5 of the tiny flavor's width fits
    check_glyph_fits_model(None, dit, data, model)
