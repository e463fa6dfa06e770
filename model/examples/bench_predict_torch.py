"""PyTorch counterpart of `bench_predict.rs`: times nnU-Net-style sliding-window inference of one
volume with the network of model/tests/reference/torch_reference.py (random weights, random normalized
image): step 0.5 of the patch, Gaussian importance (sigma = patch/8, max 1, zeros clamped),
optional 8-way mirroring of sigmoid probabilities, fp16 autocast on CUDA, accumulation on the
device (or --accumulate cpu). Prints one JSON line.

  .venv/bin/python model/examples/bench_predict_torch.py --preset unet --classes 47 \
      --shape 200 512 512 [--tta] [--tile-batch 2]
"""
import argparse, json, math, os, resource, sys, time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
from torch_reference import MultiTalentUNet  # noqa: E402

PRESETS = {  # features, pools (strides of stages 1..), patch
    "unet": ((30, 60, 120, 240, 320, 320), ((2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)), (96, 192, 192)),
    "tiny": ((8, 16, 32, 48), ((2, 2, 2), (2, 2, 2), (1, 2, 2)), (16, 48, 48)),
}


def gaussian(patch):
    axes = []
    for n in patch:
        sigma, c, radius = n / 8, n // 2, math.floor(4 * n / 8 + 0.5)
        d = np.arange(n) - c
        g = np.exp(-d.astype(np.float64) ** 2 / (2 * sigma ** 2))
        g[np.abs(d) > radius] = 0
        axes.append(g)
    g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = g / g.max()
    g[g == 0] = g[g > 0].min()
    return torch.from_numpy(g.astype(np.float32))


def starts(size, patch, step=0.5):
    n = int(math.ceil((size - patch) / (patch * step))) + 1
    if n == 1:
        return [0]
    actual = (size - patch) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


FLIPS = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


@torch.no_grad()
def sliding_window(net, image, patch, classes, dev, acc_dev, tta, tile_batch, channels_last=False):
    shape = image.shape[1:]
    padded = [max(s, p) for s, p in zip(shape, patch)]
    below = [(p - s) // 2 for s, p in zip(shape, padded)]
    pad = []
    for a in (2, 1, 0):
        pad += [below[a], padded[a] - shape[a] - below[a]]
    img = torch.nn.functional.pad(image.to(acc_dev), pad)
    g_acc = gaussian(patch).to(acc_dev)
    g_dev = g_acc.to(dev)
    acc = torch.zeros((classes, *padded), device=acc_dev)
    wsum = torch.zeros((1, *padded), device=acc_dev)
    tiles = [(z, y, x) for z in starts(padded[0], patch[0]) for y in starts(padded[1], patch[1]) for x in starts(padded[2], patch[2])]
    flips = FLIPS if tta else [()]
    for i in range(0, len(tiles), tile_batch):
        batch = tiles[i:i + tile_batch]
        x = torch.stack([img[:, z:z + patch[0], y:y + patch[1], xx:xx + patch[2]] for z, y, xx in batch]).to(dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        probs = None
        for f in flips:
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                out = net(torch.flip(x, f) if f else x)[0]
            p = torch.sigmoid(out.float())
            p = torch.flip(p, f) if f else p
            probs = p if probs is None else probs + p
        probs = (probs / len(flips) * g_dev).to(acc_dev)
        for b, (z, y, xx) in enumerate(batch):
            acc[:, z:z + patch[0], y:y + patch[1], xx:xx + patch[2]] += probs[b]
            wsum[:, z:z + patch[0], y:y + patch[1], xx:xx + patch[2]] += g_acc
    acc /= wsum
    return acc[:, below[0]:below[0] + shape[0], below[1]:below[1] + shape[1], below[2]:below[2] + shape[2]], len(tiles)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="unet")
    ap.add_argument("--classes", type=int, default=47)
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512])
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--tile-batch", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--accumulate", choices=["device", "cpu"], default="device")
    ap.add_argument("--patch", type=int, nargs=3, help="the tile (default: the preset's; bench.sh passes ours)")
    ap.add_argument("--channels-last", action="store_true", help="network and tiles channels-last (NDHWC)")
    a = ap.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    feats, pools, patch = PRESETS[a.preset]
    patch = tuple(a.patch) if a.patch else patch
    torch.manual_seed(0)
    net = MultiTalentUNet(a.classes, feats, pools).to(dev).eval()
    if a.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    torch.backends.cudnn.benchmark = True
    image = torch.randn(1, *a.shape)
    acc_dev = dev if a.accumulate == "device" else torch.device("cpu")
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
        net(torch.randn(a.tile_batch, 1, *patch, device=dev))[0].float().sum().item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    probs, tiles = sliding_window(net, image, patch, a.classes, dev, acc_dev, a.tta, a.tile_batch, a.channels_last)
    mean = probs.mean().item()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    cuda = dev.type == "cuda"
    print(json.dumps({
        "impl": "pytorch-eager", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "preset": a.preset, "classes": a.classes, "shape": a.shape, "patch": list(patch), "tiles": tiles,
        "tta": a.tta, "tile_batch": a.tile_batch, "channels_last": a.channels_last,
        "accumulator_device": str(acc_dev),
        "seconds_per_volume": round(dt, 3),
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "mean_probability": mean,
    }))


if __name__ == "__main__":
    main()
