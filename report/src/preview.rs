//! A prediction at a glance: three orthogonal slices of the image (axial, coronal, sagittal)
//! with the predicted masks overlaid in colour, and a legend of the classes.

use anyhow::{ensure, Result};
use plotters::prelude::*;

use crate::fonts::{ensure_fonts, FAMILY};
use crate::plot::{colour, encode_png};

/// A volume `[z, y, x]` in C order with its spacing in mm.
pub struct Volume<'a, T> {
    pub data: &'a [T],
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
}

/// One class's mask (0/1, the image's shape) and its legend label.
pub struct Overlay<'a> {
    pub label: String,
    pub mask: &'a [u8],
}

/// Pixels of each slice's longer side.
const SLICE_PX: u32 = 256;
const LEGEND_ROW_PX: u32 = 18;
const TITLE_PX: u32 = 26;
const ALPHA: f32 = 0.45;

/// The preview as PNG bytes. The slices cross at the centroid of the predicted foreground
/// (the middle of the volume when nothing was predicted), so that what was found is in view.
/// Grey values span `window` (a CT model's clip range: what the network sees), else the
/// image's 0.5th to 99.5th percentile.
pub fn preview_png(
    title: &str,
    image: &Volume<f32>,
    overlays: &[Overlay],
    window: Option<(f32, f32)>,
) -> Result<Vec<u8>> {
    let n: usize = image.shape.iter().product();
    ensure!(image.data.len() == n, "preview: {} voxels for shape {:?}", image.data.len(), image.shape);
    for o in overlays {
        ensure!(o.mask.len() == n, "preview: mask {:?} has {} voxels, the image {n}", o.label, o.mask.len());
    }
    let (lo, hi) = window.filter(|(lo, hi)| hi > lo).unwrap_or_else(|| percentile_window(image.data));
    let centre = foreground_centroid(image.shape, overlays);
    let slices =
        [Plane::Axial, Plane::Coronal, Plane::Sagittal].map(|p| Slice::cut(p, image, overlays, centre, (lo, hi)));
    let width: u32 = slices.iter().map(|s| s.width).sum::<u32>() + 4 * 8;
    let legend_rows = overlays.len().max(1) as u32;
    let height = TITLE_PX + slices.iter().map(|s| s.height).max().unwrap_or(0) + 24 + legend_rows * LEGEND_ROW_PX + 8;
    let width = width.max(360);
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    let mut x0 = 8u32;
    for s in &slices {
        s.blit(&mut rgb, width, (x0, TITLE_PX));
        x0 += s.width + 8;
    }
    {
        ensure_fonts();
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        let font = (FAMILY, 14).into_font();
        let draw =
            |e: Result<(), _>| e.map_err(|e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the preview: {e}"));
        draw(root.draw_text(title, &font.color(&BLACK), (8, 5)))?;
        let mut x0 = 8i32;
        let below = (TITLE_PX + slices.iter().map(|s| s.height).max().unwrap_or(0) + 4) as i32;
        for s in &slices {
            draw(root.draw_text(s.plane.name(), &(FAMILY, 12).into_font().color(&BLACK), (x0, below)))?;
            x0 += (s.width + 8) as i32;
        }
        let legend_top = below + 20;
        if overlays.is_empty() {
            draw(root.draw_text("no class selected", &(FAMILY, 12).into_font().color(&BLACK), (8, legend_top)))?;
        }
        for (k, o) in overlays.iter().enumerate() {
            let y = legend_top + (k as u32 * LEGEND_ROW_PX) as i32;
            let voxels = o.mask.iter().filter(|&&v| v > 0).count();
            draw(root.draw(&Rectangle::new([(8, y + 2), (22, y + 14)], colour(k).filled())))?;
            let text = format!("{}  ({voxels} voxels)", o.label);
            draw(root.draw_text(&text, &(FAMILY, 12).into_font().color(&BLACK), (28, y + 1)))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("drawing the preview: {e}"))?;
    }
    encode_png(&rgb, (width, height))
}

/// The grey window: the 0.5th and 99.5th percentiles (CT or MR alike), a sampled estimate.
fn percentile_window(data: &[f32]) -> (f32, f32) {
    let step = (data.len() / 200_000).max(1);
    let mut sample: Vec<f32> = data.iter().step_by(step).copied().filter(|v| v.is_finite()).collect();
    if sample.is_empty() {
        return (0.0, 1.0);
    }
    sample.sort_by(f32::total_cmp);
    let at = |q: f64| sample[((sample.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (at(0.005), at(0.995));
    if hi > lo {
        (lo, hi)
    } else {
        (lo, lo + 1.0)
    }
}

fn foreground_centroid(shape: [usize; 3], overlays: &[Overlay]) -> [usize; 3] {
    let [_, ny, nx] = shape;
    let (mut sum, mut count) = ([0f64; 3], 0f64);
    for o in overlays {
        for (i, _) in o.mask.iter().enumerate().filter(|(_, &v)| v > 0) {
            let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
            sum[0] += z as f64;
            sum[1] += y as f64;
            sum[2] += x as f64;
            count += 1.0;
        }
    }
    if count == 0.0 {
        return shape.map(|s| s / 2);
    }
    [0, 1, 2].map(|a| ((sum[a] / count).round() as usize).min(shape[a] - 1))
}

#[derive(Clone, Copy)]
enum Plane {
    Axial,
    Coronal,
    Sagittal,
}

impl Plane {
    fn name(self) -> &'static str {
        match self {
            Plane::Axial => "axial",
            Plane::Coronal => "coronal",
            Plane::Sagittal => "sagittal",
        }
    }
}

/// A slice rendered to RGB at display size (physical aspect ratio kept).
struct Slice {
    plane: Plane,
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Slice {
    fn cut(plane: Plane, image: &Volume<f32>, overlays: &[Overlay], centre: [usize; 3], (lo, hi): (f32, f32)) -> Slice {
        let [nz, ny, nx] = image.shape;
        let [sz, sy, sx] = image.spacing;
        // (rows, columns, mm per row, mm per column, voxel index of a (row, column)); the
        // coronal and sagittal views put the head up (the last z at the top).
        let (rows, cols, mm_r, mm_c): (usize, usize, f64, f64) = match plane {
            Plane::Axial => (ny, nx, sy, sx),
            Plane::Coronal => (nz, nx, sz, sx),
            Plane::Sagittal => (nz, ny, sz, sy),
        };
        let index = |r: usize, c: usize| -> usize {
            match plane {
                Plane::Axial => (centre[0] * ny + r) * nx + c,
                Plane::Coronal => ((nz - 1 - r) * ny + centre[1]) * nx + c,
                Plane::Sagittal => ((nz - 1 - r) * ny + c) * nx + centre[2],
            }
        };
        let (h_mm, w_mm) = (rows as f64 * mm_r.abs().max(1e-6), cols as f64 * mm_c.abs().max(1e-6));
        let scale = SLICE_PX as f64 / h_mm.max(w_mm);
        let (height, width) = (((h_mm * scale).round() as u32).max(1), ((w_mm * scale).round() as u32).max(1));
        let mut rgb = vec![0u8; (width * height * 3) as usize];
        for py in 0..height {
            let r = ((py as f64 + 0.5) / height as f64 * rows as f64) as usize;
            for px in 0..width {
                let c = ((px as f64 + 0.5) / width as f64 * cols as f64) as usize;
                let i = index(r.min(rows - 1), c.min(cols - 1));
                let grey = ((image.data[i] - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0;
                let mut pixel = [grey; 3];
                for (k, o) in overlays.iter().enumerate() {
                    if o.mask[i] > 0 {
                        let RGBColor(cr, cg, cb) = colour(k);
                        for (p, c) in pixel.iter_mut().zip([cr, cg, cb]) {
                            *p = *p * (1.0 - ALPHA) + c as f32 * ALPHA;
                        }
                    }
                }
                let at = ((py * width + px) * 3) as usize;
                for (d, p) in rgb[at..at + 3].iter_mut().zip(pixel) {
                    *d = p.round() as u8;
                }
            }
        }
        Slice { plane, width, height, rgb }
    }

    /// Copies the slice into an RGB canvas `canvas_width` wide at `(x0, y0)`.
    fn blit(&self, canvas: &mut [u8], canvas_width: u32, (x0, y0): (u32, u32)) {
        for row in 0..self.height {
            let src = (row * self.width * 3) as usize;
            let dst = (((y0 + row) * canvas_width + x0) * 3) as usize;
            canvas[dst..dst + (self.width * 3) as usize]
                .copy_from_slice(&self.rgb[src..src + (self.width * 3) as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bright cube with a mask on it: the preview decodes, and the mask's colour is where
    /// the cube is (the slices cross at the mask's centroid).
    #[test]
    fn the_mask_shows_in_its_colour() {
        let shape = [20usize, 30, 40];
        let n = shape.iter().product();
        let mut data = vec![0f32; n];
        let mut mask = vec![0u8; n];
        for z in 2..6 {
            for y in 20..26 {
                for x in 30..36 {
                    let i = (z * 30 + y) * 40 + x;
                    data[i] = 100.0;
                    mask[i] = 1;
                }
            }
        }
        let image = Volume { data: &data, shape, spacing: [2.0, 1.0, 1.0] };
        let png =
            preview_png("case_000", &image, &[Overlay { label: "liver/liver".into(), mask: &mask }], None).unwrap();
        let rgb = image::load_from_memory(&png).unwrap().to_rgb8();
        let RGBColor(r, g, b) = colour(0);
        let tinted = |p: &image::Rgb<u8>| {
            let expect = [r, g, b].map(|c| (255.0 * (1.0 - ALPHA) + c as f32 * ALPHA).round() as i32);
            p.0.iter().zip(expect).all(|(&a, e)| (a as i32 - e).abs() <= 2)
        };
        // Each of the three slices shows the mask: tinted pixels in each third of the width.
        let third = rgb.width() / 3;
        for k in 0..3 {
            let found = (k * third..(k + 1) * third)
                .any(|x| (TITLE_PX..TITLE_PX + SLICE_PX).any(|y| y < rgb.height() && tinted(rgb.get_pixel(x, y))));
            assert!(found, "no tinted pixel in slice {k}");
        }
    }

    #[test]
    fn a_wrong_mask_size_is_refused_by_name() {
        let data = vec![0f32; 8];
        let mask = vec![0u8; 7];
        let image = Volume { data: &data, shape: [2, 2, 2], spacing: [1.0; 3] };
        let err = preview_png("c", &image, &[Overlay { label: "a/b".into(), mask: &mask }], None).unwrap_err();
        assert!(err.to_string().contains("a/b"), "{err}");
    }
}
