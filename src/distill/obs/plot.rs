//! A small line plot written as a PNG, with no plotting or image crates:
//! axes, tick labels and a legend drawn with a built-in 5x7 pixel font, and a
//! minimal PNG encoder (one IDAT, zlib via flate2, CRC-32 via crc32fast).
//! Used for the end-of-training loss curves.

use std::io::{self, Write};
use std::path::Path;

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, in x order.
    pub points: Vec<(f64, f64)>,
    /// RGB colour.
    pub color: [u8; 3],
}

const W: usize = 800;
const H: usize = 480;
const LEFT: usize = 90;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 50;

/// 5x7 glyphs (rows top to bottom, low 5 bits, bit 4 = leftmost).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        _ => [0; 7],
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x, y + 1, c);
                self.set(x + 1, y, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at 2x scale; returns its width in pixels.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) -> i64 {
        for (i, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(x + i as i64 * 12 + col * 2 + ox, y + row as i64 * 2 + oy, c);
                        }
                    }
                }
            }
        }
        s.chars().count() as i64 * 12
    }
}

fn label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (0.01..10000.0).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.2e}")
    }
}

/// Renders `series` (with a title and an x-axis name) to PNG bytes.
pub fn render(title: &str, x_name: &str, series: &[Series]) -> Vec<u8> {
    let mut cv = Canvas {
        px: vec![255; W * H * 3],
    };
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let to_px = |x: f64, y: f64| {
        (
            LEFT as i64 + ((x - x0) / (x1 - x0) * pw) as i64,
            TOP as i64 + ((y1 - y) / (y1 - y0) * ph) as i64,
        )
    };
    let (black, grey) = ([0, 0, 0], [220, 220, 220]);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (gx, gy) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let (px, _) = to_px(gx, y0);
        let (_, py) = to_px(x0, gy);
        cv.line((px, TOP as i64), (px, (H - BOTTOM) as i64), grey, false);
        cv.line((LEFT as i64, py), ((W - RIGHT) as i64, py), grey, false);
        let xl = label(gx);
        cv.text(
            px - xl.len() as i64 * 6,
            (H - BOTTOM) as i64 + 8,
            &xl,
            black,
        );
        let yl = label(gy);
        cv.text(LEFT as i64 - 8 - yl.len() as i64 * 12, py - 7, &yl, black);
    }
    cv.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (H - BOTTOM) as i64),
        black,
        false,
    );
    cv.line(
        (LEFT as i64, (H - BOTTOM) as i64),
        ((W - RIGHT) as i64, (H - BOTTOM) as i64),
        black,
        false,
    );
    cv.text(LEFT as i64, 10, title, black);
    cv.text(
        (W - RIGHT) as i64 - x_name.len() as i64 * 12,
        (H - BOTTOM) as i64 + 30,
        x_name,
        black,
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| to_px(x, y))
            .collect();
        for w in pts.windows(2) {
            cv.line(w[0], w[1], s.color, true);
        }
        if pts.len() == 1 {
            cv.line(pts[0], pts[0], s.color, true);
        }
        let ly = TOP as i64 + 10 + i as i64 * 20;
        let lx = (W - RIGHT) as i64 - 20 - s.name.len() as i64 * 12 - 30;
        cv.line((lx, ly + 7), (lx + 20, ly + 7), s.color, true);
        cv.text(lx + 26, ly, &s.name, black);
    }
    encode_png(&cv.px)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// An 8-bit RGB PNG of the fixed plot size.
fn encode_png(rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((W * 3 + 1) * H);
    for row in rgb.chunks(W * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = z.write_all(&raw);
    let idat = z.finish().unwrap_or_default();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Renders and writes a PNG file.
pub fn write_png(path: &Path, title: &str, x_name: &str, series: &[Series]) -> io::Result<()> {
    std::fs::write(path, render(title, x_name, series))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_valid_png() {
        let s = vec![
            Series {
                name: "train".into(),
                points: (0..50)
                    .map(|i| (i as f64, 5.0 / (1.0 + i as f64)))
                    .collect(),
                color: [31, 119, 180],
            },
            Series {
                name: "validation".into(),
                points: vec![(0.0, 5.0), (25.0, 0.4), (49.0, 0.2)],
                color: [214, 39, 40],
            },
        ];
        let png = render("kd loss", "step", &s);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            W as u32
        );
        // The image is not blank: decompress and find the series colour.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        let mut d = flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut raw).unwrap();
        assert_eq!(raw.len(), (W * 3 + 1) * H);
        assert!(raw.windows(3).any(|p| p == [214, 39, 40]));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(12.0), "12");
        assert_eq!(label(0.0001234), "1.23e-4");
    }
}
