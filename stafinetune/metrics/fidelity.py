"""Full-reference fidelity of a video to a reference video (e.g. STA student vs dense teacher).

Both videos are uint8 RGB ``(F, H, W, 3)`` of the same shape (a mismatch raises ValueError
naming both shapes). Frames are compared as decoded, in 0..255:

========== ======= =================================================================
metric     kind    formula
========== ======= =================================================================
psnr       exact   10 log10(255^2 / MSE), MSE pooled over all frames, pixels, channels
ssim       exact   mean over frames and RGB channels of Wang et al. 2004 SSIM
ms_ssim    exact*  Wang et al. 2003 MS-SSIM per frame, mean over frames
vmaf       exact** Netflix VMAF v0.6.1 (vmaf-torch), mean over frames, clipped to [0, 100]
latent_gap exact   mean((a - b)^2) over latents
========== ======= =================================================================

SSIM / MS-SSIM are our own implementation of the reference definition (Gaussian window 11,
sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over the windows wholly inside the frame, as Wang's
MATLAB code and skimage). torchmetrics 1.9 imports here without torchvision, but its SSIM also
averages reflect-padded border windows (values differ by ~1e-3 on small frames) and its full
2-D filtering is ~10x slower than OpenCV's separable one used here.

``*`` MS-SSIM uses the standard 5 scales and weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
when the short side is at least 176 px (torchmetrics' size rule, :func:`ms_ssim_scales`); on
smaller frames it uses the most scales that fit (128 px: 4, 64 px: 3) with the first weights
renormalised to sum to 1, a documented variant.
``**`` VMAF runs vmaf-torch, a PyTorch port of libvmaf's features (VIF, ADM, motion) with the
shipped vmaf_v0.6.1 SVM model, on the BT.601 limited-range luma recomputed from the decoded RGB
frames, so it can differ from libvmaf on the original YUV planes by rounding. When vmaf-torch is
not installed, :data:`VMAF_AVAILABLE` is False and :func:`fidelity_metrics` leaves ``vmaf`` out.

Identical videos give SSIM = MS-SSIM = 1 and PSNR = inf; reports (JSON) cap PSNR at
:data:`PSNR_CAP_DB` = 100 dB (an MSE below 255^2 * 1e-10).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from stafinetune.metrics.video_io import as_video

PSNR_CAP_DB = 100.0
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
VMAF_AVAILABLE = importlib.util.find_spec("vmaf_torch") is not None
_FRAME_BATCH = 8  # frames per SSIM call: bounds memory on long, large videos


def _pair(
    video: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    video = as_video(video, name="video")
    reference = as_video(reference, name="reference")
    if video.shape != reference.shape:
        raise ValueError(
            f"video and reference differ in shape: video {tuple(video.shape)} vs reference "
            f"{tuple(reference.shape)} (both (F, H, W, 3))"
        )
    return video, reference


def psnr(video: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """PSNR in dB (**exact**): ``10 log10(255^2 / mean((video - reference)^2))``; inf if identical.

    The MSE is pooled over all frames, pixels and channels of the ``(F, H, W, 3)`` clips.
    """
    video, reference = _pair(video, reference)
    mse = float((video.double() - reference.double()).pow(2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window() -> torch.Tensor:
    """The normalised 1-D Gaussian window ``(11,)`` (sigma 1.5), float64."""
    x = torch.arange(SSIM_KERNEL, dtype=torch.float64) - (SSIM_KERNEL - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``(N, C, H, W)``, valid region only: ``(N, C, H-10, W-10)``.

    OpenCV's ``sepFilter2D`` per image (all channels at once; several times faster than
    torch's CPU depthwise conv) in float64, so that ``E[x^2] - E[x]^2`` does not cancel to a
    small negative number on flat regions; the border it invents is cropped away.
    """
    r = (SSIM_KERNEL - 1) // 2
    kernel = window.numpy()
    images = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
    out = np.stack(
        [
            cv2.sepFilter2D(img, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT).reshape(
                img.shape
            )[r:-r, r:-r]
            for img in images
        ]
    )
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image mean SSIM and contrast-structure term of ``(N, C, H, W)`` in [0, 1]: ``(N,)`` each.

    Windows lie wholly inside the image (the valid region), as Wang's reference code and skimage.
    """
    if min(x.shape[-2:]) < SSIM_KERNEL:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_KERNEL} px, got {tuple(x.shape[-2:])}"
        )
    window = _gaussian_window()
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2  # K1, K2 at data range 1
    n = x.shape[0]
    mu_x, mu_y, xx, yy, xy = _blur(torch.cat([x, y, x * x, y * y, x * y]), window).split(n)
    # No clamping of the variances at 0: in float64 they err by ~1e-17, and unclamped,
    # identical images give var_x = var_y = cov bit for bit, hence SSIM exactly 1.
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def _per_frame(video: torch.Tensor, reference: torch.Tensor, fn) -> float:
    """Mean over frames of ``fn(x, y) -> (n,)`` on RGB frames scaled to [0, 1], in batches."""
    scores = []
    for i in range(0, video.shape[0], _FRAME_BATCH):
        x = video[i : i + _FRAME_BATCH].permute(0, 3, 1, 2).double() / 255.0  # (n, 3, H, W)
        y = reference[i : i + _FRAME_BATCH].permute(0, 3, 1, 2).double() / 255.0
        scores.append(fn(x, y))
    return float(torch.cat(scores).double().mean())


def ssim(video: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """SSIM (**exact**, Wang et al. 2004): mean over frames of the per-frame RGB SSIM.

    Per window ``SSIM = (2 mu_x mu_y + C1)(2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))``
    with Gaussian windows (11, sigma 1.5), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L`` the
    data range (frames scaled to [0, 1]), averaged over the windows inside the frame and over
    the three channels. Frames need H, W >= 11.
    """
    video, reference = _pair(video, reference)
    return _per_frame(video, reference, lambda x, y: _ssim_and_cs(x, y)[0])


def ms_ssim_scales(height: int, width: int) -> int:
    """Number of MS-SSIM scales used for ``height x width`` frames (5 from a 176-px short side).

    The most scales ``k <= 5`` with ``side >= 2^k`` and ``side // max(1, k - 1)^2 > 10``
    (torchmetrics' size rule for an 11-px window, kept so results stay comparable); at least 1.
    """
    side = min(height, width)
    for k in range(len(MS_SSIM_BETAS), 0, -1):
        if side >= 2**k and side // max(1, k - 1) ** 2 > SSIM_KERNEL - 1:
            return k
    return 1


def _ms_ssim_frames(x: torch.Tensor, y: torch.Tensor, betas: tuple[float, ...]) -> torch.Tensor:
    """MS-SSIM of ``(N, C, H, W)`` image pairs in [0, 1] -> ``(N,)``."""
    terms = []
    for scale in range(len(betas)):
        sim, cs = _ssim_and_cs(x, y)
        terms.append((sim if scale == len(betas) - 1 else cs).clamp(min=0.0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    weights = torch.tensor(betas, dtype=torch.float64).view(-1, 1)
    return torch.stack(terms).double().pow(weights).prod(0)


def ms_ssim(video: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """MS-SSIM (**exact** from a 176-px short side, see module doc): mean over frames.

    ``MS-SSIM = SSIM_k^{beta_k} * prod_{j<k} cs_j^{beta_j}`` over scales ``j = 1..k`` (each a
    2 x 2 average-pool of the previous; Wang et al. 2003), ``cs_j`` the mean contrast-structure
    term, ``beta`` the standard weights (renormalised when ``k = ms_ssim_scales(H, W) < 5``);
    negative terms are clamped at 0 (as torchmetrics' ``normalize="relu"``).
    """
    video, reference = _pair(video, reference)
    k = ms_ssim_scales(video.shape[1], video.shape[2])
    betas = tuple(b / sum(MS_SSIM_BETAS[:k]) for b in MS_SSIM_BETAS[:k])
    return _per_frame(video, reference, lambda x, y: _ms_ssim_frames(x, y, betas))


def rgb_to_luma(video: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(F, H, W, 3)`` -> BT.601 limited-range luma ``(F, 1, H, W)`` float in 16..235.

    ``Y = round(16 + (65.481 R + 128.553 G + 24.966 B) / 255)``, as an RGB -> yuv420p encode.
    """
    rgb = video.double()
    y = 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    return y.round().float().unsqueeze(1)


@functools.lru_cache(maxsize=1)
def _vmaf_model():
    from vmaf_torch import VMAF

    return VMAF(temporal_pooling=True, clip_score=True).eval()


def vmaf(video: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """VMAF v0.6.1 in [0, 100] (see module doc for how exact), mean over frames.

    ``video`` is the distorted clip, ``reference`` the reference (the order matters). Raises
    RuntimeError when vmaf-torch is not installed.
    """
    if not VMAF_AVAILABLE:
        raise RuntimeError("VMAF needs the vmaf-torch package (pip install vmaf-torch)")
    video, reference = _pair(video, reference)
    with torch.inference_mode():
        score = _vmaf_model()(rgb_to_luma(reference), rgb_to_luma(video))
    return float(score)


def latent_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error of two latent tensors of one shape (**exact**): ``mean((a - b)^2)``.

    Computed in float64; raises ValueError naming both shapes when they differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).pow(2).mean())


def fidelity_metrics(
    video: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    *,
    with_vmaf: bool = True,
) -> dict[str, float]:
    """``{"psnr", "ssim", "ms_ssim"[, "vmaf"]}`` of ``video`` against ``reference``.

    ``vmaf`` is included when ``with_vmaf`` and :data:`VMAF_AVAILABLE`. PSNR may be inf here;
    :func:`stafinetune.metrics.score_video` caps it for JSON.
    """
    video, reference = _pair(video, reference)
    out = {
        "psnr": psnr(video, reference),
        "ssim": ssim(video, reference),
        "ms_ssim": ms_ssim(video, reference),
    }
    if with_vmaf and VMAF_AVAILABLE:
        out["vmaf"] = vmaf(video, reference)
    return out
