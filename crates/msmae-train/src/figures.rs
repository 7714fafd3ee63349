//! Figures people look at: attention heat maps over images, and MAE reconstructions
//! (original | what the encoder saw | reconstruction).

use std::path::Path;

use image::{Rgb, RgbImage};

use msmae_core::StageError;
use msmae_mask::MaskPlan;

use crate::data::Normalizer;

/// A normalised C×H×W image back to RGB bytes (grey replicated for one channel).
pub fn denormalize(chw: &[f32], c: usize, h: usize, w: usize, norm: &Normalizer) -> RgbImage {
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let ch = |k: usize| {
                let v = chw[(k * h + y) * w + x] * norm.std[k] + norm.mean[k];
                (v * 255.0).round().clamp(0.0, 255.0) as u8
            };
            let px = if c == 1 { [ch(0); 3] } else { [ch(0), ch(1), ch(2)] };
            img.put_pixel(x as u32, y as u32, Rgb(px));
        }
    }
    img
}

/// The "jet"-like colour of a weight in [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r * 255.0, g * 255.0, b * 255.0]
}

/// The image, the map over it (blended), and optionally the lesion outline, side by side,
/// upscaled by `scale` for viewing.
pub fn overlay(img: &RgbImage, map: &[f32], grid: [usize; 2], lesion: Option<&[u8]>, scale: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (max, min) = map.iter().fold((f32::MIN, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
    let span = (max - min).max(1e-12);
    let mut out = RgbImage::new(2 * w * scale + scale, h * scale);
    for y in 0..h * scale {
        for x in 0..w * scale {
            let (sx, sy) = (x / scale, y / scale);
            let p = img.get_pixel(sx, sy).0;
            out.put_pixel(x, y, Rgb(p));
            let cell = (sy as usize * grid[0] / h as usize) * grid[1] + sx as usize * grid[1] / w as usize;
            let c = heat((map[cell] - min) / span);
            let mut q = [0u8; 3];
            for k in 0..3 {
                q[k] = (0.5 * f32::from(p[k]) + 0.5 * c[k]).round() as u8;
            }
            let edge = lesion.is_some_and(|m| {
                let at = |xx: u32, yy: u32| m[(yy * w + xx) as usize] > 0;
                at(sx, sy)
                    && [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)].iter().any(|(dx, dy)| {
                        let (nx, ny) = (i64::from(sx) + dx, i64::from(sy) + dy);
                        nx < 0 || ny < 0 || nx >= i64::from(w) || ny >= i64::from(h) || !at(nx as u32, ny as u32)
                    })
            });
            out.put_pixel(w * scale + scale + x, y, Rgb(if edge { [255, 255, 255] } else { q }));
        }
    }
    out
}

/// One reconstruction row: original | visible patches only (masked grey, thrown black) |
/// visible + predicted masked patches (thrown black). `pred` holds the predicted patches in
/// the order of `plan.masked`, already in normalised pixel space, `(p, p, C)` each.
#[allow(clippy::too_many_arguments)]
pub fn reconstruction_row(
    chw: &[f32],
    c: usize,
    h: usize,
    w: usize,
    p: usize,
    plan: &MaskPlan,
    pred: &[f32],
    norm: &Normalizer,
) -> RgbImage {
    let gw = w / p;
    let orig = denormalize(chw, c, h, w, norm);
    let mut rec = chw.to_vec();
    let pd = p * p * c;
    for (j, &patch) in plan.masked.iter().enumerate() {
        let (gr, gc) = (patch / gw, patch % gw);
        for pr in 0..p {
            for pc in 0..p {
                for ch in 0..c {
                    rec[(ch * h + gr * p + pr) * w + gc * p + pc] = pred[j * pd + (pr * p + pc) * c + ch];
                }
            }
        }
    }
    let mut recon = denormalize(&rec, c, h, w, norm);
    let mut seen = orig.clone();
    let paint = |img: &mut RgbImage, patch: usize, colour: [u8; 3]| {
        let (gr, gc) = (patch / gw, patch % gw);
        for y in 0..p {
            for x in 0..p {
                img.put_pixel((gc * p + x) as u32, (gr * p + y) as u32, Rgb(colour));
            }
        }
    };
    for &m in &plan.masked {
        paint(&mut seen, m, [128, 128, 128]);
    }
    for &t in &plan.thrown {
        paint(&mut seen, t, [0, 0, 0]);
        paint(&mut recon, t, [0, 0, 0]);
    }
    let gap = 2;
    let mut row = RgbImage::from_pixel((3 * w + 2 * gap) as u32, h as u32, Rgb([255, 255, 255]));
    for (k, img) in [orig, seen, recon].iter().enumerate() {
        image::imageops::replace(&mut row, img, (k * (w + gap)) as i64, 0);
    }
    row
}

/// Stack rows vertically, upscale by `scale`, save as PNG.
pub fn save_sheet(path: &Path, rows: &[RgbImage], scale: u32) -> Result<(), StageError> {
    let w = rows.iter().map(RgbImage::width).max().unwrap_or(1);
    let h: u32 = rows.iter().map(|r| r.height() + 2).sum::<u32>().max(1);
    let mut sheet = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let mut y = 0;
    for r in rows {
        image::imageops::replace(&mut sheet, r, 0, i64::from(y));
        y += r.height() + 2;
    }
    let big = image::imageops::resize(&sheet, w * scale, h * scale, image::imageops::FilterType::Nearest);
    big.save(path).map_err(|e| StageError::write(path, e))
}
