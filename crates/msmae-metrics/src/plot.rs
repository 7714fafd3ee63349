//! PNG charts with text — titles, axis labels, tick values, legends, cell counts — drawn
//! with `plotters` on a bitmap and encoded with `image`. Text uses a font embedded in the
//! binary (a Latin-1 subset of Inter, SIL OFL 1.1: `src/fonts/OFL.txt`, provenance in
//! `src/fonts/README.md`), so charts look the same on every machine and need no system
//! fonts. Characters outside the subset render as blanks.
//!
//! [`line_chart`] draws loss curves, ROC curves and the like; [`heatmap_chart`] draws
//! confusion matrices.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// The embedded font (Inter Regular, Latin subset; SIL Open Font License 1.1).
static FONT: &[u8] = include_bytes!("fonts/Inter-Regular-subset.ttf");
/// The font family name charts ask for.
const FAMILY: &str = "sans-serif";

/// Width and height of the charts, in pixels.
pub const CHART_SIZE: (u32, u32) = (900, 640);

/// A chart could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The data cannot be drawn (empty, not finite, ragged).
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    /// Drawing or encoding failed.
    #[error("{path}: drawing the chart failed: {message}")]
    Draw { path: PathBuf, message: String },
    /// The PNG could not be written.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<PlotError> for msmae_core::StageError {
    fn from(e: PlotError) -> Self {
        match e {
            PlotError::Io { path, source } => msmae_core::StageError::io(path, source),
            other => msmae_core::StageError::other(other.to_string()),
        }
    }
}

/// One named line of a [`line_chart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// `(x, y)` points, drawn in the given order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name` through `points`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points }
    }
}

/// Register the embedded font with plotters once per process.
fn ensure_font(path: &Path) -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw { path: path.into(), message: "the embedded font could not be loaded".into() })
    }
}

/// Distinct colours for up to 10 series (then they repeat), colour-blind friendly (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn draw_err(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw { path: path.into(), message: e.to_string() }
}

fn save_png(path: &Path, buf: Vec<u8>, (w, h): (u32, u32)) -> Result<(), PlotError> {
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| PlotError::Draw { path: path.into(), message: "bitmap size mismatch".into() })?;
    img.save_with_format(path, image::ImageFormat::Png).map_err(|e| match e {
        image::ImageError::IoError(source) => PlotError::Io { path: path.into(), source },
        other => PlotError::Draw { path: path.into(), message: other.to_string() },
    })
}

/// Range of `v` padded a little (and widened when flat), for an axis.
fn axis_range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        return (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0));
    }
    (lo - 0.03 * span, hi + 0.03 * span)
}

/// Write a PNG line chart ([`CHART_SIZE`]) with a title, axis labels with tick values and a
/// legend naming each series.
///
/// Axis ranges fit the data (ROC curves, whose points lie in [0, 1], get exactly
/// [0, 1] × [0, 1]). Errors when there is no point at all or a point is not finite.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<(), PlotError> {
    let data = |m: String| PlotError::Data { path: path.into(), message: m };
    if series.len() > MAX_CHART_ITEMS {
        let note = format!(
            "{} curves are too many to read in one chart (at most {MAX_CHART_ITEMS}): the numbers are in the stage's tables",
            series.len()
        );
        return note_chart(path, title, &note);
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(data(format!("chart `{title}` has no points to draw")));
    }
    if let Some(s) = series.iter().find(|s| s.points.iter().any(|(x, y)| !x.is_finite() || !y.is_finite())) {
        return Err(data(format!("chart `{title}`: series `{}` has a point that is not finite", s.name)));
    }
    ensure_font(path)?;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let unit = all().all(|&(x, y)| (0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y));
    let ((x0, x1), (y0, y1)) =
        if unit { ((0.0, 1.0), (0.0, 1.0)) } else { (axis_range(all().map(|p| p.0)), axis_range(all().map(|p| p.1))) };
    let size = CHART_SIZE;
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    let e = draw_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 26))
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 18))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .position(if unit { SeriesLabelPosition::LowerRight } else { SeriesLabelPosition::UpperRight })
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    save_png(path, buf, size)
}

/// The most series of a line chart, or rows or columns of a heatmap, that are drawn: past
/// it a chart is unreadable (and its labels alone would be large), so a note is drawn
/// instead.
pub const MAX_CHART_ITEMS: usize = 100;

