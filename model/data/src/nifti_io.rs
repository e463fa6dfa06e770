//! NIfTI reading and writing.
//!
//! NIfTI-1 headers are parsed by the `nifti` crate and masks are written with its writer. The crate
//! has no NIfTI-2 support, so the 540-byte NIfTI-2 header is parsed here. Voxel data are decoded
//! here for both versions (the crate's typed conversions refuse cross-type reads such as i16 -> f32).
//! Geometry follows nibabel exactly: the affine comes from the sform when `sform_code > 0`, else
//! the qform when `qform_code > 0`, else nibabel's centred "base" affine from the zooms.

use std::fs;
use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;
use ndarray::Array3;

/// Errors of NIfTI I/O; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum NiftiIoError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

fn invalid(path: &Path, what: impl Into<String>) -> NiftiIoError {
    NiftiIoError::Invalid { path: path.display().to_string(), what: what.into() }
}

/// The spatial part of a NIfTI header, kept so that written masks carry the source's qform and
/// sform unchanged (what viewers and nibabel use to overlay the mask on the image).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpatialHeader {
    /// pixdim[0..4]: qfac then the x, y, z zooms.
    pub pixdim: [f64; 4],
    pub qform_code: i16,
    pub sform_code: i16,
    /// quatern_b, quatern_c, quatern_d.
    pub quatern: [f64; 3],
    /// qoffset_x, qoffset_y, qoffset_z.
    pub qoffset: [f64; 3],
    /// srow_x, srow_y, srow_z.
    pub srow: [[f64; 4]; 3],
    pub xyzt_units: u8,
}

/// A 3D volume in z,y,x order.
#[derive(Debug, Clone)]
pub struct Volume<T> {
    /// Voxels indexed [z, y, x].
    pub data: Array3<T>,
    /// Voxel size in mm, [z, y, x].
    pub spacing: [f64; 3],
    /// Voxel index (i, j, k) = (x, y, z) to world (mm), as nibabel's `img.affine`.
    pub affine: [[f64; 4]; 4],
    /// The source header's geometry, for writing outputs that overlay the source.
    pub header: SpatialHeader,
}

impl SpatialHeader {
    /// A header whose sform and qform both encode `affine` (rotation + zooms + translation; shears
    /// are not representable in the qform and are approximated there, exactly as nibabel does).
    pub fn from_affine(affine: &[[f64; 4]; 4]) -> Self {
        let zooms: [f64; 3] = std::array::from_fn(|c| (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt());
        let mut rot = [[0.0; 3]; 3];
        for (r, row) in rot.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = affine[r][c] / zooms[c].max(1e-12);
            }
        }
        let qfac = if det3(&rot) < 0.0 {
            for row in rot.iter_mut() {
                row[2] = -row[2];
            }
            -1.0
        } else {
            1.0
        };
        let q = rotation_to_quaternion(&rot);
        SpatialHeader {
            pixdim: [qfac, zooms[0], zooms[1], zooms[2]],
            qform_code: 1,
            sform_code: 1,
            quatern: [q[1], q[2], q[3]],
            qoffset: [affine[0][3], affine[1][3], affine[2][3]],
            srow: [affine[0], affine[1], affine[2]],
            xyzt_units: 2, // mm
        }
    }

    /// The affine nibabel reports for this header and a volume of `shape_xyz`.
    pub fn affine(&self, shape_xyz: [usize; 3]) -> [[f64; 4]; 4] {
        if self.sform_code > 0 {
            [self.srow[0], self.srow[1], self.srow[2], [0.0, 0.0, 0.0, 1.0]]
        } else if self.qform_code > 0 {
            self.qform_affine()
        } else {
            self.base_affine(shape_xyz)
        }
    }

    fn qform_affine(&self) -> [[f64; 4]; 4] {
        let [b, c, d] = self.quatern;
        // nibabel's fillpositive: a = sqrt(1 - b² - c² - d²), tolerating tiny negative rounding.
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = quaternion_to_rotation([a, b, c, d]);
        let qfac = if self.pixdim[0] == -1.0 { -1.0 } else { 1.0 };
        let zooms = [self.pixdim[1], self.pixdim[2], self.pixdim[3] * qfac];
        let mut out = [[0.0; 4]; 4];
        for row in 0..3 {
            for col in 0..3 {
                out[row][col] = r[row][col] * zooms[col];
            }
            out[row][3] = self.qoffset[row];
        }
        out[3][3] = 1.0;
        out
    }

    fn base_affine(&self, shape_xyz: [usize; 3]) -> [[f64; 4]; 4] {
        let zooms = [-self.pixdim[1], self.pixdim[2], self.pixdim[3]];
        let mut out = [[0.0; 4]; 4];
        for i in 0..3 {
            out[i][i] = zooms[i];
            out[i][3] = -((shape_xyz[i] as f64 - 1.0) / 2.0) * zooms[i];
        }
        out[3][3] = 1.0;
        out
    }
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// nibabel's `quat2mat` for a (w, x, y, z) quaternion.
fn quaternion_to_rotation(q: [f64; 4]) -> [[f64; 3]; 3] {
    let [w, x, y, z] = q;
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]]
}

