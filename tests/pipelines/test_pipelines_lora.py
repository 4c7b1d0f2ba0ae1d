"""LoRA distillation (``train.trainable=lora``): adapter placement, exact resume, and an export
that diffusers' ``WanPipeline.load_lora_weights`` loads into the trained student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_testing import (
    FLAVORS,
    TILE,
    build_dit,
    conditioning,
    generate,
    hunyuan_pipeline,
    noise_of,
    plain_copy,
    transformer_inputs,
    wan_pipeline,
)
from safetensors.torch import load_file

from stafinetune import enable_sta, sta_step
from stafinetune.config import TrainConfig, compose_job_config
from stafinetune.diffusion.sampling import sample_latents
from stafinetune.models import VideoDiT
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.lora import (
    adapter_state_dict,
    apply_lora,
    lora_target_modules,
    save_lora_adapter,
)
from stafinetune.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def _job(data_root: Path, *overrides: str):
    base = [
        f"data.root={data_root}",
        "data.num_clips=16",
        "data.num_workers=0",
        "logging=none",
        "logging.progress=false",
        "train.val_every=0",
        "train.warmup_steps=2",
        "train.device=cpu",
        "train.trainable=lora",
        "train.lora_rank=4",
    ]
    return compose_job_config([*base, *overrides])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lora_rank", 0, "train.lora_rank must be >= 1"),
        ("lora_alpha", 0.0, "train.lora_alpha must be > 0"),
        ("lora_targets", [], "train.lora_targets must be null"),
        ("lora_dropout", 1.0, r"train.lora_dropout must lie in \[0, 1\)"),
        ("lora_merge_export", True, "train.lora_merge_export=true needs train.trainable=lora"),
    ],
)
def test_lora_config_errors_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_default_targets_are_the_sta_projections() -> None:
    wan, hunyuan = build_dit("wan_tiny"), build_dit("hunyuan_tiny")
    assert lora_target_modules(wan) == [
        f"blocks.{i}.attn1.{p}" for i in (0, 1) for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]  # not the text cross-attention attn2
    assert lora_target_modules(hunyuan) == [
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
    ]  # fmt: skip
    assert lora_target_modules(wan, ["to_q", "ffn.net.2"]) == [
        "blocks.0.attn1.to_q", "blocks.0.attn2.to_q", "blocks.0.ffn.net.2",
        "blocks.1.attn1.to_q", "blocks.1.attn2.to_q", "blocks.1.ffn.net.2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"train.lora_targets=\['to_z'\] matches no linear"):
        lora_target_modules(wan, ["to_z"])


def test_adapter_starts_as_identity_and_is_all_that_trains() -> None:
    dit = build_dit("hunyuan_tiny", window=[3, 3, 3])
    x, t = torch.randn(1, 16, 5, 16, 16), torch.tensor([400.0])
    text, mask, pooled = (
        torch.randn(1, 8, 32),
        torch.ones(1, 8, dtype=torch.bool),
        torch.randn(1, 32),
    )
    with torch.no_grad():
        before = dit(x, t, text, mask, pooled)
    names = apply_lora(dit, rank=2, alpha=4.0)
    with torch.no_grad():
        assert torch.equal(dit(x, t, text, mask, pooled), before)
    trainable = [n for n, p in dit.named_parameters() if p.requires_grad]
    assert trainable == names and len(names) == 2 * 7
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    with pytest.raises(ValueError, match="export_lora"):
        dit.save_pretrained("unused")
    torch.rand(7)  # the adapter's initialisation depends on the seed, not on earlier draws
    again = build_dit("hunyuan_tiny", window=[3, 3, 3])
    apply_lora(again, rank=2, alpha=4.0)
    for name, value in adapter_state_dict(again).items():
        assert torch.equal(value, adapter_state_dict(dit)[name]), name


def _checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert not (path / "model.safetensors").exists()  # the frozen base is not written
    adapter, ema = (load_file(str(path / f"{n}.safetensors")) for n in ("adapter", "ema"))
    optimizer = ckpt.load_tree(path / "optimizer")["state"]
    moments = {f"opt.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()}
    return {**adapter, **{f"ema.{k}": v for k, v in ema.items()}, **moments}


def test_lora_resume_is_exact(data_root: Path, tmp_path: Path) -> None:
    """Adapter, its optimiser moments, EMA, RNG (LoRA dropout draws from it) and data position."""
    overrides = ("train.steps=6", "train.ckpt_every=0", "train.ema_decay=0.9",
                 "train.grad_accum=2", "train.lora_dropout=0.1", "train.export=false")  # fmt: skip
    straight = Trainer(_job(data_root, *overrides), tmp_path / "straight").fit()
    first = Trainer(_job(data_root, *overrides), tmp_path / "resumed").fit(until_step=3)
    assert first.step == 3
    second = Trainer(_job(data_root, *overrides), tmp_path / "resumed").fit()
    assert second.step == 6 and second.losses == straight.losses[3:]
    a, b = _checkpoint_state(tmp_path / "straight"), _checkpoint_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lora_export_loads_into_the_wan_pipeline(data_root: Path, tmp_path: Path) -> None:
    """Base pipeline + ``load_lora_weights(export)`` + the exported strategy = the student."""
    from diffusers import WanTransformer3DModel

    # step 0 dense, step 1 sparse: enable_sta takes dense_first_steps from the export's strategy
    job = _job(data_root, "train.steps=3", "train.lr=1e-2", "train.lora_merge_export=true",
               "train.sample_steps=0", "attention.dense_first_steps=1")  # fmt: skip
    trainer = Trainer(job, tmp_path)
    base = {k: v.clone() for k, v in trainer.student.state_dict().items() if "lora_" not in k}
    result = trainer.fit()
    student, teacher = trainer.student.eval(), trainer.teacher
    assert not any("lora" in n for n, _ in teacher.named_parameters())  # teacher: base weights
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in base.items())  # base frozen
    assert max(float(p.abs().max()) for n, p in adapter_state_dict(student).items() if "lora_B" in n) > 0  # fmt: skip
    export = result.export_dir
    assert (export / "pytorch_lora_weights.safetensors").is_file()

    pipe = wan_pipeline(WanTransformer3DModel.from_pretrained(job.model.path), steps=2)
    pipe.load_lora_weights(export)
    enable_sta(pipe, strategy=export / "mask_strategy.json")
    assert student.attention_cfg.tile == TILE
    cond = conditioning(pipe)
    with torch.no_grad():
        expected = sample_latents(student, noise_of(2), cond["text"], cond["text_mask"], steps=2)
    torch.testing.assert_close(generate(pipe, 2, seed=2), expected, atol=1e-5, rtol=1e-5)

    merged = WanTransformer3DModel.from_pretrained(export / "transformer")
    enable_sta(merged, strategy=export / "mask_strategy.json")
    x, t = noise_of(4), torch.tensor([600.0])
    with torch.no_grad(), sta_step(merged, None):  # the training windows, as student(...) uses
        want = student(x, t, cond["text"], cond["text_mask"])
        got = merged(x, t, cond["text"], return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _random_adapter(dit: VideoDiT, path: Path) -> None:
    """Put a LoRA adapter (rank 2, alpha 6) with random weights on ``dit`` and save it to
    ``path`` in diffusers' format."""
    apply_lora(dit, rank=2, alpha=6.0)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_lora_adapter(dit, path)


