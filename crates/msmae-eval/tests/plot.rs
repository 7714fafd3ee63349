//! Charts decode back as PNGs of the declared size, with lines and text actually drawn.

use msmae_eval::plot::{CHART_SIZE, PlotError, Series, heatmap_chart, line_chart};

fn dark(px: &image::Rgb<u8>) -> bool {
    px.0.iter().all(|&c| c < 100)
}

#[test]
fn line_chart_draws_lines_text_and_legend() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("loss.png");
    let train: Vec<(f64, f64)> = (0..50).map(|e| (f64::from(e), 2.0 * (-f64::from(e) / 15.0).exp() + 0.1)).collect();
    let val: Vec<(f64, f64)> = (0..50).map(|e| (f64::from(e), 2.1 * (-f64::from(e) / 18.0).exp() + 0.2)).collect();
    line_chart(&p, "Loss per epoch", "epoch", "loss", &[Series::new("train", train), Series::new("val", val)])
        .expect("chart");
    let img = image::open(&p).expect("decode").to_rgb8();
    assert_eq!(img.dimensions(), CHART_SIZE);
    // The first series' colour (Tableau blue) is drawn.
    assert!(img.pixels().filter(|px| px.0 == [31, 119, 180]).count() > 200, "train line missing");
    assert!(img.pixels().filter(|px| px.0 == [255, 127, 14]).count() > 200, "val line missing");
    // Title text: dark pixels in the top band, centred.
    let (w, _) = img.dimensions();
    let title = (0..48)
        .flat_map(|y| (w / 3..2 * w / 3).map(move |x| (x, y)))
        .filter(|&(x, y)| dark(img.get_pixel(x, y)))
        .count();
    assert!(title > 150, "no title text ({title} dark pixels)");
    // Tick labels left of the plot area (the y axis) and the axis description.
    let left = (60..560).flat_map(|y| (0..70).map(move |x| (x, y))).filter(|&(x, y)| dark(img.get_pixel(x, y))).count();
    assert!(left > 200, "no y-axis labels ({left} dark pixels)");
}

#[test]
fn heatmap_labels_cells_with_counts() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("cm.png");
    let names: Vec<String> = ["normal", "nodule", "mass"].iter().map(|s| s.to_string()).collect();
    let cells = vec![vec![50, 3, 0], vec![4, 20, 6], vec![0, 1, 9]];
    heatmap_chart(&p, "Confusion matrix", "predicted", "true", &names, &names, &cells).expect("chart");
    let img = image::open(&p).expect("decode").to_rgb8();
    assert_eq!(img.dimensions(), CHART_SIZE);
    // The darkest shade (a full row) and white count text on it.
    let deep = img.pixels().filter(|px| px.0[2] > 100 && px.0[0] < 40).count();
    assert!(deep > 10_000, "no dark cells ({deep})");
    assert!(img.pixels().filter(|px| px.0.iter().all(|&c| c > 240)).count() > 1000);
    let e = heatmap_chart(&p, "bad", "x", "y", &names, &names, &cells[..2]).expect_err("ragged");
    assert!(matches!(e, PlotError::Data { .. }) && e.to_string().contains("cm.png"), "{e}");
    let e = line_chart(&p, "empty", "x", "y", &[Series::new("s", vec![])]).expect_err("empty");
    assert!(e.to_string().contains("has no points"), "{e}");
    let e = line_chart(&p, "nan", "x", "y", &[Series::new("s", vec![(0.0, f64::NAN)])]).expect_err("nan");
    assert!(e.to_string().contains("series `s`"), "{e}");
}

/// A confusion matrix of 10,000 classes (or a ROC chart of as many curves) is not drawn —
/// its labels alone would take gigabytes — but replaced by a chart-sized note, at once.
#[test]
fn charts_past_a_hundred_classes_become_a_note_without_allocating_them() {
    let d = tempfile::tempdir().expect("tmp");
    let n = 10_000;
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    // No cells at all: the chart must decide from the labels, before touching the cells.
    let t = std::time::Instant::now();
    let p = d.path().join("confusion.png");
    heatmap_chart(&p, "Confusion", "predicted", "true", &names, &names, &[]).expect("a note");
    let img = image::open(&p).expect("decode").to_rgb8();
    assert_eq!(img.dimensions(), CHART_SIZE);
    assert!(img.pixels().filter(|px| dark(px)).count() > 100, "the note's text is drawn");
    let series: Vec<Series> = (0..150).map(|i| Series::new(format!("c{i}"), vec![(0.0, 0.0), (1.0, 1.0)])).collect();
    line_chart(&d.path().join("roc.png"), "ROC", "fpr", "tpr", &series).expect("a note");
    assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
}
