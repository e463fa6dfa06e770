//! Phantom CT sites: CT-like volumes in HU with per-case anatomy, written as nnU-Net v2 folders
//! for sites that each annotate a different, partly overlapping set of structures.
//!
//! Anatomy is defined in millimetres (a body about 30 cm across, organs of adult size), and each
//! case draws its field of view (34–40 cm in-plane, 19–25 cm along z); the voxel grid `shape`
//! then sets the spacing: `[96, 512, 512]` gives clinical CT spacings (0.7 mm in-plane, ~2.3 mm
//! slices), `[48, 128, 128]` a coarse scan for CPU runs. Structures keep their physical size
//! whatever the grid, so a model's target spacing decides what it can resolve, as with real
//! data. Everything derives from the seed: the same options give byte-identical files.
//!
//! An MR site ([`SiteKind::MrLiver`]) images the same kind of anatomy as two contrasts, T1- and
//! T2-like (channels `T1`, `T2`, one `_0000`/`_0001` file each): arbitrary units with a gain drawn
//! per case and channel and a smooth bias field, exactly zero outside the body (the nonzero mask
//! of MR), so only a per-image normalization makes cases comparable.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ndarray::Array3;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr_free::normal;
use serde::{Deserialize, Serialize};

use crate::nifti_io::{write_f32_nifti, write_i16_nifti, write_mask_nifti, SpatialHeader};
use fedtalent_vocab::ClassRegion;

/// Box–Muller normal samples (avoids a dependency on rand_distr).
mod rand_distr_free {
    use rand::Rng;
    pub fn normal<R: Rng>(rng: &mut R) -> f64 {
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// The annotation protocol of a phantom site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// liver (incl. tumour) and liver tumour.
    Liver,
    /// pancreas (incl. tumour) and pancreas tumour.
    Pancreas,
    /// liver, spleen, kidneys, pancreas; no tumour classes.
    MultiOrgan,
    /// kidney (incl. tumour) and kidney tumour.
    Kidney,
    /// Like `Liver`, but the liver excludes its vessels (a different protocol).
    LiverNoVessels,
    /// Like `Liver`, but the liver is drawn 2 voxels wider in-plane (a different protocol).
    LiverWide,
    /// Liver protocol on two-channel MR (T1, T2) instead of CT.
    MrLiver,
}

impl std::str::FromStr for SiteKind {
    type Err = anyhow::Error;

    /// A kind by its [`SiteKind::name`].
    fn from_str(name: &str) -> Result<Self> {
        const ALL: [SiteKind; 7] = [
            SiteKind::Liver,
            SiteKind::Pancreas,
            SiteKind::MultiOrgan,
            SiteKind::Kidney,
            SiteKind::LiverNoVessels,
            SiteKind::LiverWide,
            SiteKind::MrLiver,
        ];
        ALL.into_iter().find(|k| k.name() == name).with_context(|| {
            format!("unknown phantom site {name:?} (liver, pancreas, multiorgan, kidney, liver_novessels, liver_wide, mr_liver)")
        })
    }
}

impl SiteKind {
    pub fn name(self) -> &'static str {
        match self {
            SiteKind::Liver => "liver",
            SiteKind::Pancreas => "pancreas",
            SiteKind::MultiOrgan => "multiorgan",
            SiteKind::Kidney => "kidney",
            SiteKind::LiverNoVessels => "liver_novessels",
            SiteKind::LiverWide => "liver_wide",
            SiteKind::MrLiver => "mr_liver",
        }
    }

    /// Whether the site images MR (two channels) rather than CT.
    pub fn is_mr(self) -> bool {
        self == SiteKind::MrLiver
    }

