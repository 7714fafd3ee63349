//! Decoding and resizing source images for the image table: decode (PNG, JPEG, TIFF, BMP,
//! DICOM via [`crate::dicom`]),
//! convert channels explicitly, fix the aspect ratio by an explicit policy, and resize
//! with an area-correct (antialiased) filter.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};
use serde::{Deserialize, Serialize};

/// How a non-square source becomes a square table image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aspect {
    /// Keep the central square (loses the borders of the long side).
    #[default]
    Crop,
    /// Letterbox with black borders (keeps everything, shrinks the content).
    Pad,
    /// Resize to the square ignoring the aspect ratio.
    Stretch,
}

/// A decoded, resized image in table layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// H×W×C, uint8.
    pub pixels: Vec<u8>,
    pub source_width: u32,
    pub source_height: u32,
}

/// Why a file could not be ingested (for errors and the rejects list).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty file (0 bytes)")]
    Empty,
    #[error("cannot read: {0}")]
    Read(String),
    #[error("cannot decode image: {0}")]
    Decode(String),
}

/// Decode `bytes` and bring them to `size × size × channels` (channels 1: luma, 3: RGB;
/// alpha is dropped; grey sources are replicated to 3 channels when asked).
pub fn decode_resize(bytes: &[u8], size: u32, channels: u32, aspect: Aspect) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let img = if crate::dicom::is_dicom(bytes) {
        crate::dicom::decode(bytes).map_err(DecodeError::Decode)?.to_image()
    } else {
        image::load_from_memory(bytes).map_err(|e| DecodeError::Decode(e.to_string()))?
    };
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(DecodeError::Decode(format!("image has size {w}×{h}")));
    }
    // 16-bit (and float) sources stay 16-bit through the resize; 8 bits only at the end.
    let deep = img.color().bytes_per_pixel() > img.color().channel_count();
    let img = match (channels, deep) {
        (1, false) => DynamicImage::ImageLuma8(img.to_luma8()),
        (1, true) => DynamicImage::ImageLuma16(img.to_luma16()),
        (_, false) => DynamicImage::ImageRgb8(img.to_rgb8()),
        (_, true) => DynamicImage::ImageRgb16(img.to_rgb16()),
    };
    let out = fit(&img, size, aspect);
    let pixels = match channels {
        1 => out.to_luma8().into_raw(),
        _ => out.to_rgb8().into_raw(),
    };
    Ok(Decoded { pixels, source_width: w, source_height: h })
}

/// Bring `img` to `size × size` by the aspect policy, with an antialiased (triangle,
/// support scaled with the reduction) filter.
fn fit(img: &DynamicImage, size: u32, aspect: Aspect) -> DynamicImage {
    let (w, h) = img.dimensions();
    match aspect {
        Aspect::Stretch => img.resize_exact(size, size, FilterType::Triangle),
        Aspect::Crop => {
            let s = w.min(h);
            img.crop_imm((w - s) / 2, (h - s) / 2, s, s).resize_exact(size, size, FilterType::Triangle)
        }
        Aspect::Pad => {
            let scaled = img.resize(size, size, FilterType::Triangle); // keeps aspect, fits inside
            let mut canvas = DynamicImage::new(size, size, img.color());
            let (sw, sh) = scaled.dimensions();
            image::imageops::overlay(&mut canvas, &scaled, i64::from((size - sw) / 2), i64::from((size - sh) / 2));
            canvas
        }
    }
}

