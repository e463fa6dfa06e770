//! Figures as data, drawn by one code onto a PNG (nnU-Net's `progress.png`) or an inline SVG
//! (the HTML report): line charts, stacked bars and a status grid.

use std::ops::Range;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::fonts::{ensure_fonts, FAMILY};

/// Tableau's ten colours: distinct, and readable on white.
pub const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

pub fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// A line of a [`LineChart`]: its colour (a palette index) and its marker tell series apart,
/// e.g. the colour a site and the marker one of its classes.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub colour: usize,
    pub marker: Marker,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    Circle,
    Square,
    Triangle,
    Cross,
}

impl Marker {
    pub const ALL: [Marker; 4] = [Marker::Circle, Marker::Square, Marker::Triangle, Marker::Cross];
}

#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A fixed y range (Dice in [0, 1]); else the data's, padded.
    pub y_range: Option<(f64, f64)>,
}

/// Bars at `x`, each stacked from `parts` in the order of `categories`.
#[derive(Clone, Debug, PartialEq)]
pub struct StackedBars {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub bars: Vec<(f64, Vec<f64>)>,
}

/// Rows × columns of cells, each one of `states` (its label and colour), e.g. sites × rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusGrid {
    pub title: String,
    pub x_label: String,
    pub rows: Vec<String>,
    pub columns: Vec<f64>,
    pub states: Vec<(String, RGBColor)>,
    /// `cells[row][column]`: an index into `states`, or none (no cell drawn).
    pub cells: Vec<Vec<Option<usize>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Figure {
    Lines(LineChart),
    Stacked(StackedBars),
    Grid(StatusGrid),
}

impl Figure {
    pub fn title(&self) -> &str {
        match self {
            Figure::Lines(f) => &f.title,
            Figure::Stacked(f) => &f.title,
            Figure::Grid(f) => &f.title,
        }
    }
}

/// Draws `figures` in a grid of `columns` onto one PNG of `size` pixels; its bytes.
pub fn png(figures: &[Figure], columns: usize, size: (u32, u32)) -> Result<Vec<u8>> {
    let mut rgb = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        draw_grid(&root, figures, columns)?;
        root.present().map_err(|e| anyhow!("drawing: {e}"))?;
    }
    encode_png(&rgb, size)
}

/// One figure as a standalone `<svg>` element of `size` pixels.
pub fn svg(figure: &Figure, size: (u32, u32)) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        draw_grid(&root, std::slice::from_ref(figure), 1)?;
        root.present().map_err(|e| anyhow!("drawing: {e}"))?;
    }
    Ok(out)
}

/// Encodes an RGB buffer as PNG.
pub fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, w, h, image::ColorType::Rgb8)
        .map_err(|e| anyhow!("encoding PNG: {e}"))?;
    Ok(out)
}

fn draw_grid<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, figures: &[Figure], columns: usize) -> Result<()> {
    ensure_fonts();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing: {e}"))?;
    if figures.is_empty() {
        return Ok(());
    }
    let columns = columns.clamp(1, figures.len());
    let rows = figures.len().div_ceil(columns);
    let areas = root.split_evenly((rows, columns));
    for (figure, area) in figures.iter().zip(&areas) {
        draw_figure(area, figure).map_err(|e| anyhow!("drawing {:?}: {e}", figure.title()))?;
    }
    Ok(())
}

type DrawResult<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw_figure<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, figure: &Figure) -> DrawResult<DB> {
    match figure {
        Figure::Lines(chart) => draw_lines(area, chart),
        Figure::Stacked(bars) => draw_stacked(area, bars),
        Figure::Grid(grid) => draw_status(area, grid),
    }
}

/// The x range of points at integer positions (rounds), with half a step either side.
fn x_range(xs: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if lo.is_finite() {
        lo - 0.5..hi + 0.5
    } else {
        0.0..1.0
    }
}

fn padded_range(ys: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) =
        ys.filter(|y| y.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-6);
    (lo - pad).min(if lo >= 0.0 { 0.0 } else { lo - pad })..hi + pad
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Every figure's frame: its caption above, `y_label_px` for the y labels.
fn chart_on<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    y_label_px: u32,
    x: Range<f64>,
    y: Range<f64>,
) -> std::result::Result<Chart<'a, DB>, DrawingAreaErrorKind<DB::ErrorType>> {
    ChartBuilder::on(area)
        .caption(title, (FAMILY, 18))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(y_label_px)
        .build_cartesian_2d(x, y)
}

