"""The official image preprocessing of each recipe, as deterministic "views" of one image.

A view function maps ``(PIL RGB image, image index)`` → ``[V, S, S, 3]`` float32 in [-1, 1]
(V views of side S), ready for a tokenizer. Everything runs on the host with PIL/numpy and
reproduces the official pipelines (``../shared/spec/data.md``):

* :class:`LlamaGenTenCrop` — ``extract_codes_c2i.py --ten-crop``: ADM ``center_crop_arr`` to
  ``int(S·crop_range)`` (BOX halvings while the short side ≥ 2·target, then BICUBIC so the short
  side equals the target, then the central square), then torchvision ``TenCrop(S)``: views 0-4 are
  the top-left, top-right, bottom-left, bottom-right and centre crops, views 5-9 the same five
  crops of the horizontally mirrored square. ``ToTensor`` + ``Normalize(0.5, 0.5)``.
* :class:`LlamaGenCenterFlip` — the same script without ``--ten-crop``: view 0 the ADM centre crop
  at S, view 1 its mirror image.
* :class:`VarRandomCrops` — VAR's training transform (``utils/data.py``): ``Resize(mid)`` with
  LANCZOS (short side → ``round(1.125·S)``, long side ``int(mid·long/short)``, unchanged if the
  short side already equals ``mid``), ``RandomCrop(S)``, (``RandomHorizontalFlip`` only when
  ``hflip``; off in every official recipe), ``ToTensor``, ``x + x − 1``. VAR draws a fresh crop
  every time an image is loaded; here the augmentation is fixed into ``num_views`` crops whose
  offsets (and flips) come from a counter-based generator keyed by ``(seed, image index, view)``,
  so a rerun (or a resumed job) writes the same tokens. With ``num_views = 1`` every image is seen
  with one random crop, which for the one-epoch CCA recipes is distributionally the official
  pipeline (data.md §4.2); more views give more crops to draw from per epoch.
"""

from __future__ import annotations

import io
import os
from typing import Protocol

import numpy as np
from PIL import Image


class Views(Protocol):
    num_views: int
    image_size: int

    def __call__(self, image: Image.Image, index: int) -> np.ndarray: ...

    def describe(self) -> dict: ...


def load_rgb(src: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """``pil_loader``: open a file path / encoded bytes and convert to RGB."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (bytes, bytearray)):
        with Image.open(io.BytesIO(src)) as im:
            return im.convert("RGB")
    with open(src, "rb") as f:
        with Image.open(f) as im:
            return im.convert("RGB")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM ``center_crop_arr`` → uint8 ``[size, size, 3]``."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def five_crop(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision ``five_crop`` order: tl, tr, bl, br, centre (centre offsets ``int(round(d/2))``)."""
    H, W = arr.shape[:2]
    if size > H or size > W:
        raise ValueError(f"Crop {size} is larger than the image {W}x{H}.")
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    return [arr[:size, :size], arr[:size, W - size:], arr[H - size:, :size],
            arr[H - size:, W - size:], arr[top:top + size, left:left + size]]


def ten_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``TenCrop(size)`` (horizontal flip) → ``[10, size, size, 3]`` uint8."""
    return np.stack(five_crop(arr, size) + five_crop(arr[:, ::-1], size))


def to_pm1_llamagen(u8: np.ndarray) -> np.ndarray:
    """``ToTensor`` then ``Normalize(0.5, 0.5)`` in float32: ``(x/255 − 0.5)/0.5``."""
    x = u8.astype(np.float32) / np.float32(255)
    return (x - np.float32(0.5)) / np.float32(0.5)


def to_pm1_var(u8: np.ndarray) -> np.ndarray:
    """``ToTensor`` then VAR's ``normalize_01_into_pm1``: ``x + x − 1`` in float32."""
    x = u8.astype(np.float32) / np.float32(255)
    return (x + x) - np.float32(1)


class LlamaGenTenCrop:
    """10 views: ten-crop of the ADM centre crop at ``int(image_size·crop_range)``."""

    num_views = 10

    def __init__(self, image_size: int, crop_range: float = 1.1):
        self.image_size, self.crop_range = int(image_size), float(crop_range)
        self.crop_size = int(self.image_size * self.crop_range)

    def __call__(self, image: Image.Image, index: int = 0) -> np.ndarray:
        return to_pm1_llamagen(ten_crop(center_crop_arr(image, self.crop_size), self.image_size))

    def describe(self) -> dict:
        return {"kind": "llamagen_ten_crop", "image_size": self.image_size,
                "crop_range": self.crop_range, "crop_size": self.crop_size,
                "views": "0-4: tl, tr, bl, br, centre of the ADM centre crop; 5-9: same of its mirror",
                "normalize": "(x/255-0.5)/0.5"}


class LlamaGenCenterFlip:
    """2 views: the ADM centre crop at ``image_size`` and its horizontal mirror."""

    num_views = 2

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, image: Image.Image, index: int = 0) -> np.ndarray:
        arr = center_crop_arr(image, self.image_size)
        return to_pm1_llamagen(np.stack([arr, arr[:, ::-1]]))

    def describe(self) -> dict:
        return {"kind": "llamagen_center_flip", "image_size": self.image_size,
                "views": "0: ADM centre crop; 1: its mirror", "normalize": "(x/255-0.5)/0.5"}