/// Read one or more mask files of an image whose source is `width × height`, merge them
/// (a pixel is foreground when it is in any mask, i.e. > 127 in any file), and bring the
/// result through the image's aspect policy to `size × size` values in {0, 1} (area
/// resize, then foreground where at least half of the pixel's area was). `Err` names the
/// mask file.
pub fn decode_masks(paths: &[std::path::PathBuf], width: u32, height: u32, size: u32, aspect: Aspect) -> Result<Vec<u8>, (std::path::PathBuf, DecodeError)> {
    let mut merged = image::GrayImage::new(width, height);
    for p in paths {
        let bytes = std::fs::read(p).map_err(|e| (p.clone(), DecodeError::Read(e.to_string())))?;
        if bytes.is_empty() {
            return Err((p.clone(), DecodeError::Empty));
        }
        let m = image::load_from_memory(&bytes).map_err(|e| (p.clone(), DecodeError::Decode(e.to_string())))?.to_luma8();
        if m.dimensions() != (width, height) {
            let (mw, mh) = m.dimensions();
            return Err((p.clone(), DecodeError::Decode(format!("mask is {mw}×{mh} but its image is {width}×{height}"))));
        }
        for (o, v) in merged.pixels_mut().zip(m.pixels()) {
            if v.0[0] > 127 {
                o.0[0] = 255;
            }
        }
    }
    let out = fit(&DynamicImage::ImageLuma8(merged), size, aspect).to_luma8();
    Ok(out.into_raw().into_iter().map(|v| u8::from(v >= 128)).collect())
}

/// Read and decode a file.
pub fn decode_file(path: &Path, size: u32, channels: u32, aspect: Aspect) -> Result<(Decoded, Vec<u8>), DecodeError> {
    let bytes = std::fs::read(path).map_err(|e| DecodeError::Read(e.to_string()))?;
    let d = decode_resize(&bytes, size, channels, aspect)?;
    Ok((d, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn aspect_policies_keep_or_drop_the_borders() {
        // 40×20: left half red, right half blue, with a green 5-px border column at x < 5
        let bytes = png(40, 20, |x, _| if x < 5 { [0, 255, 0] } else if x < 20 { [255, 0, 0] } else { [0, 0, 255] });
        let crop = decode_resize(&bytes, 10, 3, Aspect::Crop).expect("crop");
        assert_eq!((crop.source_width, crop.source_height), (40, 20));
        assert_eq!(crop.pixels.len(), 300);
        assert_eq!(crop.pixels[1], 0, "the green border column is cropped away");
        let pad = decode_resize(&bytes, 10, 3, Aspect::Pad).expect("pad");
        assert_eq!(&pad.pixels[..3], &[0, 0, 0], "top-left is letterbox black");
        assert!(pad.pixels[(3 * 10) * 3 + 1] > 100, "the green border survives padding");
    }

    #[test]
    fn channels_are_converted_explicitly() {
        let bytes = png(8, 8, |_, _| [200, 100, 50]);
        let grey = decode_resize(&bytes, 4, 1, Aspect::Crop).expect("grey");
        assert_eq!(grey.pixels.len(), 16);
        let rgb = decode_resize(&bytes, 4, 3, Aspect::Crop).expect("rgb");
        assert_eq!(&rgb.pixels[..3], &[200, 100, 50]);
    }

    #[test]
    fn downscaling_averages_instead_of_aliasing() {
        // a 1-px checkerboard at 64 px becomes mid-grey at 8 px, not black/white noise
        let bytes = png(64, 64, |x, y| if (x + y) % 2 == 0 { [255; 3] } else { [0; 3] });
        let d = decode_resize(&bytes, 8, 1, Aspect::Crop).expect("decode");
        assert!(d.pixels.iter().all(|&v| (100..=155).contains(&v)), "{:?}", d.pixels);
    }

    #[test]
    fn bad_bytes_say_why() {
        assert_eq!(decode_resize(&[], 8, 1, Aspect::Crop), Err(DecodeError::Empty));
        let mut truncated = png(16, 16, |_, _| [1, 2, 3]);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(decode_resize(&truncated, 8, 1, Aspect::Crop), Err(DecodeError::Decode(_))));
        assert!(matches!(decode_resize(b"not an image", 8, 1, Aspect::Crop), Err(DecodeError::Decode(_))));
    }
}
