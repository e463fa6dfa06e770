//! NIfTI reading and writing.
//!
//! Images are single files (`.nii`, `.nii.gz`) or `.hdr`/`.img` pairs (either may be gzipped);
//! naming either file of a pair reads the pair. 3D readers take 3D images and 4D images with one
//! volume; [`read_nifti_channels`] reads a 4D image's volumes as channels (the MSD layout), and
//! [`read_channel_files`] one 3D file per channel (nnU-Net's `_0000`, `_0001`, ...).
//!
//! NIfTI-1 headers are parsed by the `nifti` crate and masks are written with its writer. The crate
//! has no NIfTI-2 support, so the 540-byte NIfTI-2 header is parsed here. Voxel data are decoded
//! here for both versions (the crate's typed conversions refuse cross-type reads such as i16 -> f32).
//! Geometry follows nibabel exactly: the affine comes from the sform when `sform_code > 0`, else
//! the qform when `qform_code > 0`, else nibabel's centred "base" affine from the zooms.

use std::fs;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

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
    /// dim[1..=dim[0]] as stored, for messages.
    dims: Vec<usize>,
    shape_xyz: [usize; 3],
    /// The 4th dimension: time points, or the channels of an MSD image; 1 for a 3D image.
    volumes: usize,
    datatype: i16,
    /// Where the voxels start in the file that holds them (the `.nii`, or the `.img` of a pair).
    vox_offset: usize,
    scl_slope: f64,
    scl_inter: f64,
    little_endian: bool,
    spatial: SpatialHeader,
}

impl RawHeader {
    fn voxels_per_volume(&self) -> usize {
        self.shape_xyz.iter().product()
    }

    /// The refusal of a multi-volume image where one 3D volume is expected (an image of a
    /// single-channel dataset, a label map, a header read for `check`).
    fn expect_3d(&self, path: &Path) -> Result<(), NiftiIoError> {
        if self.volumes == 1 {
            return Ok(());
        }
        let n = self.volumes;
        Err(invalid(
            path,
            format!(
                "a 4D image with {n} volumes (dimensions {:?}) where one 3D volume is expected; a 4D image is read \
                 as channels only for a dataset that declares {n} input channels",
                self.dims
            ),
        ))
    }
}

/// Where an image's header and voxels live: a `.nii` holds both; a NIfTI pair keeps the header in
/// `.hdr` and the voxels in `.img` (both gzipped or neither, as nibabel names them). Either file of
/// a pair names the pair, as in nibabel.
struct Files {
    header: PathBuf,
    voxels: PathBuf,
}

impl Files {
    fn locate(path: &Path) -> Files {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Files { header: path.to_path_buf(), voxels: path.to_path_buf() };
        };
        let lower = name.to_ascii_lowercase();
        let base_len = lower.strip_suffix(".gz").unwrap_or(&lower).len();
        let ext_at = base_len.saturating_sub(4);
        // ASCII lowercasing keeps byte positions, so the extension found in `lower` is at the same
        // place in `name`; the companion keeps the extension's case (nibabel accepts .HDR/.IMG).
        let companion = |to: &str| {
            let ext = &name[ext_at + 1..base_len];
            let to =
                if ext.starts_with(|c: char| c.is_ascii_uppercase()) { to.to_ascii_uppercase() } else { to.into() };
            path.with_file_name(format!("{}{to}{}", &name[..ext_at + 1], &name[base_len..]))
        };
        match &lower[ext_at..base_len] {
            ".hdr" => Files { header: path.to_path_buf(), voxels: companion("img") },
            ".img" => Files { header: companion("hdr"), voxels: path.to_path_buf() },
            _ => Files { header: path.to_path_buf(), voxels: path.to_path_buf() },
        }
    }

    fn is_pair(&self) -> bool {
        self.header != self.voxels
    }
}

/// A parsed header with the (decompressed) bytes that hold its voxels.
struct RawImage {
    header: RawHeader,
    bytes: Vec<u8>,
    /// The file the voxels come from, named in errors about them.
    voxels_path: PathBuf,
}

