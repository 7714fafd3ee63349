//! Augmentation that the weight map must follow (docs/method.md §3.4): RandomResizedCrop
//! (scale 0.2–1, aspect 3/4–4/3, torchvision's sampling rule) and horizontal flip, applied
//! to the image by the data loader and to the attention map here, so that the weights still
//! sit on the patches they describe.
//!
//! The public reference code crops the map with pixel offsets divided by the image size,
//! which always takes the map's top-left corner. Here the crop box is scaled to map cells
//! (`grid/H`, `grid/W`) and each output patch receives the exact integral of the
//! piecewise-constant map over the region it covers (nearest-upsampling the map to pixels,
//! cropping, resizing and summing per patch, without the resampling error).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A crop rectangle in source-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    pub top: f64,
    pub left: f64,
    pub height: f64,
    pub width: f64,
}

impl CropBox {
    pub fn full(height: usize, width: usize) -> Self {
        CropBox { top: 0.0, left: 0.0, height: height as f64, width: width as f64 }
    }
}

/// What was done to one sample's image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    pub crop: CropBox,
    pub flip: bool,
}

impl Augmentation {
    /// No augmentation (evaluation).
    pub fn identity(height: usize, width: usize) -> Self {
        Augmentation { crop: CropBox::full(height, width), flip: false }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area fraction
/// in `scale` and log-uniform aspect ratio in `ratio`; otherwise a centre crop with the
/// aspect ratio clamped into `ratio`. Integer pixel boxes, like torchvision.
pub fn random_resized_crop(
    rng: &mut ChaCha8Rng,
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let (h, w) = (height as f64, width as f64);
    let area = h * w;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let top = rng.random_range(0..=(height - ch as usize)) as f64;
            let left = rng.random_range(0..=(width - cw as usize)) as f64;
            return CropBox { top, left, height: ch, width: cw };
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio.0 {
        (w, (w / ratio.0).round())
    } else if in_ratio > ratio.1 {
        ((h * ratio.1).round(), h)
    } else {
        (w, h)
    };
    CropBox { top: ((h - ch) / 2.0).floor(), left: ((w - cw) / 2.0).floor(), height: ch, width: cw }
}

/// Sample the training augmentation of docs/method.md §5: RandomResizedCrop with `scale`
/// (0.2–1 in the paper), aspect 3/4–4/3, and a horizontal flip with probability 1/2.
pub fn sample(rng: &mut ChaCha8Rng, height: usize, width: usize, scale: (f64, f64)) -> Augmentation {
    let crop = random_resized_crop(rng, height, width, scale, (3.0 / 4.0, 4.0 / 3.0));
    Augmentation { crop, flip: rng.random_bool(0.5) }
}

/// Move a `map_h × map_w` weight map (covering a `src_h × src_w` image) through `aug` onto
/// an `out_h × out_w` patch grid: each output patch gets the integral of the map over the
/// part of the source it shows (map cells count with unit area).
#[allow(clippy::too_many_arguments)]
pub fn transform_weights(
    map: &[f32],
    map_h: usize,
    map_w: usize,
    src_h: usize,
    src_w: usize,
    aug: &Augmentation,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    assert_eq!(map.len(), map_h * map_w, "weight map has {} values, expected {map_h}×{map_w}", map.len());
    let (sy, sx) = (map_h as f64 / src_h as f64, map_w as f64 / src_w as f64);
    let (top, left) = (aug.crop.top * sy, aug.crop.left * sx);
    let (ph, pw) = (aug.crop.height * sy / out_h as f64, aug.crop.width * sx / out_w as f64);
    let mut out = vec![0f32; out_h * out_w];
    for r in 0..out_h {
        let (y0, y1) = (top + r as f64 * ph, top + (r + 1) as f64 * ph);
        for c in 0..out_w {
            // A flipped image shows source column (out_w − 1 − c) at column c.
            let cs = if aug.flip { out_w - 1 - c } else { c };
            let (x0, x1) = (left + cs as f64 * pw, left + (cs + 1) as f64 * pw);
            let mut acc = 0f64;
            for cy in (y0.floor().max(0.0) as usize)..(y1.ceil() as usize).min(map_h) {
                let oy = (y1.min(cy as f64 + 1.0) - y0.max(cy as f64)).max(0.0);
                if oy == 0.0 {
                    continue;
                }
                for cx in (x0.floor().max(0.0) as usize)..(x1.ceil() as usize).min(map_w) {
                    let ox = (x1.min(cx as f64 + 1.0) - x0.max(cx as f64)).max(0.0);
                    acc += f64::from(map[cy * map_w + cx]) * oy * ox;
                }
            }
            out[r * out_w + c] = acc as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample_rng;

    #[test]
    fn identity_keeps_the_map_and_flip_mirrors_it() {
        let map: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let id = Augmentation::identity(64, 64);
        assert_eq!(transform_weights(&map, 4, 4, 64, 64, &id, 4, 4), map);
        let flipped = transform_weights(&map, 4, 4, 64, 64, &Augmentation { flip: true, ..id }, 4, 4);
        assert_eq!(&flipped[..4], &[3.0, 2.0, 1.0, 0.0]);
        // a finer output grid splits each cell's weight evenly
        let fine = transform_weights(&map, 4, 4, 64, 64, &id, 8, 8);
        assert_eq!(fine[2], 0.25); // cell (0, 1), weight 1, a quarter of it
        assert_eq!(fine[8 * 7 + 7], 15.0 * 0.25);
    }

    #[test]
    fn a_bottom_right_crop_takes_the_bottom_right_weights() {
        // The reference code's bug would return the top-left corner's (zero) weights here.
        let mut map = vec![0f32; 14 * 14];
        for y in 7..14 {
            for x in 7..14 {
                map[y * 14 + x] = 1.0;
            }
        }
        let aug = Augmentation { crop: CropBox { top: 112.0, left: 112.0, height: 112.0, width: 112.0 }, flip: false };
        let out = transform_weights(&map, 14, 14, 224, 224, &aug, 14, 14);
        assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-6), "{out:?}");
        let aug = Augmentation { crop: CropBox { top: 0.0, left: 0.0, height: 112.0, width: 112.0 }, flip: false };
        assert!(transform_weights(&map, 14, 14, 224, 224, &aug, 14, 14).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn mass_is_conserved_over_random_crops() {
        let map: Vec<f32> = (0..196).map(|i| ((i * 37) % 11) as f32).collect();
        for s in 0..200 {
            let aug = sample(&mut sample_rng(5, "augment", 0, s), 224, 224, (0.2, 1.0));
            let out = transform_weights(&map, 14, 14, 224, 224, &aug, 14, 14);
            // integral of the map over the crop box, computed directly
            let (t, l) = (aug.crop.top / 16.0, aug.crop.left / 16.0);
            let (b, r) = (t + aug.crop.height / 16.0, l + aug.crop.width / 16.0);
            let mut want = 0f64;
            for y in 0..14 {
                for x in 0..14 {
                    let oy = (b.min(y as f64 + 1.0) - t.max(y as f64)).max(0.0);
                    let ox = (r.min(x as f64 + 1.0) - l.max(x as f64)).max(0.0);
                    want += f64::from(map[y * 14 + x]) * oy * ox;
                }
            }
            let got: f64 = out.iter().map(|&v| f64::from(v)).sum();
            assert!((got - want).abs() < 1e-3 * want.max(1.0), "{aug:?}: {got} vs {want}");
        }
    }

    #[test]
    fn crops_follow_torchvision_bounds() {
        for s in 0..500 {
            let c = random_resized_crop(&mut sample_rng(1, "augment", 0, s), 64, 48, (0.2, 1.0), (0.75, 4.0 / 3.0));
            assert!(c.top >= 0.0 && c.left >= 0.0 && c.top + c.height <= 64.0 && c.left + c.width <= 48.0, "{c:?}");
            let frac = c.height * c.width / (64.0 * 48.0);
            assert!((0.18..=1.0).contains(&frac), "{c:?}: area fraction {frac}");
            assert_eq!(c.height.fract(), 0.0);
        }
        let a = sample(&mut sample_rng(9, "augment", 3, 7), 64, 64, (0.2, 1.0));
        assert_eq!(
            a,
            sample(&mut sample_rng(9, "augment", 3, 7), 64, 64, (0.2, 1.0)),
            "same (seed, epoch, id), same crop"
        );
    }
}