    /// The input channels its dataset.json declares (`channel_names`).
    pub fn channel_names(self) -> &'static [&'static str] {
        match self {
            SiteKind::MrLiver => &MR_CHANNELS,
            _ => &["CT"],
        }
    }

    /// Label names by value (dataset.json) and the site's classes.
    pub fn labels(self) -> (Vec<(&'static str, u32)>, Vec<ClassRegion>) {
        let class = |name: &str, labels: &[u32]| ClassRegion { name: name.to_string(), labels: labels.to_vec() };
        match self {
            SiteKind::Liver | SiteKind::LiverNoVessels | SiteKind::LiverWide | SiteKind::MrLiver => {
                (vec![("liver", 1), ("liver_tumour", 2)], vec![class("liver", &[1, 2]), class("liver_tumour", &[2])])
            }
            SiteKind::Pancreas => (
                vec![("pancreas", 1), ("pancreas_tumour", 2)],
                vec![class("pancreas", &[1, 2]), class("pancreas_tumour", &[2])],
            ),
            SiteKind::Kidney => (
                vec![("kidney", 1), ("kidney_tumour", 2)],
                vec![class("kidney", &[1, 2]), class("kidney_tumour", &[2])],
            ),
            SiteKind::MultiOrgan => (
                vec![("liver", 1), ("spleen", 2), ("kidneys", 3), ("pancreas", 4)],
                vec![class("liver", &[1]), class("spleen", &[2]), class("kidneys", &[3]), class("pancreas", &[4])],
            ),
        }
    }
}

/// Options of [`generate_sites`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthOptions {
    pub seed: u64,
    pub cases_per_site: usize,
    /// Volume shape [z, y, x] in voxels.
    pub shape: [usize; 3],
    pub sites: Vec<SiteKind>,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            cases_per_site: 4,
            shape: [48, 128, 128],
            sites: vec![SiteKind::Liver, SiteKind::Pancreas, SiteKind::MultiOrgan],
        }
    }
}

/// A written phantom site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSite {
    pub name: String,
    pub dataset_dir: PathBuf,
    pub classes: Vec<ClassRegion>,
    /// The held-out test image (the same for every CT site; an MR site's is channel 0's file of
    /// the MR test case of the same anatomy) and its ground truth in this site's label encoding
    /// and protocol.
    pub test_image: PathBuf,
    pub test_label: PathBuf,
}

/// Structures of the ground truth, in painting order (later ones overwrite earlier ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Structure {
    None = 0,
    Liver = 1,
    LiverVessel = 2,
    LiverTumour = 3,
    Spleen = 4,
    Kidney = 5,
    KidneyTumour = 6,
    Pancreas = 7,
    PancreasTumour = 8,
}

/// An ellipsoid in mm, rotated about z by `angle`, with a wobbly surface.
#[derive(Debug, Clone, Copy)]
struct Blob {
    centre: [f64; 3],
    radii: [f64; 3],
    angle: f64,
    wobble: [f64; 3],
}

impl Blob {
    fn random<R: Rng>(rng: &mut R, centre: [f64; 3], radii: [f64; 3], jitter: f64) -> Blob {
        let mut j = |v: f64, s: f64| v + rng.gen_range(-s..=s);
        Blob {
            centre: [j(centre[0], jitter), j(centre[1], jitter), j(centre[2], jitter)],
            radii: [j(radii[0], radii[0] * 0.2), j(radii[1], radii[1] * 0.2), j(radii[2], radii[2] * 0.2)],
            angle: j(0.0, 0.35),
            wobble: [j(0.0, 0.12), j(0.0, 0.12), j(0.0, std::f64::consts::PI)],
        }
    }

    /// Normalized radius (< 1 inside) of point p = (x, y, z).
    fn radius(&self, p: [f64; 3]) -> f64 {
        let (s, c) = self.angle.sin_cos();
        let (dx, dy) = (p[0] - self.centre[0], p[1] - self.centre[1]);
        let (rx, ry) = (c * dx + s * dy, -s * dx + c * dy);
        let dz = p[2] - self.centre[2];
        let r = ((rx / self.radii[0]).powi(2) + (ry / self.radii[1]).powi(2) + (dz / self.radii[2]).powi(2)).sqrt();
        let theta = ry.atan2(rx);
        r * (1.0
            + self.wobble[0] * (2.0 * theta + self.wobble[2]).sin()
            + self.wobble[1] * (5.4 * dz / self.radii[2]).cos() * 0.5)
    }

    fn contains(&self, p: [f64; 3]) -> bool {
        self.radius(p) < 1.0
    }
}

/// A tube (vessel) from a to b with radius r.
#[derive(Debug, Clone, Copy)]
struct Tube {
    a: [f64; 3],
    b: [f64; 3],
    r: f64,
}

