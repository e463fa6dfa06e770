"""numpy oracle for fedtalent-data's normalization schemes (nnU-Net v2's definitions, computed the
way nnU-Net computes them: float32 arrays, numpy statistics, scipy's binary_fill_holes).

Prints one JSON object: `cases`, each an input channel [z, y, x] flattened, the scheme and its
parameters, and either the expected output or the error nnU-Net raises; and `nonzero_mask`, two
channels with nnU-Net's nonzero mask of them.
"""
import json

import numpy as np
from scipy.ndimage import binary_fill_holes

SHAPE = (6, 7, 8)


def z_score(image, mask=None):
    image = image.astype(np.float32, copy=True)
    sel = np.ones(image.shape, bool) if mask is None else mask
    mean, std = image[sel].mean(), image[sel].std()
    image[sel] = (image[sel] - mean) / max(std, 1e-8)
    return image


def ct(image, props):
    image = np.clip(image.astype(np.float32), props["clip_low"], props["clip_high"])
    return (image - props["mean"]) / max(props["std"], 1e-8)


def rescale_0_1(image):
    image = image.astype(np.float32, copy=True)
    image -= image.min()
    image /= np.clip(image.max(), a_min=1e-8, a_max=None)
    return image


def rgb_to_0_1(image):
    if image.min() < 0 or image.max() > 255:
        return None
    return image.astype(np.float32) / 255.0


def brain_like(rng):
    """Two channels that are zero outside a box, with a zero cavity inside it (which the
    nonzero mask fills) and one zero voxel on the box's face (which stays outside)."""
    channels = []
    for c in range(2):
        img = np.zeros(SHAPE, np.float32)
        img[1:5, 1:6, 2:7] = rng.normal(500 + 100 * c, 80, (4, 5, 5))
        img[2:4, 3, 4] = 0.0
        img[1, 3, 2] = 0.0
        channels.append(img)
    channels[0][3, 2, 5] = 0.0  # zero in one channel only: in the mask, and in channel 0's statistics
    return channels


def main():
    rng = np.random.default_rng(11)
    paper = {"clip_low": -927.0, "clip_high": 275.0, "mean": 63.436882, "std": 175.48094}
    paper = {k: float(np.float32(v)) for k, v in paper.items()}
    channels = brain_like(rng)
    mask = binary_fill_holes((channels[0] != 0) | (channels[1] != 0))
    raw = [
        ("ct", "CT", False, rng.normal(0, 600, SHAPE).astype(np.float32), lambda im: ct(im, paper)),
        ("zscore", "zscore", False, rng.normal(300, 80, SHAPE).astype(np.float32), z_score),
        ("zscore_constant", "zscore", False, np.full(SHAPE, 7.0, np.float32), z_score),
        ("zscore_in_nonzero_mask", "zscore", True, channels[0], lambda im: z_score(im, mask)),
        ("no_norm", "noNorm", False, rng.integers(-50, 50, SHAPE).astype(np.float32), lambda im: im),
        ("rescale", "rescale_0_1", False, rng.normal(-200, 50, SHAPE).astype(np.float32), rescale_0_1),
        ("rescale_constant", "rescale_0_1", False, np.full(SHAPE, 5.0, np.float32), rescale_0_1),
        ("rgb", "rgb_to_0_1", False, rng.integers(0, 256, SHAPE).astype(np.float32), rgb_to_0_1),
        ("rgb_out_of_range", "rgb_to_0_1", False, np.arange(np.prod(SHAPE)).reshape(SHAPE).astype(np.float32),
         rgb_to_0_1),
    ]
    cases = []
    for name, scheme, use_mask, image, f in raw:
        out = f(image)
        cases.append({
            "name": name,
            "channel_name": scheme,
            "use_mask": use_mask,
            "ct": paper if scheme == "CT" else None,
            "input": image.ravel().tolist(),
            "expected": None if out is None else np.asarray(out, np.float32).ravel().tolist(),
        })
    print(json.dumps({
        "shape": list(SHAPE),
        "cases": cases,
        "nonzero_mask": {
            "channels": [c.ravel().tolist() for c in channels],
            "mask": mask.ravel().tolist(),
        },
    }))


if __name__ == "__main__":
    main()