/// A proper rotation matrix to a unit quaternion (w, x, y, z) with w >= 0 (the NIfTI convention,
/// since only b, c, d are stored and a is recovered as the positive root).
fn rotation_to_quaternion(r: &[[f64; 3]; 3]) -> [f64; 4] {
    let trace = r[0][0] + r[1][1] + r[2][2];
    let q = if trace > 0.0 {
        let s = (trace + 1.0).sqrt() * 2.0;
        [0.25 * s, (r[2][1] - r[1][2]) / s, (r[0][2] - r[2][0]) / s, (r[1][0] - r[0][1]) / s]
    } else if r[0][0] > r[1][1] && r[0][0] > r[2][2] {
        let s = (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt() * 2.0;
        [(r[2][1] - r[1][2]) / s, 0.25 * s, (r[0][1] + r[1][0]) / s, (r[0][2] + r[2][0]) / s]
    } else if r[1][1] > r[2][2] {
        let s = (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt() * 2.0;
        [(r[0][2] - r[2][0]) / s, (r[0][1] + r[1][0]) / s, 0.25 * s, (r[1][2] + r[2][1]) / s]
    } else {
        let s = (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt() * 2.0;
        [(r[1][0] - r[0][1]) / s, (r[0][2] + r[2][0]) / s, (r[1][2] + r[2][1]) / s, 0.25 * s]
    };
    let n = q.iter().map(|v| v * v).sum::<f64>().sqrt();
    let sign = if q[0] < 0.0 { -1.0 } else { 1.0 };
    q.map(|v| sign * v / n)
}

/// Version-independent header fields needed to decode the voxels.
struct RawHeader {
    shape_xyz: [usize; 3],
    datatype: i16,
    vox_offset: usize,
    scl_slope: f64,
    scl_inter: f64,
    little_endian: bool,
    spatial: SpatialHeader,
}

fn read_file_bytes(path: &Path) -> Result<Vec<u8>, NiftiIoError> {
    let io_err = |source| NiftiIoError::Io { path: path.display().to_string(), source };
    let raw = fs::read(path).map_err(io_err)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| invalid(path, format!("corrupt or truncated gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<RawHeader, NiftiIoError> {
    if bytes.len() < 348 {
        return Err(invalid(path, format!("file too short for a NIfTI header ({} bytes)", bytes.len())));
    }
    let size_le = i32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let size_be = i32::from_be_bytes(bytes[0..4].try_into().unwrap());
    match (size_le, size_be) {
        (348, _) | (_, 348) => parse_nifti1(path, bytes),
        (540, _) => parse_nifti2(path, bytes, true),
        (_, 540) => parse_nifti2(path, bytes, false),
        _ => Err(invalid(path, format!("not a NIfTI file (sizeof_hdr {size_le})"))),
    }
}

fn parse_nifti1(path: &Path, bytes: &[u8]) -> Result<RawHeader, NiftiIoError> {
    let h = nifti::NiftiHeader::from_reader(bytes).map_err(|e| invalid(path, format!("bad NIfTI-1 header: {e}")))?;
    let ndim = h.dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(invalid(path, format!("invalid dim[0] = {ndim}")));
    }
    let dims: Vec<usize> = h.dim[1..=ndim].iter().map(|&d| d as usize).collect();
    let spatial = SpatialHeader {
        pixdim: std::array::from_fn(|i| h.pixdim[i] as f64),
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        quatern: [h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64],
        qoffset: [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64],
        srow: [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(|v| v as f64)),
        xyzt_units: h.xyzt_units,
    };
    Ok(RawHeader {
        shape_xyz: spatial_shape(path, &dims)?,
        datatype: h.datatype,
        vox_offset: h.vox_offset.max(348.0) as usize,
        scl_slope: h.scl_slope as f64,
        scl_inter: h.scl_inter as f64,
        little_endian: h.endianness == nifti::Endianness::Little,
        spatial,
    })
}

/// Reads a NIfTI-2 header (540 bytes; layout from nifti2.h).
fn parse_nifti2(path: &Path, b: &[u8], le: bool) -> Result<RawHeader, NiftiIoError> {
    if b.len() < 540 {
        return Err(invalid(path, "file too short for a NIfTI-2 header"));
    }
    let bytes8 = |o: usize| -> [u8; 8] { b[o..o + 8].try_into().unwrap() };
    let f64_at = |o: usize| {
        if le {
            f64::from_le_bytes(bytes8(o))
        } else {
            f64::from_be_bytes(bytes8(o))
        }
    };
    let i64_at = |o: usize| {
        if le {
            i64::from_le_bytes(bytes8(o))
        } else {
            i64::from_be_bytes(bytes8(o))
        }
    };
    let i32_at = |o: usize| {
        let x: [u8; 4] = b[o..o + 4].try_into().unwrap();
        if le {
            i32::from_le_bytes(x)
        } else {
            i32::from_be_bytes(x)
        }
    };
    let i16_at = |o: usize| {
        let x: [u8; 2] = b[o..o + 2].try_into().unwrap();
        if le {
            i16::from_le_bytes(x)
        } else {
            i16::from_be_bytes(x)
        }
    };
    if &b[4..7] != b"n+2" && &b[4..7] != b"ni2" {
        return Err(invalid(path, "bad NIfTI-2 magic"));
    }
    let ndim = i64_at(16);
    if !(1..=7).contains(&ndim) {
        return Err(invalid(path, format!("invalid dim[0] = {ndim}")));
    }
    let dims: Vec<usize> = (1..=ndim as usize)
        .map(|i| usize::try_from(i64_at(16 + 8 * i)).map_err(|_| invalid(path, "negative dimension")))
        .collect::<Result<_, _>>()?;
    let spatial = SpatialHeader {
        pixdim: std::array::from_fn(|i| f64_at(104 + 8 * i)),
        qform_code: i32_at(344) as i16,
        sform_code: i32_at(348) as i16,
        quatern: [f64_at(352), f64_at(360), f64_at(368)],
        qoffset: [f64_at(376), f64_at(384), f64_at(392)],
        srow: std::array::from_fn(|r| std::array::from_fn(|c| f64_at(400 + 32 * r + 8 * c))),
        xyzt_units: i32_at(500) as u8,
    };
    Ok(RawHeader {
        shape_xyz: spatial_shape(path, &dims)?,
        datatype: i16_at(12),
        vox_offset: usize::try_from(i64_at(168)).unwrap_or(0).max(540),
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        little_endian: le,
        spatial,
    })
}

/// The three spatial dimensions; trailing singleton dimensions (a 4D file with one volume) are fine.
fn spatial_shape(path: &Path, dims: &[usize]) -> Result<[usize; 3], NiftiIoError> {
    if dims.iter().skip(3).any(|&d| d > 1) {
        return Err(invalid(path, format!("expected a 3D volume, got dimensions {dims:?}")));
    }
    let shape: [usize; 3] = std::array::from_fn(|i| dims.get(i).copied().unwrap_or(1));
    if shape.contains(&0) {
        return Err(invalid(path, format!("zero-sized dimension in {dims:?}")));
    }
    Ok(shape)
}

fn datatype_size(path: &Path, datatype: i16) -> Result<usize, NiftiIoError> {
    Ok(match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 | 768 => 4,
        64 | 1024 | 1280 => 8,
        other => return Err(invalid(path, format!("unsupported NIfTI datatype code {other}"))),
    })
}

/// Decodes the raw voxels (x fastest, as stored) into f64 in storage order, without scaling.
fn decode_voxels(path: &Path, h: &RawHeader, bytes: &[u8]) -> Result<Vec<f64>, NiftiIoError> {
    let n: usize = h.shape_xyz.iter().product();
    let size = datatype_size(path, h.datatype)?;
    let need = h.vox_offset + n * size;
    if bytes.len() < need {
        return Err(invalid(path, format!("truncated voxel data: {} bytes, header needs {need}", bytes.len())));
    }
    let data = &bytes[h.vox_offset..need];
    macro_rules! decode {
        ($t:ty) => {
            data.chunks_exact(size)
                .map(|c| {
                    let a = c.try_into().unwrap();
                    (if h.little_endian { <$t>::from_le_bytes(a) } else { <$t>::from_be_bytes(a) }) as f64
                })
                .collect()
        };
    }
    Ok(match h.datatype {
        2 => data.iter().map(|&v| v as f64).collect(),
        256 => data.iter().map(|&v| v as i8 as f64).collect(),
        4 => decode!(i16),
        512 => decode!(u16),
        8 => decode!(i32),
        768 => decode!(u32),
        16 => decode!(f32),
        64 => decode!(f64),
        1024 => decode!(i64),
        1280 => decode!(u64),
        other => return Err(invalid(path, format!("unsupported NIfTI datatype code {other}"))),
    })
}

/// Storage order (x fastest) into a [z, y, x] array: the same memory layout, so only the shape changes.
fn to_zyx<T>(shape_xyz: [usize; 3], values: Vec<T>) -> Array3<T> {
    Array3::from_shape_vec((shape_xyz[2], shape_xyz[1], shape_xyz[0]), values).expect("voxel count matches the shape")
}

fn read_scaled(path: &Path) -> Result<(RawHeader, Vec<f64>), NiftiIoError> {
    let bytes = read_file_bytes(path)?;
    let h = parse_header(path, &bytes)?;
    let mut values = decode_voxels(path, &h, &bytes)?;
    // nibabel: a zero or non-finite slope means "no scaling".
    if h.scl_slope != 0.0 && h.scl_slope.is_finite() {
        if !h.scl_inter.is_finite() {
            return Err(invalid(path, format!("valid scl_slope but invalid scl_inter {}", h.scl_inter)));
        }
        if h.scl_slope != 1.0 || h.scl_inter != 0.0 {
            for v in values.iter_mut() {
                *v = *v * h.scl_slope + h.scl_inter;
            }
        }
    }
    Ok((h, values))
}

fn volume_from<T>(h: RawHeader, values: Vec<T>) -> Volume<T> {
    let p = h.spatial.pixdim;
    Volume {
        spacing: [p[3].abs(), p[2].abs(), p[1].abs()],
        affine: h.spatial.affine(h.shape_xyz),
        data: to_zyx(h.shape_xyz, values),
        header: h.spatial,
    }
}

/// Reads an image as f32 with scl_slope/scl_inter applied (as nibabel's `get_fdata`).
pub fn read_nifti(path: impl AsRef<Path>) -> Result<Volume<f32>, NiftiIoError> {
    let path = path.as_ref();
    let (h, values) = read_scaled(path)?;
    Ok(volume_from(h, values.into_iter().map(|v| v as f32).collect()))
}

/// Reads a label map; every (scaled) value must be a non-negative integer below 65536.
pub fn read_label_nifti(path: impl AsRef<Path>) -> Result<Volume<u16>, NiftiIoError> {
    let path = path.as_ref();
    let (h, values) = read_scaled(path)?;
    let mut labels = Vec::with_capacity(values.len());
    for (i, v) in values.into_iter().enumerate() {
        if !(v.fract() == 0.0 && (0.0..=65535.0).contains(&v)) {
            let [nx, ny, _] = h.shape_xyz;
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            return Err(invalid(
                path,
                format!("label value {v} at voxel (x {x}, y {y}, z {z}) is not a non-negative integer < 65536"),
            ));
        }
        labels.push(v as u16);
    }
    Ok(volume_from(h, labels))
}

/// Reads only the header: the shape [z, y, x], spacing [z, y, x] and geometry (cheap for `check`).
pub fn read_header(path: impl AsRef<Path>) -> Result<([usize; 3], [f64; 3], SpatialHeader), NiftiIoError> {
    let path = path.as_ref();
    let raw = fs::read(path).map_err(|source| NiftiIoError::Io { path: path.display().to_string(), source })?;
    let mut head = Vec::with_capacity(544);
    if raw.starts_with(&[0x1f, 0x8b]) {
        MultiGzDecoder::new(&raw[..])
            .take(544)
            .read_to_end(&mut head)
            .map_err(|e| invalid(path, format!("corrupt gzip stream: {e}")))?;
    } else {
        head.extend_from_slice(&raw[..raw.len().min(544)]);
    }
    let h = parse_header(path, &head)?;
    let [x, y, z] = h.shape_xyz;
    let p = h.spatial.pixdim;
    Ok(([z, y, x], [p[3].abs(), p[2].abs(), p[1].abs()], h.spatial))
}

/// A NIfTI-1 header carrying `spatial`'s geometry (the writer fills shape, datatype and offset).
fn nifti1_header(spatial: &SpatialHeader) -> nifti::NiftiHeader {
    let f = |v: f64| v as f32;
    let mut pixdim = [1.0f32; 8];
    for (i, v) in spatial.pixdim.iter().enumerate() {
        pixdim[i] = *v as f32;
    }
    nifti::NiftiHeader {
        pixdim,
        qform_code: spatial.qform_code,
        sform_code: spatial.sform_code,
        quatern_b: f(spatial.quatern[0]),
        quatern_c: f(spatial.quatern[1]),
        quatern_d: f(spatial.quatern[2]),
        quatern_x: f(spatial.qoffset[0]),
        quatern_y: f(spatial.qoffset[1]),
        quatern_z: f(spatial.qoffset[2]),
        srow_x: spatial.srow[0].map(f),
        srow_y: spatial.srow[1].map(f),
        srow_z: spatial.srow[2].map(f),
        xyzt_units: spatial.xyzt_units,
        ..Default::default()
    }
}

fn write_typed<T>(path: &Path, data: &Array3<T>, spatial: &SpatialHeader) -> anyhow::Result<()>
where
    T: nifti::DataElement + bytemuck::Pod + Clone,
{
    use anyhow::Context;
    let (nz, ny, nx) = data.dim();
    // [z, y, x] in standard layout is x-fastest, i.e. Fortran order of an (x, y, z) array.
    let values: Vec<T> = data.iter().cloned().collect();
    let xyz = ndarray17::Array3::from_shape_vec(ndarray17::ShapeBuilder::f((nx, ny, nz)), values).context("shape")?;
    let header = nifti1_header(spatial);
    let gz = path.to_string_lossy().ends_with(".gz");
    nifti::writer::WriterOptions::new(path)
        .reference_header(&header)
        .compress(gz)
        .write_nifti(&xyz)
        .with_context(|| format!("{}: cannot write NIfTI", path.display()))
}

/// Writes a uint8 mask with the source image's geometry (qform and sform as in the source header).
pub fn write_mask_nifti(path: impl AsRef<Path>, mask: &Array3<u8>, source: &SpatialHeader) -> anyhow::Result<()> {
    write_typed(path.as_ref(), mask, source)
}

/// Writes an int16 image (CT in HU) with the given geometry.
pub fn write_i16_nifti(path: impl AsRef<Path>, data: &Array3<i16>, spatial: &SpatialHeader) -> anyhow::Result<()> {
    write_typed(path.as_ref(), data, spatial)
}

/// Writes a float32 image with the given geometry.
pub fn write_f32_nifti(path: impl AsRef<Path>, data: &Array3<f32>, spatial: &SpatialHeader) -> anyhow::Result<()> {
    write_typed(path.as_ref(), data, spatial)
}