impl Tube {
    fn contains(&self, p: [f64; 3]) -> bool {
        let ab: [f64; 3] = std::array::from_fn(|i| self.b[i] - self.a[i]);
        let ap: [f64; 3] = std::array::from_fn(|i| p[i] - self.a[i]);
        let t = (ab.iter().zip(&ap).map(|(x, y)| x * y).sum::<f64>() / ab.iter().map(|x| x * x).sum::<f64>())
            .clamp(0.0, 1.0);
        let d2: f64 = (0..3).map(|i| (ap[i] - t * ab[i]).powi(2)).sum();
        d2 < self.r * self.r
    }
}

/// One case's anatomy.
struct Anatomy {
    body: [f64; 2],
    fat: f64,
    muscle: f64,
    spine: [f64; 3],
    lung_top: f64,
    liver: Blob,
    vessels: Vec<Tube>,
    liver_tumours: Vec<Blob>,
    spleen: Blob,
    kidneys: [Blob; 2],
    kidney_tumours: Vec<Blob>,
    pancreas: Blob,
    pancreas_tumours: Vec<Blob>,
    gas: Vec<Blob>,
    texture: Vec<([f64; 3], f64, f64)>,
}

/// A tumour: a sphere (slightly elongated along z) of radius `rmin..rmax` mm inside `organ`.
fn tumour_in<R: Rng>(rng: &mut R, organ: &Blob, rmin: f64, rmax: f64) -> Blob {
    let r = rng.gen_range(rmin..rmax);
    let c: [f64; 3] = std::array::from_fn(|i| organ.centre[i] + rng.gen_range(-0.35..0.35) * organ.radii[i]);
    Blob { centre: c, radii: [r, r, r * 1.2], angle: 0.0, wobble: [0.0; 3] }
}

impl Anatomy {
    /// A random abdomen in mm: x left→right of the image, y anterior→posterior, z head→feet,
    /// origin at the body's centre. Organ sizes follow adult abdominal CT (liver ~16 cm across,
    /// kidneys ~11 cm long, pancreas ~15 cm long and 2–3 cm thick); tumours are 1–3 cm
    /// (kidney, pancreas) and 2–5 cm (liver) across, sizes every class can be segmented at the
    /// CPU preset's 3–4 mm spacing.
    fn random<R: Rng>(rng: &mut R) -> Anatomy {
        let liver = Blob::random(rng, [-60.0, -5.0, -25.0], [75.0, 70.0, 75.0], 8.0);
        let vessels = (0..rng.gen_range(2..5))
            .map(|_| {
                let a = liver.centre;
                let b: [f64; 3] = std::array::from_fn(|i| a[i] + rng.gen_range(-0.9..0.9) * liver.radii[i]);
                Tube { a, b, r: rng.gen_range(4.0..7.0) }
            })
            .collect();
        let liver_tumours = (0..rng.gen_range(1..3)).map(|_| tumour_in(rng, &liver, 12.0, 24.0)).collect();
        let kidneys = [
            Blob::random(rng, [-62.0, 45.0, 25.0], [26.0, 30.0, 52.0], 5.0),
            Blob::random(rng, [62.0, 45.0, 30.0], [26.0, 30.0, 52.0], 5.0),
        ];
        let k = rng.gen_range(0..2);
        let kidney_tumours = (0..rng.gen_range(0..2)).map(|_| tumour_in(rng, &kidneys[k], 10.0, 16.0)).collect();
        let pancreas = Blob::random(rng, [10.0, 18.0, 5.0], [68.0, 15.0, 20.0], 5.0);
        let pancreas_tumours = (0..rng.gen_range(0..2)).map(|_| tumour_in(rng, &pancreas, 11.0, 16.0)).collect();
        let gas = (0..rng.gen_range(2..6))
            .map(|_| {
                let c = [rng.gen_range(-60.0..60.0), rng.gen_range(-75.0..-20.0), rng.gen_range(-30.0..110.0)];
                Blob::random(rng, c, [14.0, 12.0, 18.0], 0.0)
            })
            .collect();
        let texture = (0..4)
            .map(|_| {
                let k: [f64; 3] = std::array::from_fn(|_| rng.gen_range(-0.06..0.06));
                (k, rng.gen_range(0.0..std::f64::consts::TAU), rng.gen_range(3.0..8.0))
            })
            .collect();
        Anatomy {
            body: [rng.gen_range(145.0..175.0), rng.gen_range(105.0..125.0)],
            fat: rng.gen_range(8.0..22.0),
            muscle: rng.gen_range(8.0..14.0),
            spine: [rng.gen_range(-4.0..4.0), rng.gen_range(68.0..78.0), rng.gen_range(16.0..20.0)],
            lung_top: rng.gen_range(-105.0..-75.0),
            spleen: Blob::random(rng, [85.0, 20.0, -30.0], [30.0, 45.0, 50.0], 5.0),
            liver,
            vessels,
            liver_tumours,
            kidneys,
            kidney_tumours,
            pancreas,
            pancreas_tumours,
            gas,
            texture,
        }
    }

