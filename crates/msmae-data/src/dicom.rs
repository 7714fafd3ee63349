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
    check_declared_lengths(bytes)?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Auto)
        .from_reader(bytes)
        .map_err(|e| format!("not a readable DICOM file: {e}"))?;
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
    for (tag, what) in
        [(tags::MODALITY_LUT_SEQUENCE, "Modality LUT Sequence"), (tags::VOILUT_SEQUENCE, "VOI LUT Sequence")]
    {
        if obj.element_opt(tag).ok().flatten().is_some() {
            return Err(format!(
                "the file has a {what} (a lookup table); only Rescale Slope/Intercept and Window Center/Width are supported"
            ));
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
        (other, n) => {
            return Err(format!(
                "photometric interpretation {other} with {n} samples per pixel is not supported (MONOCHROME1, MONOCHROME2 or RGB)"
            ));
        }
    }
    let modality: Vec<f64> = px.to_vec_frame(0).map_err(|e| format!("cannot read the pixel values: {e}"))?;
    let center = obj
        .element_opt(tags::WINDOW_CENTER)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .and_then(|v| v.first().copied());
    let width = obj
        .element_opt(tags::WINDOW_WIDTH)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .and_then(|v| v.first().copied());
    let voi = match (center, width) {
        (Some(center), Some(width)) => {
            let name = obj
                .element_opt(tags::VOILUT_FUNCTION)
                .ok()
                .flatten()
                .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
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
            let (min, max) =
                modality.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
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
            1 => image::DynamicImage::ImageLuma16(
                image::ImageBuffer::from_raw(self.width, self.height, q).unwrap_or_default(),
            ),
            _ => image::DynamicImage::ImageRgb16(
                image::ImageBuffer::from_raw(self.width, self.height, q).unwrap_or_default(),
            ),
        }
    }
}

/// The "undefined length" of sequences, items and encapsulated pixel data.
const UNDEFINED: u32 = 0xFFFF_FFFF;
/// Nesting deeper than this is refused (real files nest a few levels).
const MAX_DEPTH: usize = 64;

/// Check, before dicom-rs parses anything, that no element, item or fragment declares more
/// bytes than the file has left. dicom-rs allocates and zero-fills a value's declared
/// length before reading it, so a damaged 4 KiB file declaring a 4 GiB element costs 4 GiB
/// and seconds (found by the decoder fuzz test); with several ingestion threads that is an
/// out-of-memory kill. The walk follows the meta group (explicit VR little endian), then
/// the data set in its transfer syntax's encoding, into sequences (by VR, or by the
/// standard dictionary under implicit VR), their items, and encapsulated pixel fragments.
/// A deflated data set is inflated by dicom-rs as a stream and is not walked here.
pub fn check_declared_lengths(bytes: &[u8]) -> Result<(), String> {
    let start = if is_dicom(bytes) {
        132
    } else if bytes.starts_with(b"DICM") {
        4
    } else {
        0
    };
    let meta = Walker { b: bytes, explicit: true, big: false };
    let mut pos = start;
    let mut ts = String::new();
    while pos + 8 <= bytes.len() && meta.u16(pos) == 0x0002 {
        let h = meta.header(pos)?;
        let end = meta.value_end(&h)?;
        if (h.group, h.element) == (0x0002, 0x0010) {
            ts = String::from_utf8_lossy(&bytes[h.value..end]).trim_end_matches(['\0', ' ']).to_string();
        }
        pos = end;
    }
    let w = match ts.as_str() {
        "1.2.840.10008.1.2" => Walker { b: bytes, explicit: false, big: false },
        "1.2.840.10008.1.2.2" => Walker { b: bytes, explicit: true, big: true },
        "1.2.840.10008.1.2.1.99" => return Ok(()),
        _ => Walker { b: bytes, explicit: true, big: false },
    };
    w.dataset(pos, bytes.len(), false, 0).map(|_| ())
}

/// An element header as read.
struct Header {
    at: usize,
    group: u16,
    element: u16,
    vr: [u8; 2],
    len: u32,
    /// Where the value starts.
    value: usize,
}

struct Walker<'a> {
    b: &'a [u8],
    explicit: bool,
    big: bool,
}

