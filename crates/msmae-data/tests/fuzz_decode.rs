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
    ]
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
        let errors = std::cell::Cell::new(0u32);
        let panics = std::cell::Cell::new(0u32);
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
            .run(&prop::collection::vec(mutation(), 1..4), |ms| {
                match decode_resize(&mutate(&seed, &ms), 16, 3, Aspect::Crop) {
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
        eprintln!("fuzz: {format} decoder, {cases} mutated files, {} of them errors, {} decoder panics caught", errors.get(), panics.get());
    }
}