    fn texture(&self, p: [f64; 3]) -> f64 {
        self.texture.iter().map(|(k, ph, a)| a * (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).sin()).sum()
    }

    /// HU (before noise) and structure at p = (x, y, z) in mm.
    fn voxel(&self, p: [f64; 3]) -> (f64, Structure) {
        let [x, y, z] = p;
        let waist = 1.0 + 0.04 * (z / 45.0).sin();
        let body_r = ((x / (self.body[0] * waist)).powi(2) + (y / (self.body[1] * waist)).powi(2)).sqrt();
        if body_r >= 1.0 {
            return (-1000.0, Structure::None);
        }
        let depth = (1.0 - body_r) * self.body[1];
        if depth < 2.5 {
            return (40.0, Structure::None); // skin
        }
        if depth < self.fat {
            return (-100.0, Structure::None);
        }
        if depth < self.fat + self.muscle {
            return (50.0, Structure::None);
        }
        let spine_d = ((x - self.spine[0]).powi(2) + (y - self.spine[1]).powi(2)).sqrt();
        if spine_d < self.spine[2] {
            return (if spine_d > self.spine[2] * 0.8 { 900.0 } else { 250.0 }, Structure::None);
        }
        if z < self.lung_top && y < 50.0 && x.abs() > 20.0 && body_r < 0.8 {
            return (-850.0, Structure::None);
        }
        let (mut hu, mut s) = (15.0, Structure::None);
        if self.gas.iter().any(|g| g.contains(p)) {
            hu = -900.0;
        }
        let mut paint = |cond: bool, h: f64, st: Structure| {
            if cond {
                hu = h;
                s = st;
            }
        };
        let in_liver = self.liver.contains(p);
        paint(in_liver, 60.0, Structure::Liver);
        paint(in_liver && self.vessels.iter().any(|v| v.contains(p)), 160.0, Structure::LiverVessel);
        paint(in_liver && self.liver_tumours.iter().any(|t| t.contains(p)), 20.0, Structure::LiverTumour);
        paint(self.spleen.contains(p), 45.0, Structure::Spleen);
        let in_kidney = self.kidneys.iter().any(|k| k.contains(p));
        paint(in_kidney, 150.0, Structure::Kidney);
        paint(in_kidney && self.kidney_tumours.iter().any(|t| t.contains(p)), 70.0, Structure::KidneyTumour);
        let in_pancreas = self.pancreas.contains(p);
        paint(in_pancreas, 40.0, Structure::Pancreas);
        paint(in_pancreas && self.pancreas_tumours.iter().any(|t| t.contains(p)), 5.0, Structure::PancreasTumour);
        (hu, s)
    }
}

impl Scan {
    /// Visits every voxel of a grid of `shape` voxels of `spacing` mm centred on the body (z
    /// offset by `z_shift` mm), z then y then x: its index [z, y, x], its position (x, y, z) in
    /// mm, and the HU and structure there. Returns the structure map.
    fn visit(&self, shape: [usize; 3], mut f: impl FnMut([usize; 3], [f64; 3], f64, Structure)) -> Array3<u8> {
        let [nz, ny, nx] = shape;
        let mm = |i: usize, n: usize, s: f64| (i as f64 + 0.5 - n as f64 / 2.0) * s;
        let mut structures = Array3::<u8>::zeros((nz, ny, nx));
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let p = [
                        mm(x, nx, self.spacing[2]),
                        mm(y, ny, self.spacing[1]),
                        mm(z, nz, self.spacing[0]) + self.z_shift,
                    ];
                    let (hu, s) = self.anatomy.voxel(p);
                    structures[[z, y, x]] = s as u8;
                    f([z, y, x], p, hu, s);
                }
            }
        }
        structures
    }
}

