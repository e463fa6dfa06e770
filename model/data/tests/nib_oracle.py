"""nibabel oracle for fedtalent-data's NIfTI tests.

`write DIR`: writes NIfTI files covering dtypes, scaling, gzip, NIfTI-1/2 and qform/sform cases,
and prints one JSON list describing what nibabel reads back (shape, zooms, affine, voxels in
z,y,x C order).
`read FILE...`: prints what nibabel reads from each file (used on masks written by Rust).
`corpus DIR`: describes every file nibabel ships under nibabel/tests/data, as nibabel classifies it,
plus files derived from them in DIR: every NIfTI image again as a .hdr/.img pair (plain and
gzipped), the shipped pair headers completed with an .img, and a few images we refuse on purpose.
Voxels go to raw little-endian float64 files in DIR (volume after volume, each z,y,x C order), so
that large images do not pass through JSON.
"""
import os
import shutil
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


NIFTI_CLASSES = ("Nifti1Image", "Nifti2Image", "Nifti1Pair", "Nifti2Pair", "Cifti2Image")


def describe_volumes(path, out, name, **extra):
    """nibabel's view of a NIfTI file: class, shape, affine, voxels (or why it cannot read them)."""
    entry = {"name": name, "path": str(path), **extra}
    img = nib.load(path)
    entry["nib_class"] = type(img).__name__
    if entry["nib_class"] == "Cifti2Image":
        return entry
    entry["shape"] = [int(s) for s in img.shape]
    entry["affine"] = img.affine.tolist()
    entry["zooms"] = [float(z) for z in img.header.get_zooms()[:3]]
    try:
        data = img.get_fdata(dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - the reason is the oracle's answer
        entry["nib_error"] = f"{type(e).__name__}: {e}"
        return entry
    vols = data.reshape(data.shape[:3] + (-1,))
    raw = os.path.join(out, f"{len(os.listdir(out))}_{name.replace('/', '_')}.f64")
    with open(raw, "wb") as f:
        for t in range(vols.shape[3]):
            f.write(np.ascontiguousarray(np.transpose(vols[..., t], (2, 1, 0))).astype("<f8").tobytes())
    entry["values_file"] = raw
    entry["volumes"] = int(vols.shape[3])
    return entry


def complete_pair_header(hdr_path, out):
    """The shipped .hdr files come without their .img: write one (zeros up to vox_offset, then a
    ramp in the header's dtype and byte order) next to a copy, so the shipped header is read."""
    stem = os.path.basename(hdr_path)[: -len(".hdr")]
    hdr_copy = os.path.join(out, f"shipped_{stem}.hdr")
    shutil.copy(hdr_path, hdr_copy)
    img = nib.load(hdr_copy)
    n = int(np.prod(img.shape))
    dtype = img.header.get_data_dtype()
    ramp = (np.arange(n) % 2000 - 1000).astype(dtype)
    with open(hdr_copy[: -len(".hdr")] + ".img", "wb") as f:
        # The offset nibabel reads from (the loaded header's own field is reset by nibabel).
        f.write(b"\0" * int(img.dataobj.offset))
        f.write(ramp.tobytes())
    return hdr_copy


def refused_on_purpose(out):
    """Valid NIfTI that fedtalent refuses, with the words its message must contain."""
    rng = np.random.default_rng(3)
    cases = []
    img = nib.Nifti1Image((rng.normal(size=(3, 4, 5)) + 1j).astype(np.complex64), np.eye(4))
    cases.append(("complex64.nii", img, "complex64"))
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    cases.append(("rgb24.nii", nib.Nifti1Image(rgb, np.eye(4)), "RGB24"))
    cases.append(("five_d.nii.gz", nib.Nifti1Image(np.zeros((3, 4, 5, 1, 2), np.float32), np.eye(4)), "5D"))
    entries = []
    for name, img, words in cases:
        path = os.path.join(out, name)
        nib.save(img, path)
        entries.append({"name": f"generated/{name}", "path": path, "nib_class": type(img).__name__,
                        "must_refuse": words})
    return entries


def corpus(out):
    data_dir = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
    raw_dir = os.path.join(out, "raw")
    os.makedirs(raw_dir)
    entries, skipped, singles = [], [], []
    for f in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, f)
        if os.path.isdir(path):
            continue
        try:
            cls = type(nib.load(path)).__name__
        except Exception as e:  # noqa: BLE001 - nibabel does not read it as an image at all
            skipped.append({"name": f, "why": f"nibabel cannot load it: {type(e).__name__}"})
            continue
        if cls not in NIFTI_CLASSES:
            skipped.append({"name": f, "why": f"nibabel reads it as {cls}", "nib_class": cls, "path": path})
            continue
        entry = describe_volumes(path, raw_dir, f)
        entries.append(entry)
        if cls in ("Nifti1Image", "Nifti2Image") and "values_file" in entry:
            singles.append((f, nib.load(path)))
        if f.endswith(".hdr"):
            entries.append(describe_volumes(complete_pair_header(path, out), raw_dir, f"{f} + generated .img"))
    # Every single-file image again as a pair, named by either file, plain or gzipped.
    for i, (f, img) in enumerate(singles):
        pair_class = nib.Nifti2Pair if isinstance(img, nib.Nifti2Image) else nib.Nifti1Pair
        ext = ("hdr", "img.gz", "img", "hdr.gz")[i % 4]
        stem = f.split(".")[0]
        path = os.path.join(out, f"pair_{stem}.{ext}")
        nib.save(pair_class.from_image(img), path)
        entries.append(describe_volumes(path, raw_dir, f"{f} as pair .{ext}"))
    # A 4D image whose 4th dimension is 1 is a 3D volume.
    anat = nib.load(os.path.join(data_dir, "anatomical.nii"))
    single4d = nib.Nifti1Image(np.asanyarray(anat.dataobj)[..., None], anat.affine, anat.header)
    path = os.path.join(out, "anatomical_4d_singleton.nii.gz")
    nib.save(single4d, path)
    entries.append(describe_volumes(path, raw_dir, "anatomical.nii as 4D with one volume"))
    entries += refused_on_purpose(out)
    print(json.dumps({"entries": entries, "skipped": skipped}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    elif sys.argv[1] == "corpus":
        corpus(sys.argv[2])
    else:
        print(json.dumps([describe(p) for p in sys.argv[2:]]))