impl Walker<'_> {
    fn u16(&self, at: usize) -> u16 {
        let x = [self.b[at], self.b[at + 1]];
        if self.big { u16::from_be_bytes(x) } else { u16::from_le_bytes(x) }
    }
    fn u32(&self, at: usize) -> u32 {
        let x = [self.b[at], self.b[at + 1], self.b[at + 2], self.b[at + 3]];
        if self.big { u32::from_be_bytes(x) } else { u32::from_le_bytes(x) }
    }

    /// The header at `at` (at least 8 bytes must remain; dicom-rs reports truncation).
    fn header(&self, at: usize) -> Result<Header, String> {
        let (group, element) = (self.u16(at), self.u16(at + 2));
        // Items and delimiters have no VR in any encoding.
        if group == 0xFFFE || !self.explicit {
            return Ok(Header { at, group, element, vr: *b"  ", len: self.u32(at + 4), value: at + 8 });
        }
        let vr = [self.b[at + 4], self.b[at + 5]];
        // PS3.5 7.1.2: these VRs have a 16-bit length; every other one, an unknown VR
        // included (read as UN, as dicom-rs does), has 2 reserved bytes and 32 bits.
        let short = matches!(
            &vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        );
        if !short {
            if at + 12 > self.b.len() {
                return Err(format!("truncated element header at byte {at}"));
            }
            Ok(Header { at, group, element, vr, len: self.u32(at + 8), value: at + 12 })
        } else {
            Ok(Header { at, group, element, vr, len: u32::from(self.u16(at + 6)), value: at + 8 })
        }
    }

    /// The end of a defined-length value, checked against the bytes left.
    fn value_end(&self, h: &Header) -> Result<usize, String> {
        let left = self.b.len().saturating_sub(h.value);
        if h.len as usize > left {
            return Err(format!(
                "not a readable DICOM file: element ({:04X},{:04X}) at byte {} declares {} bytes, but the file has {left} left",
                h.group, h.element, h.at, h.len
            ));
        }
        Ok(h.value + h.len as usize)
    }

    fn is_sequence(&self, h: &Header) -> bool {
        use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
        if self.explicit {
            return &h.vr == b"SQ";
        }
        dicom_dictionary_std::StandardDataDictionary
            .by_tag(dicom_core::Tag(h.group, h.element))
            .is_some_and(|e| matches!(e.vr(), VirtualVr::Exact(dicom_core::VR::SQ)))
    }

    /// Elements from `pos` to `end`; inside an undefined-length item (`in_item`), up to
    /// and including its delimiter. Returns where it stopped.
    fn dataset(&self, mut pos: usize, end: usize, in_item: bool, depth: usize) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("not a readable DICOM file: sequences nested deeper than {MAX_DEPTH} levels"));
        }
        while pos + 8 <= end {
            let h = self.header(pos)?;
            if h.group == 0xFFFE {
                // An item delimiter ends the item; anything else here is for dicom-rs to
                // report.
                return Ok(if in_item && h.element == 0xE00D { h.value } else { end });
            }
            pos = if h.len == UNDEFINED {
                if (h.group, h.element) == (0x7FE0, 0x0010) {
                    self.fragments(h.value, end)?
                } else {
                    self.sequence(h.value, end, true, depth + 1)?
                }
            } else {
                let value_end = self.value_end(&h)?;
                if self.is_sequence(&h) {
                    self.sequence(h.value, value_end, false, depth + 1)?;
                }
                value_end
            };
        }
        Ok(pos)
    }

    /// Items of a sequence from `pos`: up to `end` (defined length) or its delimiter.
    fn sequence(&self, mut pos: usize, end: usize, undefined: bool, depth: usize) -> Result<usize, String> {
        while pos + 8 <= end {
            let h = self.header(pos)?;
            match (h.group, h.element) {
                (0xFFFE, 0xE0DD) if undefined => return Ok(h.value),
                (0xFFFE, 0xE000) if h.len == UNDEFINED => pos = self.dataset(h.value, end, true, depth)?,
                (0xFFFE, 0xE000) => {
                    let item_end = self.value_end(&h)?;
                    self.dataset(h.value, item_end, false, depth)?;
                    pos = item_end;
                }
                // Not an item: dicom-rs says what is wrong.
                _ => return Ok(end),
            }
        }
        Ok(pos)
    }

    /// Encapsulated pixel data: the offset table and fragments, up to the delimiter.
    fn fragments(&self, mut pos: usize, end: usize) -> Result<usize, String> {
        while pos + 8 <= end {
            let h = self.header(pos)?;
            match (h.group, h.element) {
                (0xFFFE, 0xE0DD) => return Ok(h.value),
                (0xFFFE, 0xE000) if h.len != UNDEFINED => pos = self.value_end(&h)?,
                _ => return Ok(end),
            }
        }
        Ok(pos)
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
    fn declared_lengths_beyond_the_file_are_refused_before_dicom_rs_allocates() {
        let good = dicom_declaring(2, 2);
        check_declared_lengths(&good).expect("a sound file passes");
        // The pixel data's length field: the last element, OW, 4-byte length 8 bytes from
        // the end of its 12-byte header.
        let mut bad = good.clone();
        let at = bad.len() - 8 - 4;
        bad[at..at + 4].copy_from_slice(&0x7FFF_FFF0u32.to_le_bytes());
        let e = decode(&bad).expect_err("2 GiB declared in a small file");
        assert!(e.contains("(7FE0,0010)") && e.contains("declares 2147483632 bytes"), "{e}");
        // A defined-length sequence whose item declares too much, nested one level.
        let seq = |item_len: u32| {
            let mut v = good[..good.len() - 20].to_vec();
            v.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0]);
            v.extend_from_slice(&16u32.to_le_bytes());
            v.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            v.extend_from_slice(&item_len.to_le_bytes());
            v.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, b'U', b'I', 0, 0]);
            v
        };
        check_declared_lengths(&seq(8)).expect("a sound sequence passes");
        let e = check_declared_lengths(&seq(0x1000_0000)).expect_err("an item declaring 256 MiB");
        assert!(e.contains("(FFFE,E000)"), "{e}");
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