/// Renders a case: HU image (with texture and noise) and the structure map.
fn render(scan: &Scan, shape: [usize; 3], rng: &mut ChaCha8Rng) -> (Array3<i16>, Array3<u8>) {
    let mut image = Array3::<i16>::zeros((shape[0], shape[1], shape[2]));
    let structures = scan.visit(shape, |i, p, hu, _| {
        let tex = if hu > -500.0 { scan.anatomy.texture(p) } else { 0.0 };
        let v = hu + tex + 12.0 * normal(rng);
        image[i] = v.round().clamp(-1024.0, 3071.0) as i16;
    });
    (image, structures)
}

/// In-plane (y, x) dilation by `r` voxels (Chebyshev), separable max filter.
fn dilate_in_plane(mask: &Array3<bool>, r: usize) -> Array3<bool> {
    let (nz, ny, nx) = mask.dim();
    let mut tmp = Array3::from_elem((nz, ny, nx), false);
    for ((z, y, x), v) in tmp.indexed_iter_mut() {
        *v = (x.saturating_sub(r)..(x + r + 1).min(nx)).any(|xx| mask[[z, y, xx]]);
    }
    let mut out = Array3::from_elem((nz, ny, nx), false);
    for ((z, y, x), v) in out.indexed_iter_mut() {
        *v = (y.saturating_sub(r)..(y + r + 1).min(ny)).any(|yy| tmp[[z, yy, x]]);
    }
    out
}

/// The site's label map from the structure map, following its protocol.
pub fn encode_labels(kind: SiteKind, structures: &Array3<u8>) -> Array3<u8> {
    use Structure as S;
    let is = |v: u8, s: &[S]| s.iter().any(|&t| t as u8 == v);
    let liver_all = [S::Liver, S::LiverVessel, S::LiverTumour];
    match kind {
        SiteKind::Liver | SiteKind::MrLiver => {
            structures.mapv(|v| if is(v, &[S::LiverTumour]) { 2 } else { is(v, &liver_all) as u8 })
        }
        SiteKind::LiverNoVessels => {
            structures.mapv(|v| if is(v, &[S::LiverTumour]) { 2 } else { is(v, &[S::Liver]) as u8 })
        }
        SiteKind::LiverWide => {
            let liver = structures.mapv(|v| is(v, &liver_all));
            let wide = dilate_in_plane(&liver, 2);
            let mut out = wide.mapv(|b| b as u8);
            ndarray::Zip::from(&mut out).and(structures).for_each(|o, &v| {
                if is(v, &[S::LiverTumour]) {
                    *o = 2;
                }
            });
            out
        }
        SiteKind::Pancreas => {
            structures.mapv(|v| if is(v, &[S::PancreasTumour]) { 2 } else { is(v, &[S::Pancreas]) as u8 })
        }
        SiteKind::Kidney => structures.mapv(|v| if is(v, &[S::KidneyTumour]) { 2 } else { is(v, &[S::Kidney]) as u8 }),
        SiteKind::MultiOrgan => structures.mapv(|v| {
            if is(v, &liver_all) {
                1
            } else if is(v, &[S::Spleen]) {
                2
            } else if is(v, &[S::Kidney, S::KidneyTumour]) {
                3
            } else if is(v, &[S::Pancreas, S::PancreasTumour]) {
                4
            } else {
                0
            }
        }),
    }
}

fn stream_seed(seed: u64, stream: &str, index: usize) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&seed.to_le_bytes());
    ctx.update(stream.as_bytes());
    ctx.update(&(index as u64).to_le_bytes());
    u64::from_le_bytes(ctx.finish().as_ref()[..8].try_into().unwrap())
}

/// A phantom case: image (CT in HU by default; [`PhantomMrCase`]'s two MR channels), structure
/// map and geometry.
pub struct PhantomCase<I = Array3<i16>> {
    pub image: I,
    pub structures: Array3<u8>,
    pub header: SpatialHeader,
    pub spacing: [f64; 3],
}

