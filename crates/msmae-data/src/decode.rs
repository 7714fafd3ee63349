//! Decoding and resizing source images for the image table: decode (PNG, JPEG, TIFF, BMP,
//! DICOM via [`crate::dicom`]),
//! convert channels explicitly, fix the aspect ratio by an explicit policy, and resize
//! with an area-correct (antialiased) filter.

use std::path::Path;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::GenericImageView;
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

/// Samples (width × height × channels) an image may declare before it is decoded: 2³⁰ by
/// default (a 32768 × 32768 RGB image), far above any radiograph, fundus or dermoscopy
/// image; `MSMAE_MAX_IMAGE_SAMPLES` sets another. A file declaring more is refused from its
/// header, before any pixel buffer is allocated.
pub fn max_samples() -> u64 {
    std::env::var("MSMAE_MAX_IMAGE_SAMPLES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(1 << 30)
}

/// Bytes an image file may have: 1 GiB by default (a 16-bit 16k × 16k DICOM is 512 MiB),
/// `MSMAE_MAX_IMAGE_BYTES` sets another.
pub fn max_file_bytes() -> u64 {
    std::env::var("MSMAE_MAX_IMAGE_BYTES").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(1 << 30)
}

/// Read an image (or mask) file: refused before any read when it is not a regular file (a
/// FIFO would block forever, `/dev/zero` never ends) or is larger than [`max_file_bytes`].
pub fn read_image_file(path: &Path) -> Result<Vec<u8>, DecodeError> {
    use std::io::Read;
    let md = std::fs::metadata(path).map_err(|e| DecodeError::Read(e.to_string()))?;
    let ft = md.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO (named pipe)"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(DecodeError::Read(format!("{what}, not an image file")));
    }
    let max = max_file_bytes();
    if md.len() > max {
        return Err(DecodeError::Read(format!(
            "{} bytes, over the limit of {max} (MSMAE_MAX_IMAGE_BYTES raises it for a trusted file)",
            md.len()
        )));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| DecodeError::Read(e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(DecodeError::Read(format!("grew past the limit of {max} bytes while being read")));
    }
    Ok(bytes)
}

/// `Err` when a `w × h × c` image is over [`max_samples`].
pub fn check_samples(w: u64, h: u64, c: u64) -> Result<(), DecodeError> {
    let n = w.saturating_mul(h).saturating_mul(c.max(1));
    let max = max_samples();
    if n > max {
        return Err(DecodeError::Decode(format!(
            "the header declares {w}×{h}×{c} = {n} samples, over the limit of {max} (MSMAE_MAX_IMAGE_SAMPLES raises it for a trusted file)"
        )));
    }
    Ok(())
}

/// Decode a PNG/JPEG/TIFF/BMP with its size checked from the header first and the
/// decoder's own allocation limit set to what that size needs.
fn decode_limited(bytes: &[u8]) -> Result<image::DynamicImage, DecodeError> {
    use image::ImageDecoder;
    let bad = |e: image::ImageError| DecodeError::Decode(e.to_string());
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Decode(e.to_string()))
    };
    let decoder = reader()?.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    let color = decoder.color_type();
    check_samples(u64::from(w), u64::from(h), u64::from(color.channel_count()))?;
    drop(decoder);
    let mut limits = image::Limits::default();
    // the decoded buffer, plus room for the decoder's own scratch
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * u64::from(color.bytes_per_pixel()) * 2 + (64 << 20));
    let mut r = reader()?;
    r.limits(limits);
    r.decode().map_err(bad)
}

/// Run a decoder so that a panic inside it becomes this file's error (`on_error: skip`
/// then skips the file) instead of taking the stage down.
pub fn guarded<T>(f: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(DecodeError::Decode(format!("the decoder failed on this file ({what})")))
    })
}

/// Decode `bytes` and bring them to `size × size × channels` (channels 1: luma, 3: RGB;
/// alpha is dropped; grey sources are replicated to 3 channels when asked). 16-bit sources
/// (DICOM, 16-bit PNG/TIFF) are resized in 16 bits and quantised to 8 bits last.
/// JPEGs at least twice the table size are decoded at reduced scale (see `jpeg_reduced`).
pub fn decode_resize(bytes: &[u8], size: u32, channels: u32, aspect: Aspect) -> Result<Decoded, DecodeError> {
    decode_resize_with(bytes, size, channels, aspect, 8, true)
}

