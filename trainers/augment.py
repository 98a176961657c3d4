"""Batch preparation at read time: uint8 images -> normalized float32, with CIFAR's augmentation.

Samples are stored (in the stream and in the replay memory) as raw uint8, so augmentation happens
when a batch is read, fresh for every read, on replayed samples too. The random crop (zero padding 4)
and horizontal flip are one ``gather`` over the whole batch: no Python loop per sample, on whatever
device the batch is on.
"""

from __future__ import annotations

import torch

from .streams import Stream

PAD = 4  # the usual CIFAR recipe: RandomCrop(32, padding=4) + RandomHorizontalFlip()


def _random(generator: torch.Generator | None, device: torch.device, n: int) -> tuple[torch.Tensor, ...]:
    """Per-sample row offsets, column offsets and flip flags, drawn on the generator's device."""
    # A generator lives on one device and torch refuses to draw for another, so draw where it
    # lives and move the few numbers; without one, draw on the batch's device.
    where = generator.device if generator is not None else device
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=where)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator, device=where)
    flip = torch.randint(0, 2, (n,), generator=generator, device=where).bool()
    return dy.to(device), dx.to(device), flip.to(device)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of each image from its zero-padded (by :data:`PAD`) copy, then a random horizontal flip.

    ``x`` is ``(B, C, H, W)`` of any dtype; the result has the same shape and dtype.
    """
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2 * PAD, w + 2 * PAD))
    padded[:, :, PAD:PAD + h, PAD:PAD + w] = x
    dy, dx, flip = _random(generator, x.device, b)
    rows = dy[:, None] + torch.arange(h, device=x.device)                         # (B, H)
    ar = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar, ar)              # (B, W): a flip reads right to left
    # One gather over the flattened padded planes, the same (B, H*W) pixel index for every channel:
    # measured 1.7 ms for 256 CIFAR images on one core, against 3.3 ms for three-tensor advanced
    # indexing and 3.6 ms for a Python loop of slices.
    index = (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


def prepare(x: torch.Tensor, stream: Stream, *, train: bool,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn a uint8 batch ``(B, C, H, W)`` into float32 ``(x/255 - mean) / std`` on the same device.

    When ``train`` and ``stream.augment``, each image is first randomly cropped from its copy padded
    with 4 zero pixels and flipped horizontally with probability 1/2 (reproducible with
    ``generator``). At test time (``train=False``) images are only normalized.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"prepare expects a uint8 (B, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(stream.input_shape):
        raise ValueError(f"batch of {tuple(x.shape[1:])} images for {stream.name}, "
                         f"whose images are {stream.input_shape}")
    if train and stream.augment:
        x = crop_flip(x, generator)  # on uint8: a quarter of the bytes to move, and padding 0 is black
    # (x/255 - mean)/std as one multiply and one subtract, in place on the one float copy.
    mean = torch.tensor(stream.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(stream.std, dtype=torch.float64).view(1, -1, 1, 1)
    scale = (1 / (255 * std)).to(device=x.device, dtype=torch.float32)
    shift = (mean / std).to(device=x.device, dtype=torch.float32)
    return x.float().mul_(scale).sub_(shift)