/// Every figure's legend, in its upper right corner.
fn draw_legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>) -> DrawResult<DB> {
    chart
        .configure_series_labels()
        .label_font((FAMILY, 11))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &LineChart) -> DrawResult<DB> {
    let points = || c.series.iter().flat_map(|s| s.points.iter());
    let x = x_range(points().map(|p| p.0));
    let y = c.y_range.map_or_else(|| padded_range(points().map(|p| p.1)), |(lo, hi)| lo..hi);
    let mut chart = chart_on(area, &c.title, 52, x, y)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .x_label_formatter(&|x| format!("{x}"))
        .y_desc(&c.y_label)
        .label_style((FAMILY, 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for s in &c.series {
        let col = colour(s.colour);
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1.is_finite()).collect();
        let line = chart.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?.label(&s.label);
        // The legend entry: a short line with the series' marker on it.
        let stroke = move |(x, y): (i32, i32)| {
            EmptyElement::at((x, y)) + PathElement::new(vec![(0, 0), (18, 0)], col.stroke_width(2))
        };
        match s.marker {
            Marker::Circle => line.legend(move |p| stroke(p) + Circle::new((9, 0), 3, col.filled())),
            Marker::Square => line.legend(move |p| stroke(p) + Rectangle::new([(6, -3), (12, 3)], col.filled())),
            Marker::Triangle => line.legend(move |p| stroke(p) + TriangleMarker::new((9, 0), 4, col.filled())),
            Marker::Cross => line.legend(move |p| stroke(p) + Cross::new((9, 0), 3, col.stroke_width(2))),
        };
        let at = pts.iter().copied();
        match s.marker {
            Marker::Circle => chart.draw_series(at.map(|p| Circle::new(p, 3, col.filled())))?,
            Marker::Square => {
                chart.draw_series(at.map(|p| EmptyElement::at(p) + Rectangle::new([(-3, -3), (3, 3)], col.filled())))?
            }
            Marker::Triangle => chart.draw_series(at.map(|p| TriangleMarker::new(p, 4, col.filled())))?,
            Marker::Cross => chart.draw_series(at.map(|p| Cross::new(p, 3, col.stroke_width(2))))?,
        };
    }
    if !c.series.is_empty() {
        draw_legend(&mut chart)?;
    }
    Ok(())
}

fn draw_stacked<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, b: &StackedBars) -> DrawResult<DB> {
    let x = x_range(b.bars.iter().map(|bar| bar.0));
    let top = b.bars.iter().map(|(_, parts)| parts.iter().sum::<f64>()).fold(0.0, f64::max);
    let mut chart = chart_on(area, &b.title, 52, x, 0.0..(top * 1.25).max(1e-6))?;
    chart
        .configure_mesh()
        .x_desc(&b.x_label)
        .x_label_formatter(&|x| format!("{x}"))
        .y_desc(&b.y_label)
        .label_style((FAMILY, 12))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for (k, category) in b.categories.iter().enumerate() {
        let col = colour(k);
        let rects = b.bars.iter().map(|(x, parts)| {
            let below: f64 = parts[..k.min(parts.len())].iter().sum();
            let height = parts.get(k).copied().unwrap_or(0.0);
            Rectangle::new([(x - 0.35, below), (x + 0.35, below + height)], col.filled())
        });
        chart
            .draw_series(rects)?
            .label(category)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
    }
    draw_legend(&mut chart)?;
    Ok(())
}

fn draw_status<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, g: &StatusGrid) -> DrawResult<DB> {
    let x = x_range(g.columns.iter().copied());
    let n = g.rows.len().max(1) as f64;
    let longest = g.rows.iter().map(|r| r.chars().count()).max().unwrap_or(4) as u32;
    // Room above the rows for the legend.
    let mut chart = chart_on(area, &g.title, (longest * 8 + 12).min(160), x, -0.5..n + 0.3)?;
    let rows = g.rows.clone();
    chart
        .configure_mesh()
        .x_desc(&g.x_label)
        .x_label_formatter(&|x| format!("{x}"))
        .label_style((FAMILY, 12))
        .disable_y_mesh()
        .y_labels(g.rows.len() * 2 + 2)
        .y_label_formatter(&move |v: &f64| {
            let i = v.round();
            if (v - i).abs() < 1e-6 && i >= 0.0 {
                rows.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    for (state, (label, col)) in g.states.iter().enumerate() {
        let col = *col;
        let cells = g.cells.iter().enumerate().flat_map(|(r, row)| {
            row.iter().zip(&g.columns).filter(move |(c, _)| **c == Some(state)).map(move |(_, &x)| {
                Rectangle::new([(x - 0.42, r as f64 - 0.4), (x + 0.42, r as f64 + 0.4)], col.filled())
            })
        });
        chart
            .draw_series(cells)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
    }
    draw_legend(&mut chart)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Vec<Figure> {
        let lines = Figure::Lines(LineChart {
            title: "loss".into(),
            x_label: "round".into(),
            y_label: "loss".into(),
            series: vec![Series {
                label: "a".into(),
                colour: 0,
                marker: Marker::Square,
                points: vec![(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.25)],
            }],
            y_range: None,
        });
        let bars = Figure::Stacked(StackedBars {
            title: "time".into(),
            x_label: "round".into(),
            y_label: "s".into(),
            categories: vec!["train".into(), "other".into()],
            bars: vec![(1.0, vec![1.0, 0.5]), (2.0, vec![2.0])],
        });
        let grid = Figure::Grid(StatusGrid {
            title: "who".into(),
            x_label: "round".into(),
            rows: vec!["a".into(), "b".into()],
            columns: vec![1.0, 2.0],
            states: vec![("reported".into(), colour(2)), ("refused".into(), colour(3))],
            cells: vec![vec![Some(0), Some(1)], vec![None, Some(0)]],
        });
        vec![lines, bars, grid]
    }

    #[test]
    fn figures_draw_to_png_and_svg() {
        let png = png(&figures(), 2, (800, 600)).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let decoded = image::load_from_memory(&png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (800, 600));
        // Something beside the white background was drawn.
        assert!(decoded.to_rgb8().pixels().any(|p| p.0 != [255, 255, 255]));
        for f in figures() {
            let svg = svg(&f, (400, 300)).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
            assert!(svg.contains(f.title()));
        }
    }

    /// An empty federation (no round yet) draws empty axes, not an error.
    #[test]
    fn empty_figures_draw() {
        let empty = Figure::Lines(LineChart {
            title: "Dice".into(),
            x_label: "round".into(),
            y_label: "Dice".into(),
            series: vec![],
            y_range: Some((0.0, 1.0)),
        });
        png(std::slice::from_ref(&empty), 1, (300, 200)).unwrap();
        svg(&empty, (300, 200)).unwrap();
        png(&[], 1, (300, 200)).unwrap();
    }
}