/// [`decode_resize`] into `bit_depth` 8 or 16 bits per sample (16: little-endian u16
/// pairs; 8-bit sources are scaled by 257), with the DCT-domain JPEG reduction on or off.
pub fn decode_resize_with(
    bytes: &[u8],
    size: u32,
    channels: u32,
    aspect: Aspect,
    bit_depth: u32,
    jpeg_dct_reduction: bool,
) -> Result<Decoded, DecodeError> {
    guarded(|| decode_resize_unguarded(bytes, size, channels, aspect, bit_depth, jpeg_dct_reduction))
}

fn decode_resize_unguarded(
    bytes: &[u8],
    size: u32,
    channels: u32,
    aspect: Aspect,
    bit_depth: u32,
    jpeg_dct_reduction: bool,
) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let widen = |d: Decoded| {
        if bit_depth == 16 {
            Decoded { pixels: d.pixels.iter().flat_map(|&v| (u16::from(v) * 257).to_le_bytes()).collect(), ..d }
        } else {
            d
        }
    };
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_complete(bytes) {
        // zune-jpeg (the general decoder) fills a cut-off scan with grey instead of failing
        return Err(DecodeError::Decode("truncated JPEG: the scan has no end-of-image marker (FFD9)".into()));
    }
    // A JPEG the reduced decoder cannot read (arithmetic coding, damage it does not
    // tolerate) goes to the general decoder, which names the problem if it fails too.
    if jpeg_dct_reduction && let Some(Ok(d)) = jpeg_reduced(bytes, size, channels, aspect) {
        return Ok(widen(d));
    }
    let img = if crate::dicom::is_dicom(bytes) {
        crate::dicom::decode(bytes).map_err(DecodeError::Decode)?.to_image()
    } else {
        decode_limited(bytes)?
    };
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(DecodeError::Decode(format!("image has size {w}×{h}")));
    }
    let deep = img.color().bytes_per_pixel() > img.color().channel_count();
    let raw = match (channels, deep) {
        (1, false) => Raw { w, h, pt: PixelType::U8, bytes: img.into_luma8().into_raw() },
        (_, false) => Raw { w, h, pt: PixelType::U8x3, bytes: img.into_rgb8().into_raw() },
        (1, true) => Raw {
            w,
            h,
            pt: PixelType::U16,
            bytes: img.into_luma16().into_raw().into_iter().flat_map(u16::to_ne_bytes).collect(),
        },
        (_, true) => Raw {
            w,
            h,
            pt: PixelType::U16x3,
            bytes: img.into_rgb16().into_raw().into_iter().flat_map(u16::to_ne_bytes).collect(),
        },
    };
    let out = fit(&raw, size, aspect)?;
    let pixels = match (deep, bit_depth == 16) {
        (true, true) => {
            out.bytes.chunks_exact(2).flat_map(|b| u16::from_ne_bytes([b[0], b[1]]).to_le_bytes()).collect()
        }
        (true, false) => out
            .bytes
            .chunks_exact(2)
            .map(|b| ((u32::from(u16::from_ne_bytes([b[0], b[1]])) * 255 + 32767) / 65535) as u8)
            .collect(),
        (false, _) => return Ok(widen(Decoded { pixels: out.bytes, source_width: w, source_height: h })),
    };
    Ok(Decoded { pixels, source_width: w, source_height: h })
}

/// Whether a JPEG's last scan is followed by its end-of-image marker. Inside entropy-coded
/// data 0xFF is always stuffed (FF 00), so FF D9 after the last start-of-scan (FF DA)
/// can only be the real EOI; a thumbnail's EOI comes before the main scan.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    matches!((last(0xDA), last(0xD9)), (Some(sos), Some(eoi)) if eoi > sos)
}

/// The largest DCT reduction (1, 2, 4 or 8) that keeps the part of a `w × h` image the
/// aspect policy uses at least `size` pixels on each side.
fn reduction(w: u32, h: u32, size: u32, aspect: Aspect) -> u32 {
    let need = |k: u32| {
        let (sw, sh) = (w.div_ceil(k), h.div_ceil(k));
        match aspect {
            Aspect::Crop => sw.min(sh) >= size,
            Aspect::Pad => sw.max(sh) >= size,
            Aspect::Stretch => sw >= size && sh >= size,
        }
    };
    [8, 4, 2].into_iter().find(|&k| need(k)).unwrap_or(1)
}