fn read_file_bytes(path: &Path) -> Result<Vec<u8>, NiftiIoError> {
    let raw = fs::read(path).map_err(|source| NiftiIoError::Io { path: path.display().to_string(), source })?;
    gunzip_if_gzipped(path, raw)
}

fn gunzip_if_gzipped(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, NiftiIoError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| invalid(path, format!("corrupt or truncated gzip stream: {e}")))?;
    Ok(out)
}

fn read_raw(path: &Path) -> Result<RawImage, NiftiIoError> {
    let files = Files::locate(path);
    let head = read_file_bytes(&files.header)?;
    let header = parse_header(&files.header, &head, files.is_pair())?;
    let bytes = if files.is_pair() {
        let raw = fs::read(&files.voxels).map_err(|e| {
            invalid(&files.voxels, format!("cannot read the voxel file of the header {}: {e}", files.header.display()))
        })?;
        gunzip_if_gzipped(&files.voxels, raw)?
    } else {
        head
    };
    check_length(&files.voxels, &header, bytes.len())?;
    Ok(RawImage { header, bytes, voxels_path: files.voxels })
}

fn parse_header(path: &Path, bytes: &[u8], pair: bool) -> Result<RawHeader, NiftiIoError> {
    if bytes.len() < 348 {
        return Err(invalid(path, format!("file too short for a NIfTI header ({} bytes)", bytes.len())));
    }
    let size_le = i32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let size_be = i32::from_be_bytes(bytes[0..4].try_into().unwrap());
    match (size_le, size_be) {
        (348, _) | (_, 348) => {
            check_magic(path, &bytes[344..348], '1', pair)?;
            parse_nifti1(path, bytes, pair)
        }
        (540, _) | (_, 540) if bytes.len() < 540 => Err(invalid(path, "file too short for a NIfTI-2 header")),
        (540, _) | (_, 540) => {
            check_magic(path, &bytes[4..8], '2', pair)?;
            parse_nifti2(path, bytes, size_le == 540, pair)
        }
        _ => Err(invalid(path, format!("not a NIfTI file (sizeof_hdr {size_le})"))),
    }
}

