#!/usr/bin/env python3
"""The data-path peer: nnU-Net v1's CPU augmentation on the cases `bench_data` preprocessed.

Reads the preprocessed cases that `bench_data --keep DIR` left in DIR/cache (*.ftp: our cache
format), normalizes them as our loader does (CT: the paper's clip and z-score), writes them as
nnU-Net v1 unpacked cases (one float32 .npy per case: image channels, then the label map; class
locations as nnU-Net's preprocessing records them) and runs nnU-Net v1's own training pipeline on
them: `DataLoader3D` (oversample_foreground_percent 0.33, the larger `basic_generator_patch_size`)
feeding `get_moreDA_augmentation` with the transforms and probabilities of `nnUNetTrainerV2`
(`setup_DA_params`: rotation +-30 deg, scaling 0.7-1.4, no elastic deformation, data order 3, labels
order 1, deep-supervision targets of the `unet` preset's 5 levels) in batchgenerators'
MultiThreadedAugmenter with `--threads` worker processes (OMP_NUM_THREADS=1 in each, as nnU-Net
recommends). Prints one JSON line with samples/s after a warm-up that brings the worker queues to
their steady state.

  python scripts/bench_data_nnunet.py --cache DIR/cache --threads 4 --batches 20
"""
import argparse
import copy
import glob
import json
import os
import struct
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

CT = dict(clip_low=-927.0, clip_high=275.0, mean=63.436882, std=175.48094)  # CtNormalization::PAPER
MAGIC = b"FTPREP02"


def read_case(path):
    """(meta, image [c, z, y, x] float32 normalized, labels [z, y, x] uint16) of one .ftp file."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == MAGIC, f"{path}: not a preprocessed-case file"
    (json_len,) = struct.unpack("<Q", raw[8:16])
    meta = json.loads(raw[16 : 16 + json_len])
    offset = (16 + json_len + 63) // 64 * 64
    shape = meta["shape"]
    n = int(np.prod(shape))
    channels = len(meta["channels"])
    image = np.frombuffer(raw, "<f4", channels * n, offset).reshape(channels, *shape).copy()
    labels = np.frombuffer(raw, "<u2", n, offset + 4 * channels * n).reshape(shape)
    for c, scheme in enumerate(meta["channels"]):
        if "Ct" in json.dumps(scheme):
            np.clip(image[c], CT["clip_low"], CT["clip_high"], out=image[c])
            image[c] = (image[c] - CT["mean"]) / CT["std"]
    return meta, image, labels


def class_locations(labels, rng):
    """nnU-Net v1's preprocessing: per label value, up to 10,000 voxels (at least 1 % of them)."""
    locations = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        all_locs = np.argwhere(labels == value)
        if len(all_locs) == 0:
            locations[int(value)] = []
            continue
        target = min(10000, len(all_locs))
        target = max(target, int(np.ceil(len(all_locs) * 0.01)))
        locations[int(value)] = all_locs[rng.choice(len(all_locs), target, replace=False)]
    return locations


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="the folder of *.ftp files bench_data --keep wrote")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--patch", type=int, nargs=3, default=[96, 192, 192])
    ap.add_argument("--work", default=None, help="where the unpacked .npy cases go (default: a temporary folder)")
    args = ap.parse_args()

    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter  # noqa: F401
    from nnunet.training.data_augmentation.data_augmentation_moreDA import get_moreDA_augmentation
    from nnunet.training.data_augmentation.default_data_augmentation import (
        default_3D_augmentation_params,
        get_patch_size,
    )
    from nnunet.training.dataloading.dataset_loading import DataLoader3D

    files = sorted(glob.glob(os.path.join(args.cache, "*.ftp")))
    if not files:
        sys.exit(f"no *.ftp case in {args.cache}")
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = args.work or tmp.name
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    rng = np.random.default_rng(1)
    dataset, shapes = {}, []
    for path in files:
        meta, image, labels = read_case(path)
        key = meta["id"]
        np.save(os.path.join(work, key + ".npy"), np.concatenate([image, labels[None].astype(np.float32)]))
        dataset[key] = {
            "data_file": os.path.join(work, key + ".npz"),  # DataLoader3D reads the .npy beside it
            "properties": {"class_locations": class_locations(labels, rng)},
        }
        shapes.append(meta["shape"])
    setup_s = time.time() - t0

    # nnUNetTrainerV2.setup_DA_params for a 3D network (the `unet` preset's pooling).
    patch = np.array(args.patch)
    pool_kernels = [[2, 2, 2]] * 4 + [[1, 2, 2]]
    ds_scales = [[1, 1, 1]] + [list(i) for i in 1 / np.cumprod(np.vstack(pool_kernels), axis=0)][:-1]
    params = copy.deepcopy(default_3D_augmentation_params)
    for axis in "xyz":
        params["rotation_" + axis] = (-30.0 / 360 * 2.0 * np.pi, 30.0 / 360 * 2.0 * np.pi)
    params["mask_was_used_for_normalization"] = {0: False}  # CT: nnU-Net normalizes without the mask
    basic_patch = get_patch_size(patch, params["rotation_x"], params["rotation_y"], params["rotation_z"],
                                 params["scale_range"])
    params["scale_range"] = (0.7, 1.4)
    params["do_elastic"] = False
    params["selected_seg_channels"] = [0]
    params["patch_size_for_spatialtransform"] = patch
    params["num_cached_per_thread"] = 2
    params["num_threads"] = args.threads

    # nnUNetTrainer.get_basic_generators (oversample_foreground_percent 0.33, pad_all_sides None).
    dl_tr = DataLoader3D(dataset, basic_patch, patch, args.batch, False, oversample_foreground_percent=0.33,
                         pad_mode="constant", pad_sides=None, memmap_mode="r")
    dl_val = DataLoader3D(dataset, patch, patch, args.batch, False, oversample_foreground_percent=0.33,
                          pad_mode="constant", pad_sides=None, memmap_mode="r")
    # pin_memory needs CUDA; nnU-Net's trainer sets it only when training on a GPU.
    tr_gen, val_gen = get_moreDA_augmentation(dl_tr, dl_val, patch, params, deep_supervision_scales=ds_scales,
                                              pin_memory=False, use_nondetMultiThreadedAugmenter=False)
    # Warm-up: worker start and queues (num_cached_per_thread 2 each) to their steady state.
    warmup = 2 * args.threads
    for _ in range(warmup):
        next(tr_gen)
    t = time.time()
    for _ in range(args.batches):
        b = next(tr_gen)
    elapsed = time.time() - t
    tr_gen._finish()
    val_gen._finish()
    print(json.dumps({
        "bench": "data_path",
        "impl": "nnunet-v1-batchgenerators",
        "threads": args.threads,
        "batch": args.batch,
        "patch": args.patch,
        "loader_patch": [int(v) for v in basic_patch],
        "batches": args.batches,
        "warmup_batches": warmup,
        "samples_per_s": args.batch * args.batches / elapsed,
        "target_levels": len(b["target"]),
        "cases": len(files),
        "preprocessed_shapes": shapes,
        "setup_seconds": setup_s,
    }), flush=True)


if __name__ == "__main__":
    main()