/// A JPEG at least twice the table size is decoded at 1/2, 1/4 or 1/8 scale in the DCT
/// domain (what libjpeg's scaled decoding and Pillow's `draft` do: each output pixel
/// comes from the low frequencies of its block, i.e. a band-limited downsample), then
/// resized like any image. `None`: not a JPEG, no reduction possible, or a colour space
/// left to the general decoder (CMYK, 16-bit).
fn jpeg_reduced(bytes: &[u8], size: u32, channels: u32, aspect: Aspect) -> Option<Result<Decoded, DecodeError>> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut d = jpeg_decoder::Decoder::new(bytes);
    d.read_info().ok()?;
    let info = d.info()?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    if w == 0
        || h == 0
        || !matches!(info.pixel_format, jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::RGB24)
    {
        return None;
    }
    if let Err(e) = check_samples(u64::from(w), u64::from(h), 3) {
        return Some(Err(e));
    }
    let k = reduction(w, h, size, aspect);
    if k == 1 {
        return None;
    }
    let mut run = || -> Result<Decoded, DecodeError> {
        let (sw, sh) =
            d.scale(w.div_ceil(k) as u16, h.div_ceil(k) as u16).map_err(|e| DecodeError::Decode(e.to_string()))?;
        let px = d.decode().map_err(|e| DecodeError::Decode(e.to_string()))?;
        let (sw, sh) = (u32::from(sw), u32::from(sh));
        let grey = info.pixel_format == jpeg_decoder::PixelFormat::L8;
        let (pt, bytes) = match (channels, grey) {
            (1, true) => (PixelType::U8, px),
            (1, false) => (
                PixelType::U8,
                px.chunks_exact(3)
                    .map(|p| {
                        ((2126 * u32::from(p[0]) + 7152 * u32::from(p[1]) + 722 * u32::from(p[2]) + 5000) / 10000) as u8
                    })
                    .collect(),
            ),
            (_, true) => (PixelType::U8x3, px.iter().flat_map(|&v| [v, v, v]).collect()),
            (_, false) => (PixelType::U8x3, px),
        };
        if bytes.len() != (sw * sh) as usize * pt.size() {
            return Err(DecodeError::Decode(format!("truncated JPEG: {} bytes decoded for {sw}×{sh}", bytes.len())));
        }
        let out = fit(&Raw { w: sw, h: sh, pt, bytes }, size, aspect)?;
        Ok(Decoded { pixels: out.bytes, source_width: w, source_height: h })
    };
    Some(run())
}

/// Interleaved pixels in one of fast_image_resize's types (U8, U8x3, U16, U16x3).
struct Raw {
    w: u32,
    h: u32,
    pt: PixelType,
    bytes: Vec<u8>,
}

thread_local! {
    static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
}

fn resize(
    src: &Raw,
    dst_w: u32,
    dst_h: u32,
    crop: Option<(u32, u32, u32, u32)>,
    nearest: bool,
) -> Result<Raw, DecodeError> {
    let bad = |e: String| DecodeError::Decode(format!("resize: {e}"));
    let view = ImageRef::new(src.w, src.h, &src.bytes, src.pt).map_err(|e| bad(e.to_string()))?;
    let mut dst = Image::new(dst_w, dst_h, src.pt);
    let mut opts = ResizeOptions::new().resize_alg(if nearest {
        ResizeAlg::Nearest
    } else {
        ResizeAlg::Convolution(FilterType::Bilinear)
    });
    if let Some((l, t, w, h)) = crop {
        opts = opts.crop(f64::from(l), f64::from(t), f64::from(w), f64::from(h));
    }
    RESIZER.with(|r| r.borrow_mut().resize(&view, &mut dst, &opts)).map_err(|e| bad(e.to_string()))?;
    Ok(Raw { w: dst_w, h: dst_h, pt: src.pt, bytes: dst.into_vec() })
}

/// Bring `src` to `size × size` by the aspect policy, with Pillow's antialiased bilinear
/// filter (support widened with the reduction, so downscaling averages, never aliases).
fn fit(src: &Raw, size: u32, aspect: Aspect) -> Result<Raw, DecodeError> {
    fit_with(src, size, aspect, false)
}

