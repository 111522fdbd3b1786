//! Bilinear resizing with OpenCV's `INTER_LINEAR` conventions, fused with the models'
//! normalization into planar `f32` tensors.
//!
//! Both reference packages resize with OpenCV (`cv2.resize` / `cv2.dnn.blobFromImage`, default
//! `INTER_LINEAR`), which samples at half-pixel centres (`sx = (dx + 0.5) * src/dst - 0.5`),
//! clamps at the edges and does **no** antialiasing when shrinking. General-purpose resizers
//! (`image::imageops`, `fast_image_resize`) filter over the whole footprint when shrinking, which
//! gives the models visibly different inputs; so this module reproduces OpenCV's sampling, and
//! rounds each interpolated value to an integer as OpenCV's 8-bit resize does before the
//! normalization. OpenCV interpolates 8-bit images in 11-bit fixed point with a particular
//! rounding (see [`Resizer::resize_rgb`]); this module reproduces it bit for bit (checked
//! against `cv2.resize` of opencv-python 5.0.0 on the OCR fixture frames and crops).
//!
//! The tap tables are kept in the [`Resizer`] and reused, so resizing allocates nothing once the
//! tables have grown to the largest size seen.

/// Channel order written into the tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    /// Plane 0 = R, 1 = G, 2 = B.
    Rgb,
    /// Plane 0 = B, 1 = G, 2 = R.
    Bgr,
}

/// A source image: RGB24 pixels with a row stride, optionally seen as padded with zeros to
/// `padded_width × padded_height` (bottom/right, like `cv2.copyMakeBorder(..., 0, pad, 0, pad)`).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// RGB24 pixels.
    pub data: &'a [u8],
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// Bytes per row (≥ `width * 3`).
    pub stride: usize,
    /// Width including the zero padding (≥ `width`).
    pub padded_width: u32,
    /// Height including the zero padding (≥ `height`).
    pub padded_height: u32,
}

impl<'a> Source<'a> {
    /// A tightly packed, unpadded RGB24 image.
    pub fn packed(data: &'a [u8], width: u32, height: u32) -> Self {
        Self { data, width, height, stride: width as usize * 3, padded_width: width, padded_height: height }
    }
}

/// Destination: `planes` consecutive planes of `plane_len` floats, each row `row_stride` floats.
#[derive(Debug)]
pub struct Dest<'a> {
    /// The tensor memory (at least `3 * plane_len`).
    pub data: &'a mut [f32],
    /// Resized width written, pixels.
    pub width: u32,
    /// Resized height written, pixels.
    pub height: u32,
    /// Floats per row (≥ `width`; the rest of the row is left as it is, e.g. zero padding).
    pub row_stride: usize,
    /// Floats per plane.
    pub plane_len: usize,
}

/// OpenCV's `INTER_RESIZE_COEF_SCALE`: interpolation weights are integers summing to 2048.
const COEF_SCALE: f32 = 2048.0;

/// One destination coordinate: source indices and fixed-point weights (sum 2048).
#[derive(Debug, Clone, Copy, Default)]
struct Tap {
    i0: u32,
    i1: u32,
    w0: i32,
    w1: i32,
}

/// Reusable tap tables and row buffers for [`Resizer::resize_normalize`] and
/// [`Resizer::resize_rgb`].
#[derive(Debug, Default)]
pub struct Resizer {
    xs: Vec<Tap>,
    ys: Vec<Tap>,
    /// Horizontally resized source rows (fixed point, ×2048), the pair a destination row needs.
    rows: [Vec<i32>; 2],
    /// Which source row each of `rows` holds.
    rows_at: [Option<u32>; 2],
    /// One destination row, RGB24.
    line: Vec<u8>,
}

/// OpenCV `resize` `INTER_LINEAR` taps (`imgproc/src/resize.cpp`, `resize()` coefficient
/// setup): `fx = (float)((d + 0.5) * scale - 0.5)` with `scale = 1 / (dst / src)`, weights
/// `saturate_cast<short>((1 - fx) * 2048)` and `saturate_cast<short>(fx * 2048)`. Along x
/// (`clamp_edges`) a sample left of the first or right of the last pixel takes that pixel
/// whole; along y OpenCV keeps the fraction and clamps the row indices instead.
fn taps(out: &mut Vec<Tap>, src_len: u32, dst_len: u32, clamp_edges: bool) {
    out.clear();
    let scale = 1.0 / (f64::from(dst_len) / f64::from(src_len));
    let last = i64::from(src_len) - 1;
    for d in 0..dst_len {
        let fx = ((f64::from(d) + 0.5) * scale - 0.5) as f32;
        let mut s = i64::from(fx.floor() as i32);
        let mut f = fx - s as f32;
        if clamp_edges {
            if s < 0 {
                s = 0;
                f = 0.0;
            }
            if s >= last {
                s = last;
                f = 0.0;
            }
        }
        let i0 = s.clamp(0, last) as u32;
        let i1 = (s + 1).clamp(0, last) as u32;
        let w0 = ((1.0 - f) * COEF_SCALE).round_ties_even() as i32;
        let w1 = (f * COEF_SCALE).round_ties_even() as i32;
        out.push(Tap { i0, i1, w0, w1 });
    }
}

