//! Tiny releases of the published datasets, generated in their exact on-disk layouts, for
//! tests of the ingestion stages and of the shipped pipelines (no dataset can be
//! downloaded at test time). Images are small and synthetic; names, folders, CSV headers
//! and quirks are the publishers'.

use std::path::Path;

fn save_grey(p: &Path, img: &image::GrayImage) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("create fixture folder");
    }
    img.save(p).expect("write fixture image");
}

/// NIH ChestX-ray14: 30 patients with 1–3 images each (40×40 PNGs; patient 4's first one
/// RGBA), patients 1–8 in `test_list.txt`. `v2020`: `Data_Entry_2017_v2020.csv` with
/// `Patient Sex` and a trailing comma on every line; else `Data_Entry_2017.csv` with
/// `Patient Gender`. `flat`: one `images/` folder, else `images_001/images/`,
/// `images_002/images/`. Returns the image names.
pub fn chestxray14(root: &Path, v2020: bool, flat: bool) -> Vec<String> {
    const FINDINGS: [&str; 5] =
        ["No Finding", "Cardiomegaly", "Effusion|Mass", "Hernia", "Atelectasis|Effusion|Pneumothorax"];
    let mut csv = String::from("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,");
    csv.push_str(if v2020 { "Patient Sex" } else { "Patient Gender" });
    csv.push_str(",View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]");
    csv.push_str(if v2020 { ",\n" } else { "\n" });
    let (mut train_val, mut test, mut names) = (String::new(), String::new(), Vec::new());
    for p in 0..30u32 {
        for k in 0..(1 + p % 3) {
            let name = format!("{:08}_{k:03}.png", p + 1);
            let dir = if flat { "images".to_string() } else { format!("images_{:03}/images", 1 + p % 2) };
            let path = root.join(dir).join(&name);
            let f = FINDINGS[((p + k) % 5) as usize];
            if p == 3 && k == 0 {
                std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
                image::RgbaImage::from_pixel(40, 40, image::Rgba([200, 200, 200, 255])).save(&path).expect("rgba png");
            } else {
                // a bright blob whose place depends on the first finding: something to learn
                let (cx, cy) = (8 + 6 * ((p + k) % 5), 20);
                save_grey(
                    &path,
                    &image::GrayImage::from_fn(40, 40, |x, y| {
                        image::Luma([if x.abs_diff(cx) < 5 && y.abs_diff(cy) < 5 {
                            220
                        } else {
                            ((x + y + p) % 64) as u8 + 40
                        }])
                    }),
                );
            }
            csv.push_str(&format!(
                "{name},{f},{k},{},{},M,PA,2500,2048,0.143,0.143{}\n",
                p + 1,
                40 + p,
                if v2020 { "," } else { "" }
            ));
            if p < 8 { &mut test } else { &mut train_val }.push_str(&format!("{name}\n"));
            names.push(name);
        }
    }
    std::fs::write(root.join(if v2020 { "Data_Entry_2017_v2020.csv" } else { "Data_Entry_2017.csv" }), csv)
        .expect("csv");
    std::fs::write(root.join("train_val_list.txt"), train_val).expect("list");
    std::fs::write(root.join("test_list.txt"), test).expect("list");
    names
}

/// Messidor-2: `exams` exams (left/right), even exams `IM…JPG` (listed as `.jpg` in the
/// grades CSV, as released), odd ones `…_PP.png`; exam 4's right eye is ungradable.
/// `IMAGES/`, `messidor_data.csv`, `messidor-2.csv` (`left;right ` header).
pub fn messidor2(root: &Path, exams: u32) {
    let img = root.join("IMAGES");
    std::fs::create_dir_all(&img).expect("mkdir");
    let mut grades = String::from("image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n");
    let mut pairs = String::from("left;right \n");
    for e in 0..exams {
        let names: Vec<(String, String)> = (0..2)
            .map(|k| {
                let n = e * 2 + k;
                if e % 2 == 0 {
                    (format!("IM{n:06}.JPG"), format!("IM{n:06}.jpg"))
                } else {
                    (format!("2005_{n:05}_PP.png"), format!("2005_{n:05}_PP.png"))
                }
            })
            .collect();
        for (k, (file, listed)) in names.iter().enumerate() {
            let grade = (e + k as u32) % 5;
            image::RgbImage::from_fn(60, 40, |x, y| {
                if x.abs_diff(10 + grade * 9) < 4 && y.abs_diff(20) < 4 {
                    image::Rgb([250, 240, 60])
                } else {
                    image::Rgb([(x * 4) as u8, (y * 6) as u8, (e * 10 % 256) as u8])
                }
            })
            .save(img.join(file))
            .expect("img");
            if e == 3 && k == 1 {
                grades.push_str(&format!("{listed},,,0\n"));
            } else {
                grades.push_str(&format!("{listed},{grade},{},1\n", e % 2));
            }
        }
        pairs.push_str(&format!("{};{}\n", names[0].0, names[1].0));
    }
    std::fs::write(root.join("messidor_data.csv"), grades).expect("csv");
    std::fs::write(root.join("messidor-2.csv"), pairs).expect("pairs");
}

/// BUSI: `<class>/<class> (i).png` (RGB 40×32) with `<class> (i)_mask.png` (0/255; RGB for
/// even i, as some published masks are), image 1 of benign and malignant with a second
/// lesion in `_mask_1.png`; normal images have empty masks. `per_class` images per class
/// (benign, malignant, normal). The lesion is drawn into the image (brighter).
pub fn busi(root: &Path, per_class: [u32; 3]) {
    for (class, n) in ["benign", "malignant", "normal"].into_iter().zip(per_class) {
        for i in 1..=n {
            let stem = format!("{class} ({i})");
            let lesion = class != "normal";
            let first = |x: u32, y: u32| lesion && (4..20).contains(&x) && (4..28).contains(&y);
            let second = |x: u32, y: u32| lesion && i == 1 && (24..36).contains(&x) && (8..16).contains(&y);
            let v = (90 + i) as u8;
            image::RgbImage::from_fn(40, 32, |x, y| {
                if first(x, y) || second(x, y) { image::Rgb([230, 230, 230]) } else { image::Rgb([v, v / 2, 255 - v]) }
            })
            .save({
                std::fs::create_dir_all(root.join(class)).expect("mkdir");
                root.join(format!("{class}/{stem}.png"))
            })
            .expect("image");
            let mask = image::GrayImage::from_fn(40, 32, |x, y| image::Luma([if first(x, y) { 255 } else { 0 }]));
            if i % 2 == 0 {
                image::DynamicImage::ImageLuma8(mask)
                    .to_rgb8()
                    .save(root.join(format!("{class}/{stem}_mask.png")))
                    .expect("rgb mask");
            } else {
                mask.save(root.join(format!("{class}/{stem}_mask.png"))).expect("mask");
            }
            if lesion && i == 1 {
                image::GrayImage::from_fn(40, 32, |x, y| image::Luma([if second(x, y) { 255 } else { 0 }]))
                    .save(root.join(format!("{class}/{stem}_mask_1.png")))
                    .expect("mask 1");
            }
        }
    }
}

/// A PNG whose header declares `w × h` 8-bit RGB and whose data is one empty IDAT: what an
/// attacker sends to make a decoder allocate w·h·3 bytes.
pub fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    fn crc(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], body: &[u8]| {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        let mut typed = kind.to_vec();
        typed.extend_from_slice(body);
        v.extend_from_slice(&typed);
        v.extend_from_slice(&crc(&typed).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    out.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    out.extend(chunk(b"IEND", &[]));
    out
}