/// Generates one case deterministically from (seed, stream, index): its field of view is drawn
/// and divided into `shape` voxels (see the module doc).
pub fn phantom_case(seed: u64, stream: &str, index: usize, shape: [usize; 3]) -> PhantomCase {
    phantom_rendered(seed, stream, index, shape, render)
}

/// A case drawn from (seed, stream, index) and rendered by `render`: the same anatomy and field
/// of view whatever renders it.
fn phantom_rendered<I>(
    seed: u64,
    stream: &str,
    index: usize,
    shape: [usize; 3],
    render: impl Fn(&Scan, [usize; 3], &mut ChaCha8Rng) -> (I, Array3<u8>),
) -> PhantomCase<I> {
    let (mut rng, scan) = draw_scan(seed, stream, index, shape);
    let (image, structures) = render(&scan, shape, &mut rng);
    PhantomCase { image, structures, header: scan.header, spacing: scan.spacing }
}

/// A case's anatomy and field of view, and the generator that goes on to render it.
struct Scan {
    anatomy: Anatomy,
    spacing: [f64; 3],
    z_shift: f64,
    header: SpatialHeader,
}

fn draw_scan(seed: u64, stream: &str, index: usize, shape: [usize; 3]) -> (ChaCha8Rng, Scan) {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, stream, index));
    let anatomy = Anatomy::random(&mut rng);
    let fov_xy = rng.gen_range(340.0..400.0);
    let fov_z = rng.gen_range(190.0..250.0);
    let z_shift = rng.gen_range(-10.0..10.0);
    let spacing = [fov_z / shape[0] as f64, fov_xy / shape[1] as f64, fov_xy / shape[2] as f64];
    let origin = [rng.gen_range(-200.0..-150.0), rng.gen_range(-200.0..-150.0), rng.gen_range(-400.0..0.0)];
    // x and y axes flipped, as typical for CT stored in LPS and viewed in RAS.
    let [sz, sy, sx] = spacing;
    let affine =
        [[-sx, 0.0, 0.0, -origin[0]], [0.0, -sy, 0.0, -origin[1]], [0.0, 0.0, sz, origin[2]], [0.0, 0.0, 0.0, 1.0]];
    (rng, Scan { anatomy, spacing, z_shift, header: SpatialHeader::from_affine(&affine) })
}

/// The MR site's channel names: nnU-Net z-scores both (any name but its scheme names).
pub const MR_CHANNELS: [&str; 2] = ["T1", "T2"];

/// A two-contrast MR phantom: T1- and T2-like images (`image`) of one anatomy.
pub type PhantomMrCase = PhantomCase<[Array3<f32>; 2]>;

/// Generates one MR case deterministically from (seed, stream, index), as [`phantom_case`]: the
/// same anatomy as the CT case of the same stream and index.
pub fn phantom_mr_case(seed: u64, stream: &str, index: usize, shape: [usize; 3]) -> PhantomMrCase {
    phantom_rendered(seed, stream, index, shape, render_mr)
}

/// T1- and T2-like signal (arbitrary units, before gain, bias and noise) of the tissue at a voxel,
/// from its structure and the CT tissue class its HU stands for; `None` outside the body.
fn mr_signal(hu: f64, s: Structure) -> Option<[f64; 2]> {
    use Structure as S;
    Some(match s {
        S::Liver => [550.0, 280.0],
        S::LiverVessel => [200.0, 900.0],
        S::LiverTumour => [300.0, 720.0],
        S::Spleen => [400.0, 600.0],
        S::Kidney => [450.0, 650.0],
        S::KidneyTumour => [330.0, 760.0],
        S::Pancreas => [600.0, 350.0],
        S::PancreasTumour => [300.0, 650.0],
        S::None => match hu {
            h if h <= -999.0 => return None,   // air around the body
            h if h <= -800.0 => [30.0, 20.0],  // lung, bowel gas
            h if h <= -50.0 => [900.0, 750.0], // fat
            h if h >= 800.0 => [60.0, 40.0],   // cortical bone
            h if h >= 200.0 => [700.0, 500.0], // marrow
            h if h >= 45.0 => [400.0, 250.0],  // muscle
            h if h >= 30.0 => [500.0, 400.0],  // skin
            _ => [450.0, 550.0],               // other soft tissue
        },
    })
}

