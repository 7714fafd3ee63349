//! Property-based fuzzing of the image decoders on stable Rust (proptest, fixed budgets, run
//! by `cargo xtask test`): PNG, JPEG, TIFF and BMP files with bytes flipped, cut off,
//! duplicated or inserted, decoded the way ingestion decodes them. A bad file must become
//! that file's error (never a panic out of the decoder, never an allocation its header
//! did not justify), and a decode that succeeds has the table's shape.

use msmae_data::decode::{Aspect, decode_resize};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let img = image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8]));
    let encode = |f: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, f).expect("encode");
        out.into_inner()
    };
    vec![
        ("png", encode(image::ImageFormat::Png)),
        ("jpeg", encode(image::ImageFormat::Jpeg)),
        ("tiff", encode(image::ImageFormat::Tiff)),
        ("bmp", encode(image::ImageFormat::Bmp)),
        ("dicom", dicom_radiograph()),
    ]
}

/// A small, complete DICOM radiograph (explicit VR little endian, 12 bits stored, rescale
/// and a window), as a modality would write one.
fn dicom_radiograph() -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let (rows, cols) = (40u16, 48u16);
    let us = |t, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
    let ds = |t, v: &str| DataElement::new(t, VR::DS, PrimitiveValue::from(v));
    let pixels: Vec<u8> =
        (0..u32::from(rows) * u32::from(cols)).flat_map(|i| (((i * 37) % 4096) as u16).to_le_bytes()).collect();
    let obj = dicom_object::InMemDicomObject::from_element_iter([
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("DX")),
        us(tags::SAMPLES_PER_PIXEL, 1),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")),
        us(tags::ROWS, rows),
        us(tags::COLUMNS, cols),
        us(tags::BITS_ALLOCATED, 16),
        us(tags::BITS_STORED, 12),
        us(tags::HIGH_BIT, 11),
        us(tags::PIXEL_REPRESENTATION, 0),
        ds(tags::WINDOW_CENTER, "2048"),
        ds(tags::WINDOW_WIDTH, "4096"),
        ds(tags::RESCALE_INTERCEPT, "0"),
        ds(tags::RESCALE_SLOPE, "1"),
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(pixels)),
    ]);
    let meta = dicom_object::FileMetaTableBuilder::new()
        .transfer_syntax("1.2.840.10008.1.2.1")
        .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.1.1")
        .media_storage_sop_instance_uid("1.2.826.0.1.3680043.2.1125.7");
    let mut out = Vec::new();
    obj.with_meta(meta).expect("meta").write_all(&mut out).expect("write the DICOM seed");
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(f64, u8),
    Truncate(f64),
    Insert(f64, Vec<u8>),
    Repeat(f64, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0.0..1.0f64, any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (0.0..1.0f64).prop_map(Mutation::Truncate),
        (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, v)| Mutation::Insert(p, v)),
        (0.0..1.0f64, 1..64usize).prop_map(|(p, n)| Mutation::Repeat(p, n)),
    ]
}

fn mutate(bytes: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for m in ms {
        let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len.saturating_sub(1));
        match m {
            Mutation::Flip(p, x) if !b.is_empty() => {
                let i = at(*p, b.len());
                b[i] ^= x | 1;
            }
            Mutation::Truncate(p) => b.truncate(at(*p, b.len())),
            Mutation::Insert(p, v) => {
                let i = at(*p, b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Mutation::Repeat(p, n) if !b.is_empty() => {
                let i = at(*p, b.len());
                let j = (i + n).min(b.len());
                let chunk = b[i..j].to_vec();
                b.splice(j..j, chunk);
            }
            _ => {}
        }
    }
    b
}

#[test]
fn decoders_turn_damaged_files_into_errors() {
    let cases = 1000;
    for (format, seed) in seeds() {
        decode_resize(&seed, 16, 3, Aspect::Crop).unwrap_or_else(|e| panic!("the unmutated {format} decodes: {e}"));
        let started = std::time::Instant::now();
        let errors = std::cell::Cell::new(0u32);
        // (reported, not asserted: a damaged DICOM declaring a 4 GiB element once took
        // seconds and gigabytes here, before dicom::check_declared_lengths)
        let slowest = std::cell::Cell::new(0.0f64);
        let panics = std::cell::Cell::new(0u32);
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
            .run(&prop::collection::vec(mutation(), 1..4), |ms| {
                let t0 = std::time::Instant::now();
                let res = decode_resize(&mutate(&seed, &ms), 16, 3, Aspect::Crop);
                slowest.set(slowest.get().max(t0.elapsed().as_secs_f64()));
                match res {
                    Ok(d) => prop_assert_eq!(d.pixels.len(), 16 * 16 * 3),
                    Err(e) => {
                        errors.set(errors.get() + 1);
                        if e.to_string().contains("the decoder failed on this file") {
                            panics.set(panics.get() + 1);
                        }
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{format}: {e}"));
        // (a decoder panic caught by the guard counts as an error, and is reported apart)
        eprintln!(
            "fuzz: {format} decoder, {cases} mutated files, {} of them errors, {} decoder panics caught ({:.1} s, slowest file {:.0} ms)",
            errors.get(),
            panics.get(),
            started.elapsed().as_secs_f64(),
            slowest.get() * 1000.0
        );
    }
}