impl Resizer {
    /// A resizer with empty tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resizes the (padded) `src` to `dst.width × dst.height` exactly as OpenCV's 8-bit
    /// `INTER_LINEAR` does, and writes `level * alpha + beta` into three planes in `order`.
    /// Pixels in the padding read as 0.
    ///
    /// Callers guarantee `src.data` holds `height` rows of `stride` bytes and `dst.data` holds
    /// `3 * plane_len` floats with `height * row_stride ≤ plane_len`; violations panic (they are
    /// programming errors, never input-dependent: frames are validated before).
    pub fn resize_normalize(
        &mut self,
        src: &Source<'_>,
        dst: &mut Dest<'_>,
        order: ChannelOrder,
        alpha: f32,
        beta: f32,
    ) {
        let (c0, c2) = match order {
            ChannelOrder::Rgb => (0usize, 2usize),
            ChannelOrder::Bgr => (2, 0),
        };
        // Level → normalized value, once per level instead of once per sample.
        let lut: [f32; 256] = std::array::from_fn(|v| v as f32 * alpha + beta);
        let (p0, rest) = dst.data.split_at_mut(dst.plane_len);
        let (p1, p2) = rest.split_at_mut(dst.plane_len);
        let (w, row_stride) = (dst.width as usize, dst.row_stride);
        self.resize_rows(src, dst.width, dst.height, |dy, line| {
            let row = dy * row_stride;
            let (q0, q1, q2) = (&mut p0[row..row + w], &mut p1[row..row + w], &mut p2[row..row + w]);
            for (dx, px) in line.chunks_exact(3).enumerate() {
                q0[dx] = lut[usize::from(px[c0])];
                q1[dx] = lut[usize::from(px[1])];
                q2[dx] = lut[usize::from(px[c2])];
            }
        });
    }

    /// Resizes a (padded) RGB24 image to `width × height` RGB24 exactly as OpenCV's 8-bit
    /// `INTER_LINEAR` does, into `out` (cleared and refilled).
    pub fn resize_rgb(&mut self, src: &Source<'_>, width: u32, height: u32, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(width as usize * height as usize * 3);
        self.resize_rows(src, width, height, |_, line| out.extend_from_slice(line));
    }

    /// The resize proper: calls `emit(dy, row)` for each destination row in order, `row` being
    /// `width` RGB24 pixels.
    ///
    /// OpenCV (`resizeGeneric_` with `HResizeLinear` and `VResizeLinearVec_32s8u`, the SIMD path
    /// every x86-64 build takes) first resizes rows horizontally into integers scaled by 2048,
    /// then combines two of them per output row as
    /// `((r0 >> 4) * w0 >> 16) + ((r1 >> 4) * w1 >> 16)` rounded by `(v + 2) >> 2`. This differs
    /// from exact rounding on about one sample in ten; the recognizer notices (it can decide
    /// whether a narrow gap is a space), so it is reproduced bit for bit.
    fn resize_rows(&mut self, src: &Source<'_>, width: u32, height: u32, mut emit: impl FnMut(usize, &[u8])) {
        if width == 0 || height == 0 || src.padded_width == 0 || src.padded_height == 0 {
            return;
        }
        taps(&mut self.xs, src.padded_width, width, true);
        taps(&mut self.ys, src.padded_height, height, false);
        let n = width as usize * 3;
        for r in &mut self.rows {
            r.clear();
            r.resize(n, 0);
        }
        self.rows_at = [None, None];
        self.line.clear();
        self.line.resize(n, 0);
        for dy in 0..self.ys.len() {
            let ty = self.ys[dy];
            // The next destination row's first source row is usually this one's second.
            if self.rows_at[0] != Some(ty.i0) {
                if self.rows_at[1] == Some(ty.i0) {
                    self.rows.swap(0, 1);
                    self.rows_at.swap(0, 1);
                } else {
                    hresize_row(src, ty.i0, &self.xs, &mut self.rows[0]);
                    self.rows_at[0] = Some(ty.i0);
                }
            }
            if self.rows_at[1] != Some(ty.i1) {
                hresize_row(src, ty.i1, &self.xs, &mut self.rows[1]);
                self.rows_at[1] = Some(ty.i1);
            }
            let (w0, w1) = (ty.w0, ty.w1);
            for ((o, &r0), &r1) in self.line.iter_mut().zip(&self.rows[0]).zip(&self.rows[1]) {
                let v = (((r0 >> 4) * w0) >> 16) + (((r1 >> 4) * w1) >> 16);
                *o = ((v + 2) >> 2).clamp(0, 255) as u8;
            }
            emit(dy, &self.line);
        }
    }
}

