"""A plain baseline for benchmarks: a MONAI 3D U-Net trained from scratch, supervised only, on
the same labeled cases, training grid and time budget as the frozen-encoder student.

It answers a user's first question about the student at small k: what does the frozen SAM
encoder buy over a network that sees only the voxels? (``scripts/bench_ssl.py --variants unet``.)
Nothing here is used by the product; it shares the product's preprocessing, inversion and
metrics so that the numbers are comparable.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .preprocess import PreprocessConfig, apply_to_label, invert, preprocess
from .volume import Volume


def _unet(channels: Sequence[int]) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(channels),
                strides=tuple([2] * (len(channels) - 1)), num_res_units=1, norm="instance")


def _check_grid(shape: Sequence[int], levels: int) -> None:
    step = 2 ** (levels - 1)
    bad = [int(s) for s in shape if int(s) % step]
    if bad:
        raise ValueError(f"the U-Net halves each axis {levels - 1} times: the training grid {tuple(shape)} needs sides divisible by {step}")


def train_unet(images: List[np.ndarray], labels: List[np.ndarray], val_images: List[np.ndarray], val_labels: List[np.ndarray],
               seconds: float, seed: int = 0, channels: Sequence[int] = (16, 32, 64, 128), lr: float = 3e-3,
               validate_every: int = 20, max_steps: Optional[int] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Train on whole preprocessed volumes (``(z, y, x)`` in [0, 1], binary labels) with Dice +
    CE and random flips, one volume per step, until ``seconds`` of wall time (or ``max_steps``)
    have passed. Keeps the weights with the best mean validation Dice (checked every
    ``validate_every`` steps and at the end); without validation cases, the last weights."""
    from monai.losses import DiceCELoss

    from .training import dice_hd95

    if not images:
        raise ValueError("train_unet needs at least one labeled volume")
    _check_grid(images[0].shape, len(channels))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = _unet(channels)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    best: Tuple[float, Optional[Dict[str, torch.Tensor]]] = (-1.0, None)
    t0 = time.time()
    step = 0

    def score() -> float:
        net.eval()
        with torch.no_grad():
            d = [dice_hd95((torch.sigmoid(net(torch.from_numpy(im)[None, None])) > 0.5)[0, 0].numpy().astype(np.uint8),
                           (lab > 0).astype(np.uint8), (1.0, 1.0, 1.0), 1, hd95=False)[0] for im, lab in zip(val_images, val_labels)]
        net.train()
        return float(np.mean(d))

    net.train()
    while time.time() - t0 < seconds and (max_steps is None or step < max_steps):
        i = int(rng.integers(len(images)))
        x = torch.from_numpy(images[i])[None, None]
        y = torch.from_numpy((labels[i] > 0).astype(np.float32))[None, None]
        dims = [d for d, f in zip((2, 3, 4), rng.random(3) < 0.5) if f]
        if dims:
            x, y = torch.flip(x, dims), torch.flip(y, dims)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if val_images and step % validate_every == 0:
            d = score()
            if d > best[0]:
                best = (d, {k: v.detach().clone() for k, v in net.state_dict().items()})
    if val_images:
        d = score()
        if d > best[0] or best[1] is None:
            best = (d, {k: v.detach().clone() for k, v in net.state_dict().items()})
        net.load_state_dict(best[1])
    net.eval()
    return net, {"steps": step, "seconds": round(time.time() - t0, 1), "best_val_dice": best[0] if val_images else None}


def segment_unet(net: torch.nn.Module, volume: Volume, config: PreprocessConfig, largest_component: bool = False) -> np.ndarray:
    """Label map of ``volume`` on its own grid: preprocess, predict, probabilities back to the
    input grid (linear), threshold 0.5, as :func:`semisam.inference.segment_volume` does."""
    from .inference import keep_largest_component

    pre, record = preprocess(volume, config)
    with torch.no_grad():
        prob = torch.sigmoid(net(torch.from_numpy(np.ascontiguousarray(pre.array, np.float32))[None, None]))[0, 0].numpy()
    label = (invert(record, prob, "probability").array > 0.5).astype(np.uint8)
    return keep_largest_component(label) if largest_component else label


def preprocessed_pair(image: Volume, label: Volume, config: PreprocessConfig) -> Tuple[np.ndarray, np.ndarray]:
    pre, record = preprocess(image, config)
    return np.ascontiguousarray(pre.array, np.float32), apply_to_label(record, label).array.astype(np.uint8)

