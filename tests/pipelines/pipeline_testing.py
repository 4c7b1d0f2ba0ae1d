"""Real diffusers pipelines assembled from tiny, randomly initialised, local components.

Nothing is downloaded: the tokenizer is a WordLevel ``tokenizers`` model built here, the text
encoders, VAEs and transformers come from tiny random configs. The transformers are the
``wan_tiny`` / ``hunyuan_tiny`` flavors, so latents (16, 5, 16, 16) - 17 frames of 128 x 128 -
give the (5, 8, 8) token canvas of the model tests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, VideoDiT, build_model
from stafinetune.models.dit import cast_like_diffusers

FLAVORS = {"wan": "wan_tiny", "hunyuan": "hunyuan_tiny"}  # the tiny flavor of each family
WORDS = "a red blue green circle square moving left right up down slowly fast".split()
FRAMES, SIZE = 17, 128  # -> latents (16, 5, 16, 16) -> canvas (5, 8, 8)
TILE = [1, 2, 2]  # -> 5 x 4 x 4 tiles
FULL_WINDOW = [5, 4, 4]
CANDIDATES = [[5, 4, 4], [3, 3, 3], [1, 1, 1], [3, 1, 3], [5, 2, 2]]
TEXT_LEN = 12
PROMPT = "a red circle moving left slowly"
NEGATIVE = "blue square"


def word_tokenizer() -> Any:
    """A fast WordLevel tokenizer over ``WORDS`` (ids: pad 0, unk 1, bos 2, eos 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def build_dit(flavor: str, seed: int = 0, **attention: Any) -> VideoDiT:
    """A tiny ``VideoDiT`` with deterministic weights (reference backend, fp32)."""
    attention.setdefault("backend", "reference")
    torch.manual_seed(seed)
    return build_model(ModelConfig(flavor=flavor), AttentionConfig(**attention))


def plain_copy(dit: VideoDiT) -> nn.Module:
    """A fresh diffusers transformer (its own processors, no hooks) holding ``dit``'s weights."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if dit.family == "wan" else HunyuanVideoTransformer3DModel
    model = cls(**dict(dit.transformer.config))
    cast_like_diffusers(model, dit.dtype)
    model.load_state_dict(dit.transformer.state_dict())
    return model.eval()


def tiny_transformer(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A plain diffusers transformer of the family's tiny flavor (its own processors, no hooks)
    with deterministic random weights; ``overrides`` change config fields (``num_layers``)."""
    torch.manual_seed(seed)
    dit = build_model(ModelConfig(flavor=FLAVORS[family], config_overrides=overrides),
                      AttentionConfig(mode="full"))  # fmt: skip
    return plain_copy(dit)


def transformer_inputs(family: str, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one call of a tiny transformer, as its pipeline passes them:
    latents (1, 16, 5, 16, 16), a timestep, text (1, 8, 32); for HunyuanVideo also a text
    mask with 3 padding tokens, pooled text (1, 32) and the distilled guidance."""
    g = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = {
        "hidden_states": torch.randn(1, 16, 5, 16, 16, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "return_dict": False,
    }
    if family == "hunyuan":
        kwargs |= {
            "encoder_attention_mask": torch.arange(8)[None] < 5,
            "pooled_projections": torch.randn(1, 32, generator=g),
            "guidance": torch.tensor([6000.0]),
        }
    return kwargs


def scheduler(steps: int) -> Any:
    """Flow-matching Euler whose ``steps``-step schedule is ``flow_sigmas(steps)``: 1, ..., 1/steps, 0.

    diffusers' default ends at sigma 1/1000; ``shift_terminal=1/steps`` stretches it onto
    the uniform grid that ``stafinetune.diffusion.sampling`` integrates.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, shift_terminal=1.0 / steps)


def wan_pipeline(transformer: nn.Module, steps: int = 4, transformer_2: nn.Module | None = None,
                 boundary_ratio: float | None = None) -> Any:  # fmt: skip
    """A ``WanPipeline`` of tiny parts: UMT5 (d_model 32), AutoencoderKLWan, our tokenizer."""
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        config = UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                            eos_token_id=3)  # fmt: skip
        text_encoder = UMT5EncoderModel(config).eval()
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       transformer=transformer, scheduler=scheduler(steps),
                       transformer_2=transformer_2, boundary_ratio=boundary_ratio)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_pipeline(transformer: nn.Module, steps: int = 4) -> Any:
    """A ``HunyuanVideoPipeline`` of tiny parts: Llama and CLIP text encoders (width 32), a tiny
    AutoencoderKLHunyuanVideo and our tokenizer for both text encoders."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(321)
        llama = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                                       intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=4,
                                       pad_token_id=0)).eval()  # fmt: skip
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, max_position_embeddings=77,
                                            pad_token_id=0, bos_token_id=2,
                                            eos_token_id=3)).eval()  # fmt: skip
        vae = AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 8, 8, 8),
                                        layers_per_block=1, norm_num_groups=4).eval()  # fmt: skip
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer,
                                vae=vae, scheduler=scheduler(steps), text_encoder_2=clip,
                                tokenizer_2=word_tokenizer())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


HUNYUAN_TEMPLATE = {"template": "{}", "crop_start": 0}


def generate(pipe: Any, steps: int = 4, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """Latents (1, 16, 5, 16, 16) from ``pipe`` for ``PROMPT`` (guidance off unless given)."""
    from diffusers import HunyuanVideoPipeline

    extra: dict[str, Any] = {"max_sequence_length": TEXT_LEN}
    if isinstance(pipe, HunyuanVideoPipeline):
        extra |= {"prompt_template": HUNYUAN_TEMPLATE, "true_cfg_scale": 1.0}
    else:
        extra |= {"guidance_scale": 1.0}
    extra |= kwargs
    out = pipe(PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="latent",
               **extra)  # fmt: skip
    return out.frames


def noise_of(seed: int) -> torch.Tensor:
    """The initial latents the pipelines draw from ``Generator().manual_seed(seed)``."""
    return torch.randn((1, 16, 5, 16, 16), generator=torch.Generator().manual_seed(seed))


def conditioning(pipe: Any) -> dict[str, torch.Tensor | None]:
    """``PROMPT``'s text states as ``VideoDiT`` takes them (the pipeline's own encoders)."""
    from diffusers import HunyuanVideoPipeline

    with torch.no_grad():
        if isinstance(pipe, HunyuanVideoPipeline):
            text, pooled, mask = pipe.encode_prompt(
                PROMPT, prompt_template=HUNYUAN_TEMPLATE, max_sequence_length=TEXT_LEN
            )
            return {"text": text, "text_mask": mask.bool(), "pooled_text": pooled}
        text, _ = pipe.encode_prompt(
            PROMPT, do_classifier_free_guidance=False, max_sequence_length=TEXT_LEN
        )
    return {"text": text, "text_mask": text.abs().sum(-1) > 0, "pooled_text": None}


def step_strategy(steps: int, layers: int = 2, heads: int = 4, seed: int = 0) -> MaskStrategy:
    """Random per-step windows: every step differs from the others in some (layer, head)."""
    gen = torch.Generator().manual_seed(seed)
    cands = torch.tensor(CANDIDATES)
    picks = torch.randint(1, len(CANDIDATES), (steps, layers, heads), generator=gen)
    picks[:, 0, 0] = torch.arange(steps) % (len(CANDIDATES) - 1) + 1  # steps differ for sure
    return MaskStrategy.from_tensor(
        cands[picks], canvas=[5, 8, 8], tile=TILE, candidates=CANDIDATES
    )


class CallRecorder:
    """Records every call of a transformer (inputs and output) during a pipeline run."""

    def __init__(self, transformer: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = transformer.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls.append({**kwargs, "output": output[0].detach().clone()})

    def remove(self) -> None:
        self.handle.remove()


def student(flavor: str, strategy_path: Any, dense_first_steps: int = 0, seed: int = 0) -> VideoDiT:
    """The ``build_dit(flavor, seed)`` weights attending with the strategy file at ``strategy_path``."""
    return build_dit(
        flavor, seed, strategy_path=str(strategy_path), dense_first_steps=dense_first_steps
    )


def replay(dit: VideoDiT, call: dict[str, Any], step: int) -> torch.Tensor:
    """``dit`` on the inputs of a recorded diffusers transformer call, at denoising ``step``."""
    text = call["encoder_hidden_states"]
    if dit.family == "wan":  # the pipeline already zeroed the padding
        mask, pooled = torch.ones(text.shape[:2], dtype=torch.bool), None
    else:
        mask, pooled = call["encoder_attention_mask"].bool(), call["pooled_projections"]
    with torch.no_grad():
        return dit(call["hidden_states"], call["timestep"], text, mask, pooled, step_index=step)


def tiny_image_encoder(kind: str = "clip") -> tuple[Any, Any]:
    """A random vision model (width 32, 2 layers, 32 x 32 pixels in patches of 8) and its
    processor: ``CLIPVisionModel`` (17 tokens, with the class token) and ``CLIPImageProcessor``
    as ``WanImageToVideoPipeline`` takes them, or for ``kind="siglip"`` ``SiglipVisionModel``
    (16 tokens) and ``SiglipImageProcessor`` as ``HunyuanVideo15ImageToVideoPipeline`` does."""
    import transformers

    name = {"clip": "CLIP", "siglip": "Siglip"}[kind]
    config = getattr(transformers, f"{name}VisionConfig")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = getattr(transformers, f"{name}VisionModel")(config).eval()
    if kind == "siglip":
        return model, transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, processor


def wan_i2v_pipeline(transformer: nn.Module, steps: int = 4, transformer_2: nn.Module | None = None,
                     boundary_ratio: float | None = None) -> Any:  # fmt: skip
    """A ``WanImageToVideoPipeline`` of the ``wan_pipeline`` parts plus ``tiny_image_encoder``
    (none for a transformer without ``image_dim``, as Wan 2.2 I2V-A14B ships)."""
    from diffusers import WanImageToVideoPipeline

    parts = wan_pipeline(transformer, steps).components
    image_encoder, image_processor = (
        tiny_image_encoder() if transformer.config.image_dim is not None else (None, None)
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
        scheduler=parts["scheduler"], transformer=transformer, image_encoder=image_encoder,
        image_processor=image_processor, transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