/// [`fit`], with nearest-neighbour sampling when `nearest` (class-index masks: no value
/// may be blended into another class).
fn fit_with(src: &Raw, size: u32, aspect: Aspect, nearest: bool) -> Result<Raw, DecodeError> {
    let (w, h) = (src.w, src.h);
    match aspect {
        Aspect::Stretch => resize(src, size, size, None, nearest),
        Aspect::Crop => {
            let s = w.min(h);
            resize(src, size, size, Some(((w - s) / 2, (h - s) / 2, s, s)), nearest)
        }
        Aspect::Pad => {
            let (sw, sh) = if w >= h {
                (size, ((f64::from(h) * f64::from(size) / f64::from(w)).round() as u32).max(1))
            } else {
                (((f64::from(w) * f64::from(size) / f64::from(h)).round() as u32).max(1), size)
            };
            let scaled = resize(src, sw, sh, None, nearest)?;
            let px = src.pt.size();
            let mut bytes = vec![0u8; (size * size) as usize * px];
            let (x0, y0) = (((size - sw) / 2) as usize, ((size - sh) / 2) as usize);
            let row = sw as usize * px;
            for y in 0..sh as usize {
                let at = ((y0 + y) * size as usize + x0) * px;
                bytes[at..at + row].copy_from_slice(&scaled.bytes[y * row..(y + 1) * row]);
            }
            Ok(Raw { w: size, h: size, pt: src.pt, bytes })
        }
    }
}

/// Read and decode one mask file of an image whose source is `width × height` (sizes must
/// agree). `Err` names the file.
fn load_mask(
    p: &std::path::Path,
    width: u32,
    height: u32,
) -> Result<image::DynamicImage, (std::path::PathBuf, DecodeError)> {
    let bytes = read_image_file(p).map_err(|e| (p.to_path_buf(), e))?;
    if bytes.is_empty() {
        return Err((p.to_path_buf(), DecodeError::Empty));
    }
    let m = guarded(|| decode_limited(&bytes)).map_err(|e| (p.to_path_buf(), e))?;
    if m.dimensions() != (width, height) {
        let (mw, mh) = m.dimensions();
        return Err((
            p.to_path_buf(),
            DecodeError::Decode(format!("mask is {mw}×{mh} but its image is {width}×{height}")),
        ));
    }
    Ok(m)
}

/// Read one or more mask files of an image whose source is `width × height`, merge them
/// (a pixel is foreground when it is in any mask, i.e. > 127 in any file), and bring the
/// result through the image's aspect policy to `size × size` values in {0, 1} (area
/// resize, then foreground where at least half of the pixel's area was). `Err` names the
/// mask file.
pub fn decode_masks(
    paths: &[std::path::PathBuf],
    width: u32,
    height: u32,
    size: u32,
    aspect: Aspect,
) -> Result<Vec<u8>, (std::path::PathBuf, DecodeError)> {
    let mut merged = vec![0u8; width as usize * height as usize];
    for p in paths {
        let m = load_mask(p, width, height)?.into_luma8();
        for (o, v) in merged.iter_mut().zip(m.as_raw()) {
            if *v > 127 {
                *o = 255;
            }
        }
    }
    let first = paths.first().cloned().unwrap_or_default();
    let out =
        fit(&Raw { w: width, h: height, pt: PixelType::U8, bytes: merged }, size, aspect).map_err(|e| (first, e))?;
    Ok(out.bytes.into_iter().map(|v| u8::from(v >= 128)).collect())
}

/// A multi-class mask: one single-channel file of class indices (0 = background, below
/// `classes`) for an image whose source is `width × height`, brought through the image's
/// aspect policy to `size × size` by nearest neighbour. `Err` names the file.
pub fn decode_class_mask(
    paths: &[std::path::PathBuf],
    width: u32,
    height: u32,
    size: u32,
    aspect: Aspect,
    classes: usize,
) -> Result<Vec<u8>, (std::path::PathBuf, DecodeError)> {
    let first = paths.first().cloned().unwrap_or_default();
    if paths.len() != 1 {
        return Err((
            first,
            DecodeError::Decode(format!("multi-class masks take one file per image, got {}", paths.len())),
        ));
    }
    let m = load_mask(&first, width, height)?;
    if m.color() != image::ColorType::L8 {
        return Err((
            first,
            DecodeError::Decode(format!(
                "a class mask must be an 8-bit single-channel image of class indices, this one is {:?}",
                m.color()
            )),
        ));
    }
    let raw = m.into_luma8().into_raw();
    if let Some(v) = raw.iter().find(|&&v| usize::from(v) >= classes) {
        return Err((
            first,
            DecodeError::Decode(format!(
                "mask value {v} is not a class index (mask_classes names {classes} classes, 0–{})",
                classes - 1
            )),
        ));
    }
    let out = fit_with(&Raw { w: width, h: height, pt: PixelType::U8, bytes: raw }, size, aspect, true)
        .map_err(|e| (first, e))?;
    Ok(out.bytes)
}