def torchvision_resize_short(image: Image.Image, size: int, resample=Image.LANCZOS) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image (short side → size, long ``int(size·l/s)``)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), resample=resample)


class VarRandomCrops:
    """``num_views`` fixed random crops of VAR's training transform (see module docstring)."""

    def __init__(self, image_size: int = 256, num_views: int = 1, seed: int = 0,
                 mid_reso: float = 1.125, hflip: bool = False):
        self.image_size, self.num_views, self.seed = int(image_size), int(num_views), int(seed)
        self.mid_ratio, self.hflip = float(mid_reso), bool(hflip)
        self.mid_size = round(self.mid_ratio * self.image_size)
        if self.num_views < 1:
            raise ValueError(f"VAR views per image must be >= 1, got {num_views} "
                             "(config.tokenize.num_views).")

    def crop_params(self, height: int, width: int, index: int, view: int) -> tuple[int, int, bool]:
        """Top, left and flip of one view of a resized ``height × width`` image."""
        # Raw Philox words (stable across numpy versions, unlike Generator methods); the modulo
        # bias is below 2^-50 for any image size.
        raw = np.random.Philox(key=[self.seed, index], counter=[view, 0, 0, 0]).random_raw(3)
        top = int(raw[0] % (height - self.image_size + 1))
        left = int(raw[1] % (width - self.image_size + 1))
        flip = bool(raw[2] & 1) if self.hflip else False
        return top, left, flip

    def __call__(self, image: Image.Image, index: int = 0) -> np.ndarray:
        arr = np.asarray(torchvision_resize_short(image, self.mid_size, Image.LANCZOS))
        H, W = arr.shape[:2]
        views = []
        for v in range(self.num_views):
            top, left, flip = self.crop_params(H, W, index, v)
            crop = arr[top:top + self.image_size, left:left + self.image_size]
            views.append(crop[:, ::-1] if flip else crop)
        return to_pm1_var(np.stack(views))

    def describe(self) -> dict:
        return {"kind": "var_random_crops", "image_size": self.image_size,
                "mid_size": self.mid_size, "num_views": self.num_views, "seed": self.seed,
                "hflip": self.hflip,
                "views": "Resize(mid, LANCZOS) then RandomCrop(S): top, left, flip = "
                         "r0 % (H-S+1), r1 % (W-S+1), r2 & 1 with r = Philox(key=[seed, "
                         "image_index], counter=[view,0,0,0]).random_raw(3)",
                "normalize": "x/255*2-1 (x+x-1)"}


def make_views(cfg) -> Views:
    """From ``config.tokenize``: ``views`` = ten_crop | center_flip | var_random_crops."""
    kind = cfg.views
    if kind == "ten_crop":
        return LlamaGenTenCrop(cfg.image_size, cfg.crop_range)
    if kind == "center_flip":
        return LlamaGenCenterFlip(cfg.image_size)
    if kind == "var_random_crops":
        return VarRandomCrops(cfg.image_size, cfg.num_views, cfg.get("crop_seed", 0),
                              cfg.get("mid_reso", 1.125), cfg.get("hflip", False))
    raise ValueError(f"config.tokenize.views={kind!r}; choose ten_crop, center_flip or "
                     "var_random_crops.")
