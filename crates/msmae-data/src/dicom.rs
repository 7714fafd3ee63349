//! DICOM (`.dcm`) decoding for ingestion, matching pydicom's
//! `apply_voi_lut(apply_modality_lut(pixel_array))`:
//!
//! 1. Pixel data decoded by dicom-rs (uncompressed, RLE, deflate, JPEG baseline and
//!    lossless in pure Rust); any other transfer syntax is an error naming it.
//! 2. Modality LUT: Rescale Slope/Intercept, in f64.
//! 3. VOI: the first Window Center/Width with the VOI LUT Function (LINEAR, LINEAR_EXACT,
//!    SIGMOID), i.e. DICOM PS3.3 C.11.2.1.2 — normalised to [0, 1] (pydicom's output range
//!    divided out). Without a window: min–max of the modality values.
//! 4. MONOCHROME1 is inverted (`1 − n`), so bone is bright as in MONOCHROME2.
//!
//! Values stay in floating point until the caller quantises them (16-bit through the
//! resize, 8-bit in the table): the source's 10–16 bit depth is not cut before windowing.
//! A Modality LUT Sequence or VOI LUT Sequence (lookup tables instead of rescale/window),
//! multi-frame files and palette/YBR colour are refused with an error saying so.

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Whether `bytes` look like a DICOM Part 10 file (`DICM` after the 128-byte preamble).
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.len() >= 132 && &bytes[128..132] == b"DICM"
}

/// How the values were brought to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Voi {
    /// Window center/width with the named function.
    Window { center: f64, width: f64, function: VoiFunction },
    /// No window in the file: min–max of the modality values.
    MinMax { min: f64, max: f64 },
    /// Colour data: raw samples divided by the largest stored value.
    Colour,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// A decoded DICOM image, values in [0, 1], row-major H×W×C.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomImage {
    pub width: u32,
    pub height: u32,
    /// 1 (monochrome) or 3 (RGB).
    pub channels: u32,
    pub values: Vec<f32>,
    pub voi: Voi,
    pub inverted: bool,
    pub bits_stored: u16,
}

/// Windowing, normalised to [0, 1] (PS3.3 C.11.2.1.2.1–3; pydicom's `apply_windowing`
/// divided by its output range).
pub fn window(x: f64, center: f64, width: f64, f: VoiFunction) -> f64 {
    match f {
        VoiFunction::Linear => {
            let (c, w) = (center - 0.5, width - 1.0);
            if x <= c - w / 2.0 {
                0.0
            } else if x > c + w / 2.0 {
                1.0
            } else {
                (x - c) / w + 0.5
            }
        }
        VoiFunction::LinearExact => {
            if x <= center - width / 2.0 {
                0.0
            } else if x > center + width / 2.0 {
                1.0
            } else {
                (x - center) / width + 0.5
            }
        }
        VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - center) / width).exp()),
    }
}

