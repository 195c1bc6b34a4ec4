"""How close a GPU JPEG decoder's cache images must be to PIL's (tests/test_gpu_decode.py, tests/test_dali.py).

nvJPEG (torchvision's GPU decoder, DALI's mixed one) differs from libjpeg, PIL's decoder, in its
inverse DCT and in how it upsamples subsampled chroma: libjpeg smooths it ("fancy upsampling"),
nvJPEG does not. Simulated with libjpeg itself, fancy upsampling off, then the package's crop and
resize (``gpu_decode.crop_resize``), against PIL, on these tests' images, the bundled CelebA
samples and the synthetic CelebA sample:

- colour output: mean |diff| 0.26-0.54 grey levels with the accurate integer DCT, 0.98-1.22 with
  libjpeg's fast one; 99th percentile 1-5; the largest 4 (real faces) to 29-30 (hard-edged colour
  rectangles);
- one channel (a grayscale JPEG, or colour converted to L): mean 0.15-0.59, the largest 1-3.

A one-pixel shift of the crop gives a mean of 1.8-5.3 on the same images; the exact geometry is
checked on identical pixels elsewhere (``test_crop_resize_matches_pil_on_the_same_pixels``), and
the GPU tests compare against nvJPEG's own full-size output too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    mean: float  # mean |diff| below this
    p99: float  # 99th percentile of |diff| at most this
    max: int  # largest |diff| at most this


COLOUR = Tolerance(mean=1.5, p99=8, max=48)
LUMA = Tolerance(mean=1.0, p99=3, max=6)


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: Tolerance, what: str = "GPU - PIL") -> None:
    """``ours`` and ``ref`` uint8 arrays of one shape within ``tol``; the message gives all three figures."""
    assert ours.shape == ref.shape, f"shapes {ours.shape} and {ref.shape}"
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    figures = f"|{what}|: mean {diff.mean():.3f}, p99 {np.quantile(diff, 0.99):.1f}, max {diff.max()}"
    assert diff.mean() < tol.mean, figures
    assert np.quantile(diff, 0.99) <= tol.p99, figures
    assert diff.max() <= tol.max, figures