/// The magic says where the voxels are: "n+1"/"n+2" after the header in the same file, "ni1"/"ni2"
/// in a separate `.img`. A 348-byte header without either is Analyze 7.5, whose orientation
/// conventions differ, so it is refused rather than guessed.
fn check_magic(path: &Path, magic: &[u8], version: char, pair: bool) -> Result<(), NiftiIoError> {
    let single = format!("n+{version}");
    let paired = format!("ni{version}");
    let found = &magic[..3];
    if found == single.as_bytes() && !pair || found == paired.as_bytes() && pair {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(&magic[..3]).into_owned();
    Err(invalid(
        path,
        if found == paired.as_bytes() {
            format!("magic \"{paired}\" says the voxels are in a separate .img file: name the .hdr or .img of the pair")
        } else if found == single.as_bytes() {
            format!("magic \"{single}\" marks a single-file .nii image, but the file is named as a .hdr/.img pair")
        } else if version == '1' {
            format!(
                "no NIfTI magic (found {shown:?}): an Analyze 7.5 header, which is not read (convert it to NIfTI, e.g. \
                 with nibabel)"
            )
        } else {
            format!("bad NIfTI-2 magic {shown:?}")
        },
    ))
}

fn parse_nifti1(path: &Path, bytes: &[u8], pair: bool) -> Result<RawHeader, NiftiIoError> {
    let h = nifti::NiftiHeader::from_reader(bytes).map_err(|e| invalid(path, format!("bad NIfTI-1 header: {e}")))?;
    let dims = stored_dims(path, h.dim[0] as i64, |i| h.dim[i] as i64)?;
    refuse_cifti(path, h.intent_code as i32)?;
    let spatial = SpatialHeader {
        pixdim: std::array::from_fn(|i| h.pixdim[i] as f64),
        qform_code: h.qform_code,
        sform_code: h.sform_code,
        quatern: [h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64],
        qoffset: [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64],
        srow: [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(|v| v as f64)),
        xyzt_units: h.xyzt_units,
    };
    let (shape_xyz, volumes) = spatial_shape(path, &dims)?;
    // In a pair the offset counts from the start of the .img (usually 0); a single file's voxels
    // cannot start inside its own header.
    let min_offset = if pair { 0.0 } else { 348.0 };
    Ok(RawHeader {
        dims,
        shape_xyz,
        volumes,
        datatype: h.datatype,
        vox_offset: h.vox_offset.max(min_offset) as usize,
        scl_slope: h.scl_slope as f64,
        scl_inter: h.scl_inter as f64,
        little_endian: h.endianness == nifti::Endianness::Little,
        spatial,
    })
}

/// Reads a NIfTI-2 header (540 bytes; layout from nifti2.h).
fn parse_nifti2(path: &Path, b: &[u8], le: bool, pair: bool) -> Result<RawHeader, NiftiIoError> {
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
    let dims = stored_dims(path, i64_at(16), |i| i64_at(16 + 8 * i))?;
    refuse_cifti(path, i32_at(504))?;
    let spatial = SpatialHeader {
        pixdim: std::array::from_fn(|i| f64_at(104 + 8 * i)),
        qform_code: i32_at(344) as i16,
        sform_code: i32_at(348) as i16,
        quatern: [f64_at(352), f64_at(360), f64_at(368)],
        qoffset: [f64_at(376), f64_at(384), f64_at(392)],
        srow: std::array::from_fn(|r| std::array::from_fn(|c| f64_at(400 + 32 * r + 8 * c))),
        xyzt_units: i32_at(500) as u8,
    };
    let (shape_xyz, volumes) = spatial_shape(path, &dims)?;
    let min_offset = if pair { 0 } else { 540 };
    Ok(RawHeader {
        dims,
        shape_xyz,
        volumes,
        datatype: i16_at(12),
        vox_offset: usize::try_from(i64_at(168)).unwrap_or(0).max(min_offset),
        scl_slope: f64_at(176),
        scl_inter: f64_at(184),
        little_endian: le,
        spatial,
    })
}

/// dim[1..=dim[0]], each a non-negative size.
fn stored_dims(path: &Path, ndim: i64, dim: impl Fn(usize) -> i64) -> Result<Vec<usize>, NiftiIoError> {
    if !(1..=7).contains(&ndim) {
        return Err(invalid(path, format!("invalid dim[0] = {ndim}")));
    }
    (1..=ndim as usize)
        .map(|i| usize::try_from(dim(i)).map_err(|_| invalid(path, format!("negative dim[{i}] = {}", dim(i)))))
        .collect()
}

/// CIFTI-2 files are NIfTI-2 on disk, but their dimensions index grayordinates and parcels, not
/// voxels; nibabel reads them as `Cifti2Image`, not as a volume.
fn refuse_cifti(path: &Path, intent_code: i32) -> Result<(), NiftiIoError> {
    if (3000..3100).contains(&intent_code) {
        return Err(invalid(
            path,
            format!("a CIFTI-2 file (NIfTI intent code {intent_code}): a matrix over brain grayordinates, not an image volume"),
        ));
    }
    Ok(())
}

/// The three spatial dimensions and the number of volumes (the 4th dimension); dimensions 5 to 7
/// must be singletons.
fn spatial_shape(path: &Path, dims: &[usize]) -> Result<([usize; 3], usize), NiftiIoError> {
    if let Some(last) = dims.iter().rposition(|&d| d > 1).filter(|&i| i >= 4) {
        return Err(invalid(
            path,
            format!(
                "a {}D image (dimensions {dims:?}): only 3D volumes and 4D images (the 4th dimension as channels) are read",
                last + 1
            ),
        ));
    }
    let dim = |i: usize| dims.get(i).copied().unwrap_or(1);
    if (0..4).any(|i| dim(i) == 0) {
        return Err(invalid(path, format!("zero-sized dimension in {dims:?}")));
    }
    Ok(([dim(0), dim(1), dim(2)], dim(3)))
}

fn datatype_size(path: &Path, datatype: i16) -> Result<usize, NiftiIoError> {
    Ok(match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 | 768 => 4,
        64 | 1024 | 1280 => 8,
        other => return Err(unsupported_datatype(path, other)),
    })
}