/// Write a PNG ([`CHART_SIZE`]) holding only a title and a note: what stands in for a chart
/// that is not drawn.
pub fn note_chart(path: &Path, title: &str, note: &str) -> Result<(), PlotError> {
    ensure_font(path)?;
    let size = CHART_SIZE;
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    let e = draw_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let centre = plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        );
        let (w, h) = (size.0 as i32, size.1 as i32);
        root.draw(&Text::new(title.to_string(), (w / 2, 40), TextStyle::from((FAMILY, 26).into_font()).pos(centre)))
            .map_err(|x| e(&x))?;
        root.draw(&Text::new(note.to_string(), (w / 2, h / 2), TextStyle::from((FAMILY, 18).into_font()).pos(centre)))
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    save_png(path, buf, size)
}

/// Write a PNG heatmap of counts (a confusion matrix): `cells[row][col]`, each cell shaded by
/// its count relative to its row's total and labelled with the count. Rows are labelled by
/// `row_names` down the left, columns by `col_names` along the bottom.
pub fn heatmap_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    row_names: &[String],
    col_names: &[String],
    cells: &[Vec<u64>],
) -> Result<(), PlotError> {
    let data = |m: String| PlotError::Data { path: path.into(), message: m };
    let (nr, nc) = (row_names.len(), col_names.len());
    if nr == 0 || nc == 0 {
        return Err(data(format!("heatmap `{title}` has no rows or columns")));
    }
    if nr > MAX_CHART_ITEMS || nc > MAX_CHART_ITEMS {
        let note = format!(
            "{nr} × {nc} cells are too many to read in one chart (at most {MAX_CHART_ITEMS} a side): the counts are in the stage's tables"
        );
        return note_chart(path, title, &note);
    }
    if cells.len() != nr || cells.iter().any(|r| r.len() != nc) {
        return Err(data(format!("heatmap `{title}`: cells are not {nr}×{nc}")));
    }
    ensure_font(path)?;
    let size = CHART_SIZE;
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    let e = draw_err(path);
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let longest = row_names.iter().map(|s| s.chars().count()).max().unwrap_or(1) as u32;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 26))
            .margin(16)
            .x_label_area_size(60)
            .y_label_area_size((longest * 9 + 40).clamp(60, 260))
            .build_cartesian_2d(0f64..nc as f64, 0f64..nr as f64)
            .map_err(|x| e(&x))?;
        let row_label = |v: &f64| {
            // Row 0 at the top: the y axis counts up from the bottom.
            let k = (nr as f64 - v - 0.5).round();
            if (0.0..nr as f64).contains(&k) && (v.fract() - 0.5).abs() < 1e-6 {
                row_names[k as usize].clone()
            } else {
                String::new()
            }
        };
        let col_label = |v: &f64| {
            let k = (v - 0.5).round();
            if (0.0..nc as f64).contains(&k) && (v.fract() - 0.5).abs() < 1e-6 {
                col_names[k as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_labels(nc * 2 + 1)
            .y_labels(nr * 2 + 1)
            .x_label_formatter(&col_label)
            .y_label_formatter(&row_label)
            .label_style((FAMILY, 15))
            .axis_desc_style((FAMILY, 18))
            .draw()
            .map_err(|x| e(&x))?;
        for (r, row) in cells.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            for (c, &v) in row.iter().enumerate() {
                let f = v as f64 / total;
                let shade = |lo: u8, hi: u8| (f64::from(hi) + (f64::from(lo) - f64::from(hi)) * f).round() as u8;
                let fill = RGBColor(shade(8, 247), shade(48, 251), shade(107, 255));
                let y = (nr - 1 - r) as f64;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(c as f64, y), (c as f64 + 1.0, y + 1.0)],
                        fill.filled(),
                    )))
                    .map_err(|x| e(&x))?;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(c as f64, y), (c as f64 + 1.0, y + 1.0)],
                        RGBColor(200, 200, 200).stroke_width(1),
                    )))
                    .map_err(|x| e(&x))?;
                let ink = if f > 0.5 { WHITE } else { BLACK };
                let style =
                    TextStyle::from((FAMILY, 18).into_font()).color(&ink).pos(plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Center,
                    ));
                chart
                    .draw_series(std::iter::once(Text::new(v.to_string(), (c as f64 + 0.5, y + 0.5), style)))
                    .map_err(|x| e(&x))?;
            }
        }
        root.present().map_err(|x| e(&x))?;
    }
    save_png(path, buf, size)
}
