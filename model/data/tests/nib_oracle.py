"""nibabel oracle for fedtalent-data's NIfTI tests.

`write DIR`: writes NIfTI files covering dtypes, scaling, gzip, NIfTI-1/2 and qform/sform cases,
and prints one JSON list describing what nibabel reads back (shape, zooms, affine, voxels in
z,y,x C order).
`read FILE...`: prints what nibabel reads from each file (used on masks written by Rust).
"""
import json
import sys

import nibabel as nib
import numpy as np


def rot(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine(r, zooms, t):
    a = np.eye(4)
    a[:3, :3] = r @ np.diag(zooms)
    a[:3, 3] = t
    return a


def describe(path):
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float64)
    hdr = img.header
    return {
        "path": str(path),
        "shape": [int(s) for s in img.shape[:3]],
        "zooms": [float(z) for z in hdr.get_zooms()[:3]],
        "affine": img.affine.tolist(),
        "sform_code": int(hdr["sform_code"]),
        "qform_code": int(hdr["qform_code"]),
        "dtype": str(hdr.get_data_dtype()),
        "values": np.transpose(data, (2, 1, 0)).ravel().tolist(),
    }


def write(out):
    rng = np.random.default_rng(7)
    shape = (5, 4, 3)  # x, y, z
    cases = []

    # uint8, sform only (with a shear the qform could not hold), plain .nii
    d = rng.integers(0, 255, shape).astype(np.uint8)
    a = affine(rot(0.1, -0.2, 0.3), (0.7, 0.8, 2.5), (10.0, -20.0, 30.0))
    a[0, 1] += 0.05
    img = nib.Nifti1Image(d, None)
    img.header.set_sform(a, code=2)
    img.header.set_qform(None, code=0)
    cases.append(("u8_sform.nii", img))

    # int16 with slope/intercept, qform only with qfac -1, gzipped
    d = rng.integers(-300, 300, shape).astype(np.int16)
    a = affine(rot(0.0, 0.0, np.pi), (0.75, 0.75, 5.0), (100.0, 120.0, -50.0))
    a[:3, 2] *= -1  # left-handed: qfac = -1
    img = nib.Nifti1Image(d, None)
    img.header.set_qform(a, code=1)
    img.header.set_sform(None, code=0)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.0, -1024.0)
    cases.append(("i16_scaled_qform.nii.gz", img))

    # int32, neither qform nor sform: nibabel's centred base affine
    d = rng.integers(-100000, 100000, shape).astype(np.int32)
    img = nib.Nifti1Image(d, None)
    img.header.set_zooms((0.9, 1.1, 3.0))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    cases.append(("i32_noform.nii", img))

    # float32, qform and sform differ: the sform wins
    d = rng.normal(0, 100, shape).astype(np.float32)
    img = nib.Nifti1Image(d, None)
    img.header.set_qform(affine(rot(0.3, 0.1, 0.0), (1.0, 1.0, 1.5), (1.0, 2.0, 3.0)), code=1)
    img.header.set_sform(affine(np.eye(3), (1.0, 1.0, 1.5), (-5.0, -6.0, -7.0)), code=1)
    cases.append(("f32_both.nii.gz", img))

    # float64, NIfTI-2, qform only
    d = rng.normal(0, 1, shape)
    img = nib.Nifti2Image(d, None)
    img.header.set_qform(affine(rot(-0.4, 0.2, 0.1), (0.8, 0.8, 1.0), (3.0, 2.0, 1.0)), code=1)
    img.header.set_sform(None, code=0)
    img.header.set_data_dtype(np.float64)
    cases.append(("f64_nifti2.nii", img))

    # uint8 label-like map with sform and qform, gzipped NIfTI-2
    d = rng.integers(0, 4, shape).astype(np.uint8)
    img = nib.Nifti2Image(d, affine(rot(0.0, 0.0, 0.2), (0.7, 0.7, 1.0), (0.0, 0.0, 0.0)))
    cases.append(("u8_nifti2.nii.gz", img))

    out_list = []
    for name, img in cases:
        path = f"{out}/{name}"
        nib.save(img, path)
        out_list.append(describe(path))
    print(json.dumps(out_list))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        print(json.dumps([describe(p) for p in sys.argv[2:]]))
