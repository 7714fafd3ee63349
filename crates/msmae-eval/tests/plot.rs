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
    line_chart(&p, "Loss per epoch", "epoch", "loss", &[Series::new("train", train), Series::new("val", val)]).expect("chart");
    let img = image::open(&p).expect("decode").to_rgb8();
    assert_eq!(img.dimensions(), CHART_SIZE);
    // The first series' colour (Tableau blue) is drawn.
    assert!(img.pixels().filter(|px| px.0 == [31, 119, 180]).count() > 200, "train line missing");
    assert!(img.pixels().filter(|px| px.0 == [255, 127, 14]).count() > 200, "val line missing");
    // Title text: dark pixels in the top band, centred.
    let (w, _) = img.dimensions();
    let title = (0..48).flat_map(|y| (w / 3..2 * w / 3).map(move |x| (x, y))).filter(|&(x, y)| dark(img.get_pixel(x, y))).count();
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