/// Decode a DICOM file's bytes. `Err` says what is unsupported or broken.
pub fn decode(bytes: &[u8]) -> Result<DicomImage, String> {
    let obj = OpenFileOptions::new().read_preamble(ReadPreamble::Auto).from_reader(bytes).map_err(|e| format!("not a readable DICOM file: {e}"))?;
    let uid = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']).to_string();
    match TransferSyntaxRegistry.get(&uid) {
        Some(ts) if ts.can_decode_all() => {}
        Some(ts) => {
            return Err(format!(
                "unsupported DICOM transfer syntax {} ({uid}): decode it to uncompressed first (e.g. `gdcmconv --raw` or `dcmdjpeg`)",
                ts.name()
            ));
        }
        None => return Err(format!("unknown DICOM transfer syntax {uid}")),
    }
    for (tag, what) in [(tags::MODALITY_LUT_SEQUENCE, "Modality LUT Sequence"), (tags::VOILUT_SEQUENCE, "VOI LUT Sequence")] {
        if obj.element_opt(tag).ok().flatten().is_some() {
            return Err(format!("the file has a {what} (a lookup table); only Rescale Slope/Intercept and Window Center/Width are supported"));
        }
    }
    // The declared size, checked before any pixel buffer is allocated.
    let num = |t| obj.element_opt(t).ok().flatten().and_then(|e| e.to_int::<u64>().ok());
    let (rows, cols) = (num(tags::ROWS).unwrap_or(0), num(tags::COLUMNS).unwrap_or(0));
    let samples = num(tags::SAMPLES_PER_PIXEL).unwrap_or(1) * num(tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    crate::decode::check_samples(cols, rows, samples).map_err(|e| e.to_string())?;
    let px = obj.decode_pixel_data().map_err(|e| format!("cannot decode the pixel data: {e}"))?;
    let (w, h, frames, spp) = (px.columns(), px.rows(), px.number_of_frames(), px.samples_per_pixel());
    if frames != 1 {
        return Err(format!("{frames} frames: one image per file is expected (split multi-frame files first)"));
    }
    if w == 0 || h == 0 {
        return Err(format!("image has size {w}×{h}"));
    }
    let pi = px.photometric_interpretation().as_str().to_string();
    let bits_stored = px.bits_stored();
    match (pi.as_str(), spp) {
        ("MONOCHROME1" | "MONOCHROME2", 1) => {}
        ("RGB", 3) => {
            let raw: Vec<f64> = px
                .to_vec_frame_with_options(0, &ConvertOptions::new().with_modality_lut(ModalityLutOption::None))
                .map_err(|e| format!("cannot read the pixel values: {e}"))?;
            let max = ((1u64 << bits_stored.min(32)) - 1) as f64;
            return Ok(DicomImage {
                width: w,
                height: h,
                channels: 3,
                values: raw.iter().map(|v| (v / max) as f32).collect(),
                voi: Voi::Colour,
                inverted: false,
                bits_stored,
            });
        }
        (other, n) => return Err(format!("photometric interpretation {other} with {n} samples per pixel is not supported (MONOCHROME1, MONOCHROME2 or RGB)")),
    }
    let modality: Vec<f64> = px.to_vec_frame(0).map_err(|e| format!("cannot read the pixel values: {e}"))?;
    let center = obj.element_opt(tags::WINDOW_CENTER).ok().flatten().and_then(|e| e.to_multi_float64().ok()).and_then(|v| v.first().copied());
    let width = obj.element_opt(tags::WINDOW_WIDTH).ok().flatten().and_then(|e| e.to_multi_float64().ok()).and_then(|v| v.first().copied());
    let voi = match (center, width) {
        (Some(center), Some(width)) => {
            let name = obj.element_opt(tags::VOILUT_FUNCTION).ok().flatten().and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
            let function = match name.as_deref().unwrap_or("LINEAR") {
                "LINEAR" | "" => VoiFunction::Linear,
                "LINEAR_EXACT" => VoiFunction::LinearExact,
                "SIGMOID" => VoiFunction::Sigmoid,
                other => return Err(format!("unknown VOI LUT Function `{other}`")),
            };
            let min_width = if function == VoiFunction::Linear { 1.0 } else { f64::MIN_POSITIVE };
            if width < min_width {
                return Err(format!("window width {width} is invalid for {function:?}"));
            }
            Voi::Window { center, width, function }
        }
        _ => {
            let (min, max) = modality.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            Voi::MinMax { min, max }
        }
    };
    let inverted = pi == "MONOCHROME1";
    let values = modality
        .iter()
        .map(|&x| {
            let n = match voi {
                Voi::Window { center, width, function } => window(x, center, width, function),
                Voi::MinMax { min, max } if max > min => (x - min) / (max - min),
                _ => 0.0,
            };
            (if inverted { 1.0 - n } else { n }) as f32
        })
        .collect();
    Ok(DicomImage { width: w, height: h, channels: 1, values, voi, inverted, bits_stored })
}

impl DicomImage {
    /// As a 16-bit image for resizing (values rounded to 1/65535).
    pub fn to_image(&self) -> image::DynamicImage {
        let q: Vec<u16> = self.values.iter().map(|&v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16).collect();
        match self.channels {
            1 => image::DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(self.width, self.height, q).unwrap_or_default()),
            _ => image::DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(self.width, self.height, q).unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DICOM file declaring `rows × cols` 16-bit monochrome with 8 bytes of pixel data.
    fn dicom_declaring(rows: u16, cols: u16) -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let us = |t, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
        let obj = dicom_object::InMemDicomObject::from_element_iter([
            us(tags::ROWS, rows),
            us(tags::COLUMNS, cols),
            us(tags::SAMPLES_PER_PIXEL, 1),
            us(tags::BITS_ALLOCATED, 16),
            us(tags::BITS_STORED, 12),
            us(tags::HIGH_BIT, 11),
            us(tags::PIXEL_REPRESENTATION, 0),
            DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; 8])),
        ]);
        let meta = dicom_object::FileMetaTableBuilder::new()
            .transfer_syntax("1.2.840.10008.1.2.1")
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1")
            .media_storage_sop_instance_uid("1.2.826.0.1.3680043.2.1125.1");
        let file = obj.with_meta(meta).expect("meta");
        let mut out = Vec::new();
        file.write_all(&mut out).expect("write");
        out
    }

    #[test]
    fn absurd_rows_and_columns_are_refused_before_the_pixel_data() {
        let bytes = dicom_declaring(65535, 65535);
        assert!(is_dicom(&bytes));
        let e = decode(&bytes).expect_err("65535 × 65535");
        assert!(e.contains("65535×65535×1 = 4294836225 samples, over the limit"), "{e}");
        // Through the general entry point too (a panic in a decoder would also be caught there).
        let e = crate::decode::decode_resize(&bytes, 32, 1, crate::decode::Aspect::Crop).expect_err("refused");
        assert!(e.to_string().contains("over the limit"), "{e}");
        // The same header at a sane size only finds the pixel data too short.
        let e = decode(&dicom_declaring(64, 64)).expect_err("8 bytes of pixels");
        assert!(!e.contains("limit"), "{e}");
    }

    #[test]
    fn window_functions_follow_the_standard() {
        // PS3.3 C.11.2.1.2.1: c = 2048, w = 4096 maps [0, 4095] onto [0, 1]
        assert_eq!(window(0.0, 2048.0, 4096.0, VoiFunction::Linear), 0.0);
        assert_eq!(window(4095.0, 2048.0, 4096.0, VoiFunction::Linear), 1.0);
        assert!((window(2047.5, 2048.0, 4096.0, VoiFunction::Linear) - 0.5).abs() < 1e-12);
        assert_eq!(window(99.0, 100.0, 2.0, VoiFunction::LinearExact), 0.0);
        assert_eq!(window(100.0, 100.0, 2.0, VoiFunction::LinearExact), 0.5);
        assert!((window(100.0, 100.0, 50.0, VoiFunction::Sigmoid) - 0.5).abs() < 1e-12);
        assert!(window(200.0, 100.0, 50.0, VoiFunction::Sigmoid) > 0.999);
    }

    #[test]
    fn non_dicom_bytes_are_told_apart() {
        let mut b = vec![0u8; 132];
        assert!(!is_dicom(&b));
        b[128..132].copy_from_slice(b"DICM");
        assert!(is_dicom(&b));
        assert!(decode(&b).expect_err("not DICOM").contains("not a readable DICOM file"));
    }
}
