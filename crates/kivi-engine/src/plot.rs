//! A tiny RGB raster with a 5×7 bitmap font and a PNG writer, for the heatmaps and channel plots
//! of `kivi eval passkey` and `kivi inspect` (no plotting library, no font files).

use std::io::Write;
use std::path::Path;

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [160, 160, 160];

/// An RGB image, row-major.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&background);
        }
        Canvas {
            width,
            height,
            pixels,
        }
    }

    pub fn set(&mut self, x: usize, y: usize, c: Rgb) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    pub fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                self.set(xx, yy, c);
            }
        }
    }

    /// A one-pixel rectangle outline.
    pub fn frame(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        if w == 0 || h == 0 {
            return;
        }
        self.fill_rect(x, y, w, 1, c);
        self.fill_rect(x, y + h - 1, w, 1, c);
        self.fill_rect(x, y, 1, h, c);
        self.fill_rect(x + w - 1, y, 1, h, c);
    }

    /// Draws `s` with its top-left corner at (x, y), each font pixel `scale` × `scale`.
    /// Letters are drawn as capitals; unknown characters as `?`.
    pub fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: Rgb) {
        for (n, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let x0 = x + n * 6 * scale;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(x0 + col * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Writes the image as an 8-bit RGB PNG.
    pub fn save_png(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.encode_png())
    }

    pub fn encode_png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw).expect("writing to a Vec cannot fail");
        let idat = z.finish().expect("writing to a Vec cannot fail");
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, no filter, no interlace
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &Vec::new())] {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        out
    }
}

/// Pixel width of `s` at `scale`.
pub fn text_width(s: &str, scale: usize) -> usize {
    s.chars().count() * 6 * scale
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn lerp(a: Rgb, b: Rgb, t: f64) -> Rgb {
    let f = |x: u8, y: u8| {
        (x as f64 + (y as f64 - x as f64) * t)
            .round()
            .clamp(0.0, 255.0) as u8
    };
    [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2])]
}

fn ramp(stops: &[Rgb], t: f64) -> Rgb {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (stops.len() - 1) as f64;
    let i = (x.floor() as usize).min(stops.len() - 2);
    lerp(stops[i], stops[i + 1], x - i as f64)
}

/// A viridis-like colour map, t in [0, 1].
pub fn viridis(t: f64) -> Rgb {
    ramp(
        &[
            [68, 1, 84],
            [59, 82, 139],
            [33, 145, 140],
            [94, 201, 98],
            [253, 231, 37],
        ],
        t,
    )
}

/// Red (0) through yellow to green (1), for accuracies.
pub fn red_green(t: f64) -> Rgb {
    ramp(&[[215, 48, 39], [254, 224, 139], [26, 152, 80]], t)
}

fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
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
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '|' => [0x04; 7],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_has_valid_structure() {
        let mut c = Canvas::new(7, 3, WHITE);
        c.text(0, 0, "1", 1, BLACK);
        let png = c.encode_png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 7);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        // The standard check value of CRC-32.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn colour_maps_hit_their_ends() {
        assert_eq!(red_green(0.0), [215, 48, 39]);
        assert_eq!(red_green(1.0), [26, 152, 80]);
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(viridis(2.0), [253, 231, 37]);
    }
}

