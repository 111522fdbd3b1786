//! Bilinear resizing with OpenCV's `INTER_LINEAR` conventions, fused with the models'
//! normalization into planar `f32` tensors.
//!
//! Both reference packages resize with OpenCV (`cv2.resize` / `cv2.dnn.blobFromImage`, default
//! `INTER_LINEAR`), which samples at half-pixel centres (`sx = (dx + 0.5) * src/dst - 0.5`),
//! clamps at the edges and does **no** antialiasing when shrinking. General-purpose resizers
//! (`image::imageops`, `fast_image_resize`) filter over the whole footprint when shrinking, which
//! gives the models visibly different inputs; so this module reproduces OpenCV's sampling, and
//! rounds each interpolated value to an integer as OpenCV's 8-bit resize does before the
//! normalization. (OpenCV interpolates in 11-bit fixed point; we interpolate in `f32`, which can
//! differ by one level on a few pixels.)
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

#[derive(Debug, Clone, Copy, Default)]
struct Tap {
    i0: u32,
    i1: u32,
    f: f32,
}

/// Reusable tap tables for [`Resizer::resize_normalize`].
#[derive(Debug, Default)]
pub struct Resizer {
    xs: Vec<Tap>,
    ys: Vec<Tap>,
}

/// OpenCV `resize` `INTER_LINEAR` taps (`imgproc/src/resize.cpp`, `resize()` coefficient setup).
fn taps(out: &mut Vec<Tap>, src_len: u32, dst_len: u32) {
    out.clear();
    let scale = f64::from(src_len) / f64::from(dst_len);
    for d in 0..dst_len {
        let fx = ((f64::from(d) + 0.5) * scale - 0.5) as f32;
        let mut s = fx.floor() as i64;
        let mut f = fx - s as f32;
        if s < 0 {
            s = 0;
            f = 0.0;
        }
        if s >= i64::from(src_len) - 1 {
            s = i64::from(src_len) - 1;
            f = 0.0;
        }
        let i0 = s as u32;
        let i1 = (i0 + 1).min(src_len - 1);
        out.push(Tap { i0, i1, f });
    }
}

impl Resizer {
    /// A resizer with empty tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resizes the (padded) `src` to `dst.width × dst.height` with OpenCV `INTER_LINEAR`
    /// sampling, rounds each value to an integer level, and writes `level * alpha + beta` into
    /// three planes in `order`. Pixels in the padding read as 0.
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
        if dst.width == 0 || dst.height == 0 || src.padded_width == 0 || src.padded_height == 0 {
            return;
        }
        taps(&mut self.xs, src.padded_width, dst.width);
        taps(&mut self.ys, src.padded_height, dst.height);
        let (c0, c2) = match order {
            ChannelOrder::Rgb => (0usize, 2usize),
            ChannelOrder::Bgr => (2, 0),
        };
        let pixel = |x: u32, y: u32| -> [f32; 3] {
            if x >= src.width || y >= src.height {
                return [0.0; 3];
            }
            let at = y as usize * src.stride + x as usize * 3;
            [f32::from(src.data[at]), f32::from(src.data[at + 1]), f32::from(src.data[at + 2])]
        };
        let (p0, rest) = dst.data.split_at_mut(dst.plane_len);
        let (p1, p2) = rest.split_at_mut(dst.plane_len);
        let planes: [&mut [f32]; 3] = [p0, p1, p2];
        let [q0, q1, q2] = planes;
        for (dy, ty) in self.ys.iter().enumerate() {
            let row = dy * dst.row_stride;
            for (dx, tx) in self.xs.iter().enumerate() {
                let a = pixel(tx.i0, ty.i0);
                let b = pixel(tx.i1, ty.i0);
                let c = pixel(tx.i0, ty.i1);
                let d = pixel(tx.i1, ty.i1);
                let mut v = [0f32; 3];
                for k in 0..3 {
                    let top = a[k] + (b[k] - a[k]) * tx.f;
                    let bottom = c[k] + (d[k] - c[k]) * tx.f;
                    v[k] = (top + (bottom - top) * ty.f).round() * alpha + beta;
                }
                q0[row + dx] = v[c0];
                q1[row + dx] = v[1];
                q2[row + dx] = v[c2];
            }
        }
    }

    /// Resizes a packed RGB24 image to `width × height` RGB24 (OpenCV `INTER_LINEAR`, rounded),
    /// into `out` (cleared and refilled).
    pub fn resize_rgb(&mut self, src: &Source<'_>, width: u32, height: u32, out: &mut Vec<u8>) {
        out.clear();
        if width == 0 || height == 0 || src.padded_width == 0 || src.padded_height == 0 {
            return;
        }
        taps(&mut self.xs, src.padded_width, width);
        taps(&mut self.ys, src.padded_height, height);
        out.reserve(width as usize * height as usize * 3);
        let pixel = |x: u32, y: u32, k: usize| -> f32 {
            if x >= src.width || y >= src.height {
                return 0.0;
            }
            f32::from(src.data[y as usize * src.stride + x as usize * 3 + k])
        };
        for ty in &self.ys {
            for tx in &self.xs {
                for k in 0..3 {
                    let top = pixel(tx.i0, ty.i0, k) + (pixel(tx.i1, ty.i0, k) - pixel(tx.i0, ty.i0, k)) * tx.f;
                    let bottom = pixel(tx.i0, ty.i1, k) + (pixel(tx.i1, ty.i1, k) - pixel(tx.i0, ty.i1, k)) * tx.f;
                    out.push((top + (bottom - top) * ty.f).round().clamp(0.0, 255.0) as u8);
                }
            }
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
    fn padding_reads_black_and_bgr_swaps_planes() {
        let data = [200u8, 100, 50];
        let src = Source { padded_width: 2, padded_height: 1, ..Source::packed(&data, 1, 1) };
        let mut buf = vec![0f32; 6];
        let mut dst = Dest { data: &mut buf, width: 2, height: 1, row_stride: 2, plane_len: 2 };
        Resizer::new().resize_normalize(&src, &mut dst, ChannelOrder::Bgr, 1.0, 0.0);
        assert_eq!(buf, vec![50.0, 0.0, 100.0, 0.0, 200.0, 0.0]);
    }
}