/// Names the NIfTI types that are not read: none is a scalar intensity an image channel can hold
/// without choosing a conversion (complex parts, RGB triplets) or losing precision silently.
fn unsupported_datatype(path: &Path, code: i16) -> NiftiIoError {
    let name = match code {
        0 => "unknown",
        1 => "binary (1 bit)",
        32 => "complex64",
        128 => "RGB24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "RGBA32",
        _ => "not a NIfTI type",
    };
    invalid(
        path,
        format!(
            "unsupported NIfTI datatype {name} (code {code}): only integer, float32 and float64 voxels are read \
             (convert the image to one of those)"
        ),
    )
}

fn check_length(path: &Path, h: &RawHeader, len: usize) -> Result<(), NiftiIoError> {
    let need = h.vox_offset + h.voxels_per_volume() * h.volumes * datatype_size(path, h.datatype)?;
    if len < need {
        return Err(invalid(path, format!("truncated voxel data: {len} bytes, header needs {need}")));
    }
    Ok(())
}

/// Decodes `count` voxels from voxel `first` on (x fastest, as stored) into f64, without scaling.
/// The length was checked by `check_length`.
fn decode_voxels(
    path: &Path,
    h: &RawHeader,
    bytes: &[u8],
    first: usize,
    count: usize,
) -> Result<Vec<f64>, NiftiIoError> {
    let size = datatype_size(path, h.datatype)?;
    let start = h.vox_offset + first * size;
    let data = &bytes[start..start + count * size];
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
        other => return Err(unsupported_datatype(path, other)),
    })
}

/// Storage order (x fastest) into a [z, y, x] array: the same memory layout, so only the shape changes.
fn to_zyx<T>(shape_xyz: [usize; 3], values: Vec<T>) -> Array3<T> {
    Array3::from_shape_vec((shape_xyz[2], shape_xyz[1], shape_xyz[0]), values).expect("voxel count matches the shape")
}

/// scl_slope/scl_inter as nibabel applies them: None when they leave the values unchanged (a zero
/// or non-finite slope means "no scaling").
fn scaling(path: &Path, h: &RawHeader) -> Result<Option<(f64, f64)>, NiftiIoError> {
    if h.scl_slope == 0.0 || !h.scl_slope.is_finite() {
        return Ok(None);
    }
    if !h.scl_inter.is_finite() {
        return Err(invalid(path, format!("valid scl_slope but invalid scl_inter {}", h.scl_inter)));
    }
    Ok((h.scl_slope != 1.0 || h.scl_inter != 0.0).then_some((h.scl_slope, h.scl_inter)))
}

/// The scaled values of volume `index` (0 for a 3D image).
fn scaled_volume(path: &Path, raw: &RawImage, index: usize) -> Result<Vec<f64>, NiftiIoError> {
    let h = &raw.header;
    let n = h.voxels_per_volume();
    let mut values = decode_voxels(&raw.voxels_path, h, &raw.bytes, index * n, n)?;
    if let Some((slope, inter)) = scaling(path, h)? {
        values.iter_mut().for_each(|v| *v = *v * slope + inter);
    }
    Ok(values)
}

fn read_scaled(path: &Path) -> Result<(RawHeader, Vec<f64>), NiftiIoError> {
    let raw = read_raw(path)?;
    raw.header.expect_3d(path)?;
    let values = scaled_volume(path, &raw, 0)?;
    Ok((raw.header, values))
}

fn spacing_zyx(spatial: &SpatialHeader) -> [f64; 3] {
    let p = spatial.pixdim;
    [p[3].abs(), p[2].abs(), p[1].abs()]
}