/// One line of a [`line_chart`]: a name for the legend, a colour, `(x, y)` points.
pub struct Series {
    pub name: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

/// Line colours for up to 8 series (then they repeat).
pub const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

impl Canvas {
    /// A 1-pixel line from `(x0, y0)` to `(x1, y1)` (Bresenham), `thick` pixels wide.
    pub fn line(&mut self, p0: (i64, i64), p1: (i64, i64), thick: i64, c: Rgb) {
        let (mut x, mut y) = p0;
        let (dx, dy) = ((p1.0 - x).abs(), -(p1.1 - y).abs());
        let (sx, sy) = (if x < p1.0 { 1 } else { -1 }, if y < p1.1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            for ox in 0..thick {
                for oy in 0..thick {
                    let (px, py) = (x + ox - thick / 2, y + oy - thick / 2);
                    if px >= 0 && py >= 0 {
                        self.set(px as usize, py as usize, c);
                    }
                }
            }
            if (x, y) == p1 {
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
}

/// A line chart with markers, axes from 0 to the largest value (ticks at 5 even steps), a title
/// and a legend: enough for "metric vs batch size" figures.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Canvas {
    let (w, h) = (720usize, 480usize);
    let (left, right, top, bottom) = (80usize, 20usize, 40usize, 60usize);
    let white = [255, 255, 255];
    let black = [0, 0, 0];
    let grey = [220, 220, 220];
    let mut c = Canvas::new(w, h, white);
    let max_of = |f: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(f))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
    };
    let nice = |v: f64| {
        if v <= 0.0 {
            return 1.0;
        }
        let p = 10f64.powf(v.log10().floor());
        [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * p)
            .find(|&m| m >= v)
            .unwrap_or(10.0 * p)
    };
    let (xmax, ymax) = (nice(max_of(|p| p.0)), nice(max_of(|p| p.1)));
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| (left as f64 + x / xmax * pw as f64).round() as i64;
    let py = |y: f64| ((top + ph) as f64 - y / ymax * ph as f64).round() as i64;
    for i in 0..=5 {
        let (fx, fy) = (xmax * i as f64 / 5.0, ymax * i as f64 / 5.0);
        let yy = py(fy) as usize;
        c.fill_rect(left, yy, pw, 1, grey);
        let label = format_tick(fy);
        c.text(
            left.saturating_sub(text_width(&label, 1) + 6),
            yy.saturating_sub(3),
            &label,
            1,
            black,
        );
        let label = format_tick(fx);
        let xx = px(fx) as usize;
        c.text(
            xx.saturating_sub(text_width(&label, 1) / 2),
            top + ph + 8,
            &label,
            1,
            black,
        );
    }
    c.frame(left, top, pw, ph, black);
    c.text(
        w.saturating_sub(text_width(title, 2)) / 2,
        12,
        title,
        2,
        black,
    );
    c.text(
        left + (pw - text_width(x_label, 1).min(pw)) / 2,
        h - 24,
        x_label,
        1,
        black,
    );
    c.text(4, top - 14, y_label, 1, black);
    for s in series {
        let pts: Vec<(i64, i64)> = s.points.iter().map(|&(x, y)| (px(x), py(y))).collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], 2, s.color);
        }
        for &(x, y) in &pts {
            c.fill_rect(
                (x - 3).max(0) as usize,
                (y - 3).max(0) as usize,
                7,
                7,
                s.color,
            );
        }
    }
    // Legend, top left inside the plot.
    for (i, s) in series.iter().enumerate() {
        let y = top + 10 + 14 * i;
        c.fill_rect(left + 10, y, 16, 7, s.color);
        c.text(left + 32, y, &s.name, 1, black);
    }
    c
}

fn format_tick(v: f64) -> String {
    if v >= 1e9 {
        format!("{}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod chart_tests {
    use super::*;

    #[test]
    fn line_chart_draws_its_series_colour_at_the_points() {
        let s = Series {
            name: "a".into(),
            color: PALETTE[1],
            points: vec![(1.0, 1.0), (4.0, 8.0), (9.0, 3.0)],
        };
        let c = line_chart("t", "x", "y", &[s]);
        // Axes go to nice(9) = 10 and nice(8) = 10; plot area 620 x 380 from (80, 40).
        let at = |x: f64, y: f64| {
            let px = (80.0 + x / 10.0 * 620.0).round() as usize;
            let py = (420.0 - y / 10.0 * 380.0).round() as usize;
            c.get(px, py)
        };
        for (x, y) in [(1.0, 1.0), (4.0, 8.0), (9.0, 3.0)] {
            assert_eq!(at(x, y), PALETTE[1], "marker at ({x}, {y})");
        }
        assert_eq!(at(6.5, 9.5), [255, 255, 255]);
        let png = c.encode_png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
