"""Inference: sampling videos from a model, a checkpoint or an export.

``generate`` (prompts to videos with guidance, timed), ``weights`` (where the sampled weights
and windows come from), ``compare`` (several models on one prompt set, scored) and
``pipelines`` (``enable_sta`` / ``disable_sta`` for diffusers pipelines).
"""