def test_hunyuan_adapter_loads_into_the_hunyuan_pipeline(tmp_path: Path) -> None:
    """The export format also fits ``HunyuanVideoPipeline.load_lora_weights`` (alpha != rank)."""
    dit = build_dit("hunyuan_tiny", window=[3, 3, 3])
    base = plain_copy(dit)
    _random_adapter(dit, tmp_path)
    pipe = hunyuan_pipeline(base)
    pipe.load_lora_weights(tmp_path)
    enable_sta(pipe, tile=TILE, window=[3, 3, 3])
    x, t = noise_of(0), torch.tensor([300.0])
    text, pooled = torch.randn(1, 8, 32), torch.randn(1, 32)
    mask = torch.arange(8)[None] < 5
    guidance = torch.tensor([6000.0])
    with torch.no_grad():
        want = dit(x, t, text, mask, pooled)
        got = pipe.transformer(x, t, text, mask, pooled, guidance, return_dict=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_hunyuanvideo15_adapter_loads_into_its_transformer(tmp_path: Path) -> None:
    """HunyuanVideo15Pipeline has no LoRA loader (diffusers 0.42): the export loads with
    ``transformer.load_lora_adapter(path, prefix="transformer", use_safetensors=True)`` into
    the trained student."""
    from diffusers import HunyuanVideo15Transformer3DModel

    dit = build_dit("hunyuanvideo15_tiny", window=[3, 3, 3])
    base = HunyuanVideo15Transformer3DModel(**dict(dit.transformer.config))
    base.load_state_dict(dit.transformer.state_dict())
    _random_adapter(dit, tmp_path)
    base.load_lora_adapter(str(tmp_path), prefix="transformer", use_safetensors=True)
    enable_sta(base.eval(), tile=TILE, window=[3, 3, 3])
    x, t, text = noise_of(0), torch.tensor([300.0]), torch.randn(1, 8, 32)
    mask = torch.arange(8)[None] < 5
    streams = {  # text-to-video: empty glyph and image streams
        "encoder_hidden_states_2": torch.zeros(1, 0, 24),
        "encoder_attention_mask_2": torch.zeros(1, 0, dtype=torch.bool),
        "image_embeds": torch.zeros(1, 0, 20),
    }
    hidden = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], dim=1)
    with torch.no_grad():
        want = dit(x, t, text, mask)
        got = base(hidden, t, text, mask, return_dict=False, **streams)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the trained adapter is in


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_lora_loads_into_a_pipeline_that_runs_sta(family: str, tmp_path: Path) -> None:
    """``load_lora_weights`` after ``enable_sta``: the adapter reaches the STA layers (the
    student's output), ``unload_lora_weights`` takes it off again, STA stays on."""
    dit = build_dit(FLAVORS[family], window=[3, 3, 3])
    base = plain_copy(dit)
    _random_adapter(dit, tmp_path)
    pipe = (wan_pipeline if family == "wan" else hunyuan_pipeline)(base)
    enable_sta(pipe, tile=TILE, window=[3, 3, 3])
    inputs = transformer_inputs(family)
    with torch.no_grad():
        without = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(tmp_path)
        got = pipe.transformer(**inputs)[0]
        pooled = inputs.get("pooled_projections")
        mask = inputs.get("encoder_attention_mask", torch.ones(1, 8, dtype=torch.bool))
        want = dit(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                   mask, pooled)  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - without).abs().max() > 1e-3
        pipe.unload_lora_weights()
        assert torch.equal(pipe.transformer(**inputs)[0], without)
