"""Device code of the triton backend, one module per kernel family with its launcher.

``triton_sta``: the Triton kernels (forward, dq, dk/dv, delta, dq cast), which run on any
GPU triton supports and on the CPU interpreter. ``gluon_fwd``, ``gluon_bwd``, ``gluon_fp8``:
warp-specialised Hopper kernels for the video blocks of calls in their scope, sharing
``gluon_common``. ``sta_kernels.ops`` decides which run for a call.

Importing these modules decorates their kernels, which fixes whether triton interprets
them (``TRITON_INTERPRET=1`` must be set before), so ``sta_kernels`` imports them only
when the triton backend is first used.
"""