/// `HResizeLinear`: source row `sy` resized horizontally, RGB interleaved, scaled by 2048.
fn hresize_row(src: &Source<'_>, sy: u32, xs: &[Tap], out: &mut [i32]) {
    if sy >= src.height {
        out.fill(0);
        return;
    }
    let at = sy as usize * src.stride;
    let row = &src.data[at..at + src.width as usize * 3];
    let pixel = |x: u32| -> [i32; 3] {
        let i = x as usize * 3;
        match row.get(i..i + 3) {
            Some(p) => [i32::from(p[0]), i32::from(p[1]), i32::from(p[2])],
            None => [0; 3],
        }
    };
    for (o, t) in out.chunks_exact_mut(3).zip(xs) {
        let (a, b) = (pixel(t.i0), pixel(t.i1));
        for k in 0..3 {
            o[k] = a[k] * t.w0 + b[k] * t.w1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_averages_two_by_two_blocks_like_opencv() {
        // 4x2 → 2x1: OpenCV samples at x = 0.5, 2.5 and y = 0.5, i.e. the 2x2 block means
        // (`cv2.resize` gives [[35, 55]] on the same input).
        let data: Vec<u8> = [10u8, 20, 30, 40, 50, 60, 70, 80].iter().flat_map(|&v| [v, v, v]).collect();
        let src = Source::packed(&data, 4, 2);
        let mut out = Vec::new();
        Resizer::new().resize_rgb(&src, 2, 1, &mut out);
        assert_eq!(out, vec![35, 35, 35, 55, 55, 55]);
    }

    #[test]
    fn upscaling_matches_cv2_resize_bit_for_bit() {
        // `cv2.resize(a, (7, 5))` (opencv-python 5.0.0) on this 3x2 image: the edge rows keep
        // their fraction and the fixed-point rounding differs from exact rounding.
        let data = [10u8, 200, 33, 77, 5, 250, 128, 129, 130, 255, 0, 17, 90, 91, 92, 3, 250, 61];
        let cv2 = [
            10u8, 200, 33, 19, 172, 64, 48, 89, 157, 77, 5, 250, 99, 58, 199, 121, 111, 147, 128, 129, 130, 34, 180,
            31, 41, 156, 60, 59, 85, 147, 78, 13, 234, 94, 68, 186, 110, 123, 139, 115, 141, 123, 133, 100, 25, 125,
            93, 46, 104, 70, 108, 84, 48, 171, 76, 109, 139, 68, 169, 106, 66, 190, 96, 230, 20, 19, 210, 29, 31, 149,
            56, 69, 88, 82, 108, 57, 149, 91, 26, 216, 73, 15, 238, 68, 255, 0, 17, 231, 13, 28, 161, 52, 60, 90, 91,
            92, 53, 159, 79, 15, 227, 65, 3, 250, 61,
        ];
        let mut out = Vec::new();
        Resizer::new().resize_rgb(&Source::packed(&data, 3, 2), 7, 5, &mut out);
        assert_eq!(out, cv2);
    }

    #[test]
    fn padding_reads_black_and_bgr_swaps_planes() {
        let data = [200u8, 100, 50];
        let src = Source { padded_width: 2, padded_height: 1, ..Source::packed(&data, 1, 1) };
        let mut buf = vec![0f32; 6];
        let mut dst = Dest { data: &mut buf, width: 2, height: 1, row_stride: 2, plane_len: 2 };
        Resizer::new().resize_normalize(&src, &mut dst, ChannelOrder::Bgr, 1.0, 0.0);
        assert_eq!(buf, vec![50.0, 0.0, 100.0, 0.0, 200.0, 0.0]);
    }
}
