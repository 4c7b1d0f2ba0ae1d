"""stafinetune: finetune and run video diffusion transformers with Sliding Tile Attention."""

__version__ = "0.1.0"