/// Read and decode a file.
pub fn decode_file(
    path: &Path,
    size: u32,
    channels: u32,
    aspect: Aspect,
    bit_depth: u32,
) -> Result<(Decoded, Vec<u8>), DecodeError> {
    let bytes = read_image_file(path)?;
    let d = decode_resize_with(&bytes, size, channels, aspect, bit_depth, true)?;
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
        let bytes = png(40, 20, |x, _| {
            if x < 5 {
                [0, 255, 0]
            } else if x < 20 {
                [255, 0, 0]
            } else {
                [0, 0, 255]
            }
        });
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
    fn dct_reduced_jpeg_matches_the_full_decode() {
        // a smooth 1024×768 photograph-like field with fine texture, JPEG q90
        let img = image::RgbImage::from_fn(1024, 768, |x, y| {
            let (fx, fy) = (x as f32 / 1024.0, y as f32 / 768.0);
            let v = 128.0 + 80.0 * (fx * 9.0).sin() * (fy * 7.0).cos() + 20.0 * ((x * 7 + y * 13) % 17) as f32 / 17.0;
            image::Rgb([v as u8, (v * 0.7) as u8, (255.0 - v) as u8])
        });
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90).encode_image(&img).expect("jpeg");
        let bytes = bytes.into_inner();
        for (aspect, channels) in [(Aspect::Crop, 3), (Aspect::Pad, 1), (Aspect::Stretch, 3)] {
            let fast = decode_resize_with(&bytes, 224, channels, aspect, 8, true).expect("reduced");
            let full = decode_resize_with(&bytes, 224, channels, aspect, 8, false).expect("full");
            assert_eq!((fast.source_width, fast.source_height), (1024, 768), "source size is the file's");
            assert_eq!(fast.pixels.len(), full.pixels.len());
            let diffs: Vec<i32> =
                fast.pixels.iter().zip(&full.pixels).map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs()).collect();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            let max = diffs.iter().copied().max().unwrap_or(0);
            eprintln!("DCT-reduced vs full decode, {aspect:?}/{channels} channels: mean {mean:.2}, max {max} levels");
            assert!(mean < 0.6 && max <= 4, "{aspect:?}/{channels}: mean {mean:.2}, max {max} levels");
        }
        // a truncated JPEG is an error on the reduced path too, never a half-grey image
        let cut = &bytes[..bytes.len() / 2];
        for dct in [true, false] {
            let e = decode_resize_with(cut, 224, 3, Aspect::Crop, 8, dct);
            assert!(
                matches!(&e, Err(DecodeError::Decode(m)) if m.contains("truncated JPEG")),
                "truncated JPEG accepted: {:?}",
                e.map(|d| d.pixels.len())
            );
        }
        // bytes after the end-of-image marker (some writers append data) are not truncation
        let mut padded = bytes.clone();
        padded.extend_from_slice(b"trailing vendor data");
        assert!(decode_resize(&padded, 224, 3, Aspect::Crop).is_ok());
        assert_eq!(reduction(1024, 1024, 224, Aspect::Crop), 4);
        assert_eq!(reduction(600, 450, 224, Aspect::Crop), 2);
        assert_eq!(reduction(300, 300, 224, Aspect::Crop), 1);
    }

    use crate::fixtures::png_declaring as png_header;

    #[test]
    fn absurd_headers_are_refused_before_decoding() {
        let e = decode_resize(&png_header(100_000, 100_000), 32, 3, Aspect::Crop).expect_err("100k × 100k");
        assert!(e.to_string().contains("100000×100000×3 = 30000000000 samples, over the limit of 1073741824"), "{e}");
        // A small image with the same broken data is an ordinary decode error, not a limit.
        let e = decode_resize(&png_header(4, 4), 32, 3, Aspect::Crop).expect_err("no pixel data");
        assert!(!e.to_string().contains("limit"), "{e}");
        assert!(check_samples(32768, 32768, 1).is_ok() && check_samples(32768, 32769, 1).is_err());
    }

    #[test]
    fn a_panicking_decoder_is_this_files_error() {
        let e = guarded::<()>(|| panic!("boom in a decoder")).expect_err("caught");
        assert_eq!(e, DecodeError::Decode("the decoder failed on this file (boom in a decoder)".into()));
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
