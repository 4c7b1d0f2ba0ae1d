"""Diffusion maths shared by training and inference.

``flow_matching`` (noising, velocity targets, timestep sampling), ``sampling`` (the flow
Euler sampler with per-step windows, classifier-free guidance) and ``losses`` (the
distillation loss terms).
"""