/// Renders an MR case: per channel a gain (MR's arbitrary scale), a smooth multiplicative bias
/// field, texture and noise; voxels outside the body are exactly 0 and those inside at least 1,
/// so the nonzero mask is the body.
fn render_mr(scan: &Scan, shape: [usize; 3], rng: &mut ChaCha8Rng) -> ([Array3<f32>; 2], Array3<u8>) {
    let gains: [f64; 2] = std::array::from_fn(|_| rng.gen_range(0.5..2.0));
    let bias: [f64; 3] = std::array::from_fn(|_| rng.gen_range(-0.15..0.15));
    let grid = (shape[0], shape[1], shape[2]);
    let mut channels = [Array3::<f32>::zeros(grid), Array3::<f32>::zeros(grid)];
    let structures = scan.visit(shape, |i, p, hu, s| {
        let Some(signal) = mr_signal(hu, s) else { return };
        let field = 1.0 + bias[0] * (p[0] / 150.0) + bias[1] * (p[1] / 150.0) + bias[2] * (p[2] / 120.0);
        for (c, channel) in channels.iter_mut().enumerate() {
            let v = (signal[c] + 2.0 * scan.anatomy.texture(p)) * field * gains[c] + 20.0 * normal(rng);
            channel[i] = v.max(1.0) as f32;
        }
    });
    (channels, structures)
}

/// Writes an MR case's channels as `<stem>_0000.nii.gz`, `<stem>_0001.nii.gz` in `dir`; returns
/// channel 0's path (the case's image).
fn write_mr_channels(dir: &Path, stem: &str, case: &PhantomMrCase) -> Result<PathBuf> {
    for (k, channel) in case.image.iter().enumerate() {
        write_f32_nifti(dir.join(format!("{stem}_{k:04}.nii.gz")), channel, &case.header)?;
    }
    Ok(dir.join(format!("{stem}_0000.nii.gz")))
}

