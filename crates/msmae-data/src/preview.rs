//! Contact sheets of ingested images (what people look at before trusting a table): each
//! image at the table's resolution, with its lesion/segmentation outline in red if any.

/// `images`: (pixels H×W×C, optional mask H×W) in table layout.
pub fn sheet(images: &[(&[u8], Option<&[u8]>)], height: u32, width: u32, channels: u32) -> image::RgbImage {
    let cols = 8u32.min(images.len() as u32).max(1);
    let rows = (images.len() as u32).div_ceil(cols).max(1);
    let pad = 2;
    let mut out = image::RgbImage::from_pixel(
        cols * (width + pad) + pad,
        rows * (height + pad) + pad,
        image::Rgb([255, 255, 255]),
    );
    let (h, w) = (height as usize, width as usize);
    for (k, (px, mask)) in images.iter().enumerate() {
        let (ox, oy) = (pad + (k as u32 % cols) * (width + pad), pad + (k as u32 / cols) * (height + pad));
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let edge = mask.is_some_and(|m| {
                    m[i] != 0
                        && [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)].iter().any(|(dx, dy)| {
                            let (xx, yy) = (x as i64 + dx, y as i64 + dy);
                            xx < 0
                                || yy < 0
                                || xx >= w as i64
                                || yy >= h as i64
                                || m[yy as usize * w + xx as usize] == 0
                        })
                });
                let rgb = if edge {
                    [255, 0, 0]
                } else if channels == 1 {
                    [px[i]; 3]
                } else {
                    [px[i * 3], px[i * 3 + 1], px[i * 3 + 2]]
                };
                out.put_pixel(ox + x as u32, oy + y as u32, image::Rgb(rgb));
            }
        }
    }
    out
}
