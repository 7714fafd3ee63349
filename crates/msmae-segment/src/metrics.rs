//! Dice (= F1 of the foreground pixels) and IoU of binary masks (docs/method.md §6).

/// Dice and IoU of a predicted and a ground-truth binary mask (non-zero = foreground).
/// Both empty: a perfect (1, 1) — nothing to find and nothing found.
///
/// # Panics
/// When the masks differ in length.
pub fn dice_iou(pred: &[u8], gt: &[u8]) -> (f64, f64) {
    assert_eq!(pred.len(), gt.len(), "masks of {} and {} pixels", pred.len(), gt.len());
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (p, g) in pred.iter().zip(gt) {
        match (*p > 0, *g > 0) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    if tp + fp + fn_ == 0 {
        return (1.0, 1.0);
    }
    let dice = 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
    let iou = tp as f64 / (tp + fp + fn_) as f64;
    (dice, iou)
}

/// Means over the test images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Mean over images with a non-empty ground truth (the paper's figure).
    pub dice_lesion: f64,
    pub iou_lesion: f64,
    pub n_lesion: usize,
    /// Mean over every image (empty/empty counts as 1).
    pub dice_all: f64,
    pub iou_all: f64,
    pub n: usize,
}

/// Summarise per-image records `{dice, iou, lesion_pixels}`.
pub fn summarize(per_image: &[serde_json::Value]) -> Summary {
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let lesion: Vec<&serde_json::Value> =
        per_image.iter().filter(|v| v["lesion_pixels"].as_u64().unwrap_or(0) > 0).collect();
    let mean = |xs: &[&serde_json::Value], k: &str| {
        if xs.is_empty() { f64::NAN } else { xs.iter().map(|v| f(v, k)).sum::<f64>() / xs.len() as f64 }
    };
    let all: Vec<&serde_json::Value> = per_image.iter().collect();
    Summary {
        dice_lesion: mean(&lesion, "dice"),
        iou_lesion: mean(&lesion, "iou"),
        n_lesion: lesion.len(),
        dice_all: mean(&all, "dice"),
        iou_all: mean(&all, "iou"),
        n: all.len(),
    }
}

/// [`summarize`] per value of the string field `key` (e.g. the image's class), in
/// sorted order; records without the field are left out.
pub fn summarize_by(per_image: &[serde_json::Value], key: &str) -> Vec<(String, Summary)> {
    let mut groups: std::collections::BTreeMap<String, Vec<serde_json::Value>> = std::collections::BTreeMap::new();
    for v in per_image {
        if let Some(k) = v[key].as_str() {
            groups.entry(k.to_string()).or_default().push(v.clone());
        }
    }
    groups.into_iter().map(|(k, v)| (k, summarize(&v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_counted_cases() {
        // tp 2, fp 1, fn 1 → dice 4/6, iou 2/4
        let (d, i) = dice_iou(&[1, 1, 1, 0, 0], &[1, 1, 0, 1, 0]);
        assert!((d - 4.0 / 6.0).abs() < 1e-12 && (i - 0.5).abs() < 1e-12);
        assert_eq!(dice_iou(&[0, 0], &[0, 0]), (1.0, 1.0));
        assert_eq!(dice_iou(&[1, 0], &[0, 1]), (0.0, 0.0));
        // Dice = 2·IoU / (1 + IoU) always
        let (d, i) = dice_iou(&[1, 1, 0, 1, 0, 0, 1], &[1, 0, 0, 1, 1, 1, 1]);
        assert!((d - 2.0 * i / (1.0 + i)).abs() < 1e-12);
    }

    #[test]
    fn per_class_summaries_group_by_the_image_class() {
        let r = |class: &str, dice: f64, lesion: u64| serde_json::json!({ "class": class, "dice": dice, "iou": dice / 2.0, "lesion_pixels": lesion });
        let v = [r("malignant", 0.4, 10), r("benign", 0.8, 5), r("benign", 0.6, 7), r("normal", 1.0, 0)];
        let by = summarize_by(&v, "class");
        let names: Vec<&str> = by.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["benign", "malignant", "normal"]);
        assert!((by[0].1.dice_lesion - 0.7).abs() < 1e-12 && by[0].1.n_lesion == 2);
        assert!(
            by[2].1.dice_lesion.is_nan() && by[2].1.n == 1 && by[2].1.dice_all == 1.0,
            "no lesion: only the all-images mean"
        );
    }
}