fn volume_from<T>(h: RawHeader, values: Vec<T>) -> Volume<T> {
    Volume {
        spacing: spacing_zyx(&h.spatial),
        affine: h.spatial.affine(h.shape_xyz),
        data: to_zyx(h.shape_xyz, values),
        header: h.spatial,
    }
}

/// Reads a 3D image as f32 with scl_slope/scl_inter applied (as nibabel's `get_fdata`). A `.nii`,
/// `.nii.gz`, or either file of a `.hdr`/`.img` pair; a 4D image with one volume reads as 3D, one
/// with several volumes is refused (see [`read_nifti_channels`]).
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

/// A multi-channel image: one [z, y, x] volume per input channel, all on one grid.
#[derive(Debug, Clone)]
pub struct ChannelImage {
    /// One volume per channel, in channel order (the 4th dimension of an MSD image, or the
    /// `_0000`, `_0001`, ... files of an nnU-Net case).
    pub channels: Vec<Array3<f32>>,
    /// Voxel size in mm, [z, y, x].
    pub spacing: [f64; 3],
    /// Voxel index (x, y, z) to world (mm), as nibabel's `img.affine`.
    pub affine: [[f64; 4]; 4],
    /// The (first) source header's geometry, for writing outputs that overlay the source.
    pub header: SpatialHeader,
}

impl ChannelImage {
    /// The spatial shape [z, y, x] every channel has.
    pub fn shape(&self) -> [usize; 3] {
        let (z, y, x) = self.channels[0].dim();
        [z, y, x]
    }

    /// The channels as separate 3D volumes, each carrying the shared geometry.
    pub fn into_volumes(self) -> Vec<Volume<f32>> {
        let (spacing, affine, header) = (self.spacing, self.affine, self.header);
        self.channels.into_iter().map(|data| Volume { data, spacing, affine, header: header.clone() }).collect()
    }
}

/// Reads an image's volumes as channels: a 4D image (the MSD layout, e.g. BrainTumour's FLAIR, T1w,
/// T1gd, T2w) gives one channel per volume along its 4th dimension, in order; a 3D image gives one.
/// Values are scaled as by [`read_nifti`].
pub fn read_nifti_channels(path: impl AsRef<Path>) -> Result<ChannelImage, NiftiIoError> {
    let path = path.as_ref();
    let raw = read_raw(path)?;
    let h = &raw.header;
    let channels = (0..h.volumes)
        .map(|c| Ok(to_zyx(h.shape_xyz, scaled_volume(path, &raw, c)?.into_iter().map(|v| v as f32).collect())))
        .collect::<Result<Vec<_>, NiftiIoError>>()?;
    Ok(ChannelImage {
        channels,
        spacing: spacing_zyx(&h.spatial),
        affine: h.spatial.affine(h.shape_xyz),
        header: raw.header.spatial,
    })
}

/// Reads one 3D file per channel (nnU-Net's `<case>_0000`, `_0001`, ... in channel order) into one
/// image; every file must have the first file's shape and geometry (nnU-Net's tolerance:
/// numpy's `allclose`), since the channels are sampled voxel by voxel together.
pub fn read_channel_files<P: AsRef<Path>>(paths: &[P]) -> Result<ChannelImage, NiftiIoError> {
    let Some((first_path, rest)) = paths.split_first() else {
        return Err(invalid(Path::new("(no files)"), "a case needs at least one channel file"));
    };
    let first = read_nifti(first_path)?;
    let mut image =
        ChannelImage { spacing: first.spacing, affine: first.affine, header: first.header, channels: vec![first.data] };
    for path in rest {
        let path = path.as_ref();
        let vol = read_nifti(path)?;
        let (a, b) = (first_path.as_ref().display(), path.display());
        if vol.data.dim() != image.channels[0].dim() {
            let shape = |d: (usize, usize, usize)| [d.2, d.1, d.0];
            return Err(invalid(
                path,
                format!(
                    "shape (x, y, z) {:?} differs from {:?} of the case's first channel {a}",
                    shape(vol.data.dim()),
                    shape(image.channels[0].dim())
                ),
            ));
        }
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-8 + 1e-5 * y.abs();
        if !vol.affine.iter().flatten().zip(image.affine.iter().flatten()).all(|(&x, &y)| close(x, y)) {
            return Err(invalid(
                path,
                format!(
                    "affine {:?} differs from {:?} of the case's first channel {a} ({b})",
                    vol.affine, image.affine
                ),
            ));
        }
        image.channels.push(vol.data);
    }
    Ok(image)
}

