"""From a GAN image to the 112x112 ArcFace crop, differentiably, by a fixed similarity transform.

Aligned generators (StyleGAN2 on FFHQ, the DigiFace DCGAN) draw every face at the same place, so one
similarity transform, estimated from a few reference points (fractions of the generated image side)
onto their ArcFace positions (112 px), crops every image. The defaults are the facts of the data:
FFHQ's alignment puts the eye centres at (380, 480) and (650, 480) of 1024 px, which idiap's
face_synthetics maps onto the ArcFace eyes for its IResNet crop.

:class:`GanCrop` gives the same transform twice: as five landmarks in generated-image pixels (the
ArcFace template mapped back), so the faces stage's 5-point alignment reproduces it; and as a
``grid_sample`` warp of a ``[N, 3, R, R]`` tensor, so identity forces flow from an embedder back to
the latent. ``kind: detector`` leaves landmarks to the faces stage's detector instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facegen.faces.align import ARCFACE_TEMPLATE, estimate_similarity
from facegen.schema import ALIGNED_SIZE

def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


class GanCrop:
    """The fixed crop of one generator: landmarks for the faces stage and a differentiable warp."""

    def __init__(self, src_points, dst_points, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        src = np.asarray(src_points, np.float64) * self.image_size
        self.matrix = estimate_similarity(src, np.asarray(dst_points, np.float64))
        inverse = np.linalg.inv(_homogeneous(self.matrix))
        template = np.hstack([ARCFACE_TEMPLATE.astype(np.float64), np.ones((5, 1))])
        self._landmarks = (template @ inverse.T)[:, :2].astype(np.float32).reshape(-1)
        self._theta = self.theta(self.matrix)

    @classmethod
    def from_settings(cls, settings, image_size: int) -> "GanCrop":
        """From a crop settings section (``src_points``, ``dst_points``)."""
        return cls(settings.src_points, settings.dst_points, image_size)

    def theta(self, matrix: np.ndarray) -> torch.Tensor:
        """The ``affine_grid`` matrix (output -> input, normalised coordinates) of a pixel transform."""
        inverse = np.linalg.inv(_homogeneous(np.asarray(matrix, np.float64)))
        out_to_pixels = np.array([[ALIGNED_SIZE / 2, 0, (ALIGNED_SIZE - 1) / 2], [0, ALIGNED_SIZE / 2, (ALIGNED_SIZE - 1) / 2], [0, 0, 1]])
        n = self.image_size
        pixels_to_in = np.array([[2 / n, 0, 1 / n - 1], [0, 2 / n, 1 / n - 1], [0, 0, 1]])
        return torch.tensor((pixels_to_in @ inverse @ out_to_pixels)[:2], dtype=torch.float32)

    def matrices_from_landmarks(self, landmarks: list[np.ndarray | None]) -> np.ndarray:
        """Per-image transforms from detected 5-point landmarks (the fixed crop where none was found)."""
        return np.stack([self.matrix if lm is None else estimate_similarity(np.asarray(lm).reshape(5, 2), ARCFACE_TEMPLATE)
                         for lm in landmarks])

    def landmarks(self) -> np.ndarray:
        """The five ArcFace landmarks (x0, y0, .., x4, y4) in generated-image pixels."""
        return self._landmarks.copy()

    def warp(self, images: torch.Tensor, matrices: np.ndarray | None = None) -> torch.Tensor:
        """``[N, C, R, R]`` in [-1, 1] -> ``[N, C, 112, 112]`` crops, bilinear, black outside the image.

        ``matrices`` (``[N, 2, 3]`` pixel transforms, e.g. from a detector) replace the fixed crop.
        """
        if images.ndim != 4 or images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(f"crop: expected images [N, C, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        n, c = images.shape[:2]
        if matrices is None:
            theta = self._theta.expand(n, 2, 3)
        else:
            theta = torch.stack([self.theta(m) for m in matrices])
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, [n, c, ALIGNED_SIZE, ALIGNED_SIZE], align_corners=False)
        # Sample (x + 1) so the zero padding of grid_sample is black (-1), as cv2.warpAffine's border is.
        return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, R, R]`` in [-1, 1] -> uint8 ``[N, R, R, 3]`` RGB (NVIDIA's ``x * 127.5 + 128`` rounding)."""
    pixels = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
