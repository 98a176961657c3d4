"""Benchmark of the saliency codec on real images: bytes per sample against what a model sees.

``python -m benchmarks.saliency [--data-root DIR] [--train N] [--test N] [--out DIR]``

Trains a reduced ResNet-18 on the first task of Split-FashionMNIST (``--train`` samples, one pass:
a model early in training, as Grad-CAM meets it at ``add`` time), computes Grad-CAM maps of
``--test`` test images for the predicted class of the task, and encodes them with the saliency
codec in several settings. Reported per setting: bytes per stored sample (what a byte budget
counts), the fraction of pixels kept exactly, the mean absolute pixel error of the decoded images
and the same model's accuracy on them, next to the originals, raw records and raw + zstd.
It asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numcodecs import Zstd

from carousel.kinds import RawCodec, SaliencyCodec
from carousel.kinds.saliency import grad_cam, last_conv_block
from trainers.augment import prepare
from trainers.models import reduced_resnet18
from trainers.streams import make_stream

from . import report

SETTINGS = [  # (theta, background_bits, thumbnail)
    (0.6, 0, 0), (0.6, 0, 4), (0.6, 1, 0), (0.6, 2, 0), (0.6, 3, 0),
    (0.2, 2, 0), (0.4, 2, 0), (0.8, 2, 0),
]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saliency", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--train", type=int, default=3000, help="training samples of task 1 seen by the model")
    p.add_argument("--test", type=int, default=400, help="test images encoded")
    p.add_argument("--out", default="bench-out/saliency")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    stream = make_stream("split-fashion-mnist", data_root=args.data_root, seed=0)
    task = stream.tasks[0]
    model = reduced_resnet18(stream.num_classes, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(task.train_x[:args.train]), torch.from_numpy(task.train_y[:args.train])
    for i in range(0, len(y), 32):
        loss = F.cross_entropy(model(prepare(x[i:i + 32], stream, train=True))[:, :2], y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = torch.from_numpy(task.test_x[:args.test]), torch.from_numpy(task.test_y[:args.test])
    maps = grad_cam(model, prepare(xt, stream, train=False), last_conv_block(model), task.classes)
    model.eval()

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(prepare(images, stream, train=False))[:, :2].argmax(1) == yt).float().mean())

    fields = {"x": (tuple(xt.shape[1:]), "uint8"), "y": ((), "int64"), "task": ((), "int16")}
    batch = {"x": xt.numpy(), "y": yt.numpy(), "task": np.zeros(len(yt), np.int16),
             "saliency": np.rint(maps.numpy() * 255).astype(np.uint8)}
    raw = float(RawCodec(fields).nbytes(batch)[0])
    zstd = Zstd(level=3)
    raw_zstd = float(np.mean([len(zstd.encode(r.tobytes())) for r in xt.numpy()])) + 10  # + label and task
    rows = {"raw record": {"bytes": raw, "kept": 1.0, "mae": 0.0, "accuracy": accuracy(xt)},
            "raw + zstd": {"bytes": raw_zstd, "kept": 1.0, "mae": 0.0, "accuracy": accuracy(xt)}}
    for theta, bits, thumb in SETTINGS:
        codec = SaliencyCodec(fields, theta=theta, background_bits=bits, thumbnail=thumb)
        rec = codec.encode(batch)
        dec = torch.from_numpy(codec.decode(rec)["x"])
        how = f"{bits}-bit background" if bits else ("dropped, thumbnail 1/%d" % thumb if thumb else "dropped")
        rows[f"saliency theta {theta}, {how}"] = {
            "bytes": float(codec.nbytes(rec).mean()), "kept": float(codec.keep_mask(batch["saliency"]).mean()),
            "mae": float((dec.float() - xt.float()).abs().mean()), "accuracy": accuracy(dec)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Saliency codec on {len(yt)} Fashion-MNIST test images, Grad-CAM of a reduced ResNet-18 after "
             f"{len(x)} samples of task 1 ({platform.machine()})", "",
             "| stored as | bytes/sample | samples per raw byte budget | pixels kept exactly | MAE (0-255) | "
             "model accuracy on it |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['bytes']:.0f} | {raw / r['bytes']:.2f}x | {r['kept']:.2f} | {r['mae']:.1f} | "
                     f"{100 * r['accuracy']:.1f} % |")
    return report.write(out, {"rows": rows, "train": len(x), "test": len(yt)}, lines)


if __name__ == "__main__":
    main()