fn write_dataset_json(dir: &Path, kind: SiteKind, n: usize) -> Result<()> {
    let (labels, _) = kind.labels();
    let channel_names: serde_json::Map<String, serde_json::Value> =
        kind.channel_names().iter().enumerate().map(|(k, name)| (k.to_string(), (*name).into())).collect();
    let mut lab = serde_json::Map::new();
    lab.insert("background".into(), 0.into());
    for (name, v) in labels {
        lab.insert(name.into(), v.into());
    }
    let json = serde_json::json!({
        "name": format!("phantom_{}", kind.name()),
        "channel_names": channel_names,
        "labels": lab,
        "numTraining": n,
        "file_ending": ".nii.gz",
    });
    let path = dir.join("dataset.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes one nnU-Net v2 folder per site, plus `test/` with a held-out case (the same image for
/// every CT site, and one MR case of the same anatomy for MR sites) and its ground truth per site.
pub fn generate_sites(out_dir: impl AsRef<Path>, opts: &SynthOptions) -> Result<Vec<GeneratedSite>> {
    let out_dir = out_dir.as_ref();
    let test_dir = out_dir.join("test");
    std::fs::create_dir_all(&test_dir).with_context(|| format!("{}: cannot create", test_dir.display()))?;
    let test = phantom_case(opts.seed, "test", 0, opts.shape);
    let test_image = test_dir.join("test_000_0000.nii.gz");
    write_i16_nifti(&test_image, &test.image, &test.header)?;
    write_mask_nifti(test_dir.join("test_000_structures.nii.gz"), &test.structures, &test.header)?;
    let mr_test_image = match opts.sites.iter().any(|k| k.is_mr()) {
        true => Some(write_mr_channels(&test_dir, "test_mr_000", &phantom_mr_case(opts.seed, "test", 0, opts.shape))?),
        false => None,
    };
    let mut sites = Vec::new();
    for (k, &kind) in opts.sites.iter().enumerate() {
        let dir = out_dir.join(format!("Dataset{:03}_{}", k + 1, kind.name()));
        for sub in ["imagesTr", "labelsTr"] {
            std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("{}: cannot create", dir.display()))?;
        }
        for i in 0..opts.cases_per_site {
            // The stream includes the site's position so that two sites never share patients.
            let stream = format!("{}-{k}", kind.name());
            let id = format!("{}_{i:03}", kind.name());
            let (structures, header) = if kind.is_mr() {
                let case = phantom_mr_case(opts.seed, &stream, i, opts.shape);
                write_mr_channels(&dir.join("imagesTr"), &id, &case)?;
                (case.structures, case.header)
            } else {
                let case = phantom_case(opts.seed, &stream, i, opts.shape);
                write_i16_nifti(dir.join("imagesTr").join(format!("{id}_0000.nii.gz")), &case.image, &case.header)?;
                (case.structures, case.header)
            };
            write_mask_nifti(
                dir.join("labelsTr").join(format!("{id}.nii.gz")),
                &encode_labels(kind, &structures),
                &header,
            )?;
        }
        write_dataset_json(&dir, kind, opts.cases_per_site)?;
        let test_label = test_dir.join(format!("test_000_{}.nii.gz", kind.name()));
        // The MR test case draws the same anatomy as the CT one (same stream), so one structure
        // map serves both.
        write_mask_nifti(&test_label, &encode_labels(kind, &test.structures), &test.header)?;
        let image = if kind.is_mr() { mr_test_image.clone().expect("written above") } else { test_image.clone() };
        sites.push(GeneratedSite {
            name: kind.name().to_string(),
            dataset_dir: dir,
            classes: kind.labels().1,
            test_image: image,
            test_label,
        });
        tracing::info!(site = kind.name(), cases = opts.cases_per_site, "phantom site written");
    }
    Ok(sites)
}

/// One class's round-trip ceiling: the Dice a perfect model at `target_spacing` could reach on the
/// original grid.
#[derive(Debug, Clone, Serialize)]
pub struct ClassCeiling {
    pub site: String,
    pub class: String,
    /// Mean over the cases where the class is present.
    pub dice: f64,
    pub cases: usize,
}

/// The resolution limit of every class of `opts.sites` at `target_spacing`: each phantom's ground
/// truth is resampled to the target spacing (per-label linear, as preprocessing does) and the
/// class masks back to the original grid (linear probabilities thresholded at 0.5, as predict
/// does); the Dice against the original mask is what a perfect network could score.
pub fn round_trip_ceiling(opts: &SynthOptions, target_spacing: [f64; 3]) -> Vec<ClassCeiling> {
    use crate::resample::{anisotropy_axis, resample, resample_labels, target_shape, Interp, LabelInterp};
    let mut out = Vec::new();
    for (k, &kind) in opts.sites.iter().enumerate() {
        let classes = kind.labels().1;
        let mut sums = vec![(0.0, 0usize); classes.len()];
        for i in 0..opts.cases_per_site {
            let case = phantom_case(opts.seed, &format!("{}-{k}", kind.name()), i, opts.shape);
            let labels = encode_labels(kind, &case.structures).mapv(u16::from);
            let shape = opts.shape;
            let axis = anisotropy_axis(case.spacing);
            let low = resample_labels(
                &labels,
                target_shape(shape, case.spacing, target_spacing),
                LabelInterp::PerLabelLinear,
                axis,
            );
            for (c, class) in classes.iter().enumerate() {
                let truth = labels.mapv(|l| class.labels.contains(&u32::from(l)));
                let low_mask = low.mapv(|l| if class.labels.contains(&u32::from(l)) { 1.0f32 } else { 0.0 });
                let back = resample(low_mask.view(), shape, Interp::Linear, axis);
                let (mut tp, mut total) = (0usize, 0usize);
                for (&t, &p) in truth.iter().zip(back.iter()) {
                    let p = p > 0.5;
                    tp += usize::from(t && p);
                    total += usize::from(t) + usize::from(p);
                }
                if truth.iter().any(|&t| t) {
                    sums[c].0 += 2.0 * tp as f64 / total as f64;
                    sums[c].1 += 1;
                }
            }
        }
        for (class, (sum, n)) in classes.iter().zip(sums) {
            out.push(ClassCeiling {
                site: kind.name().into(),
                class: class.name.clone(),
                dice: if n > 0 { sum / n as f64 } else { f64::NAN },
                cases: n,
            });
        }
    }
    out
}