/// What a header says about an image, read without its voxels (cheap, for `check`).
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// Spatial shape [z, y, x].
    pub shape: [usize; 3],
    /// Volumes along the 4th dimension (1 for a 3D image).
    pub channels: usize,
    /// Voxel size in mm, [z, y, x].
    pub spacing: [f64; 3],
    pub header: SpatialHeader,
}

/// Reads only the header of a 3D or 4D image (the `.hdr` of a pair).
pub fn read_image_info(path: impl AsRef<Path>) -> Result<ImageInfo, NiftiIoError> {
    Ok(info_of(read_raw_header(path.as_ref())?))
}

fn read_raw_header(path: &Path) -> Result<RawHeader, NiftiIoError> {
    let files = Files::locate(path);
    parse_header(&files.header, &read_head_bytes(&files.header)?, files.is_pair())
}

fn info_of(h: RawHeader) -> ImageInfo {
    let [x, y, z] = h.shape_xyz;
    ImageInfo { shape: [z, y, x], channels: h.volumes, spacing: spacing_zyx(&h.spatial), header: h.spatial }
}

/// The first 544 (decompressed) bytes: room for either header version and the extension flag.
fn read_head_bytes(path: &Path) -> Result<Vec<u8>, NiftiIoError> {
    let file = fs::File::open(path).map_err(|source| NiftiIoError::Io { path: path.display().to_string(), source })?;
    let mut raw = Vec::with_capacity(544);
    let mut reader = std::io::BufReader::new(file);
    let gz = reader.fill_buf().map(|b| b.starts_with(&[0x1f, 0x8b])).unwrap_or(false);
    let result = if gz {
        MultiGzDecoder::new(reader).take(544).read_to_end(&mut raw)
    } else {
        reader.take(544).read_to_end(&mut raw)
    };
    result.map_err(|e| invalid(path, format!("corrupt or unreadable header: {e}")))?;
    Ok(raw)
}

/// Reads only the header of a 3D image: the shape [z, y, x], spacing [z, y, x] and geometry; a 4D
/// image with several volumes is refused as by [`read_nifti`].
pub fn read_header(path: impl AsRef<Path>) -> Result<([usize; 3], [f64; 3], SpatialHeader), NiftiIoError> {
    let path = path.as_ref();
    let h = read_raw_header(path)?;
    h.expect_3d(path)?;
    let info = info_of(h);
    Ok((info.shape, info.spacing, info.header))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn located(path: &str) -> (String, String) {
        let f = Files::locate(Path::new(path));
        (f.header.display().to_string(), f.voxels.display().to_string())
    }

    #[test]
    fn either_file_of_a_pair_names_the_pair() {
        let pair = |h: &str, i: &str| (h.to_string(), i.to_string());
        assert_eq!(located("/d/a.hdr"), pair("/d/a.hdr", "/d/a.img"));
        assert_eq!(located("/d/a.img"), pair("/d/a.hdr", "/d/a.img"));
        assert_eq!(located("/d/a.b.hdr.gz"), pair("/d/a.b.hdr.gz", "/d/a.b.img.gz"));
        assert_eq!(located("/d/a.img.gz"), pair("/d/a.hdr.gz", "/d/a.img.gz"));
        assert_eq!(located("/d/A.HDR"), pair("/d/A.HDR", "/d/A.IMG"));
        assert_eq!(located("/d/a.nii.gz"), pair("/d/a.nii.gz", "/d/a.nii.gz"));
        assert_eq!(located("/d/img"), pair("/d/img", "/d/img"));
        assert!(!Files::locate(Path::new("/d/a.nii")).is_pair());
    }
}
