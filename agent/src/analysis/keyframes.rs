//! One keyframe per shot: the frame nearest the middle of the shot, described by a 64-bit DCT
//! perceptual hash of a tiny grayscale thumbnail.
//!
//! Memory is bounded regardless of shot length: the picker keeps a thumbnail
//! ([`THUMB_SIDE`]² bytes) of every frame in a window of the last `min_shot_frames + 1` frames —
//! the only frames a cut reported later can still separate from the open shot — and, for older
//! frames of the open shot, at most [`HISTORY_THUMBS_MAX`] thumbnails, thinned by doubling the
//! sampling stride whenever that store fills up. The chosen keyframe is the kept frame nearest the
//! shot's middle frame (exact for shots up to [`HISTORY_THUMBS_MAX`] frames).

use std::collections::VecDeque;

use gaffer_protocol::digest::Keyframe;
use image::{GrayImage, ImageBuffer, Luma};
use image_hasher::{HashAlg, Hasher, HasherConfig};

/// Side of the grayscale thumbnail kept per frame, pixels (16 × 16 = 256 bytes). The DCT hash
/// works on a 16 × 16 image (twice the 8 × 8 hash size), so nothing is lost.
pub const THUMB_SIDE: usize = 16;

/// Thumbnails sample every `SUBSAMPLE`-th pixel and row.
const SUBSAMPLE: usize = 2;

/// Most thumbnails kept for the older part of the open shot.
pub const HISTORY_THUMBS_MAX: usize = 256;

/// A grayscale thumbnail, row-major, [`THUMB_SIDE`]² luma bytes.
pub type Thumb = [u8; THUMB_SIDE * THUMB_SIDE];

/// Computes the luma thumbnail of a BGRx frame (4 bytes a pixel: B, G, R, ignored) by box
/// averaging every other pixel of every other row (luma = (77 R + 150 G + 29 B) / 256, BT.601
/// weights). The 2 × 2 subsampling keeps this at a quarter of a pass over the frame; each bin
/// still averages ≥ 12 samples at the usual processing sizes (≥ 160 × 90).
///
/// Precomputes, for one frame size, which sampled columns fall in each of the
/// [`THUMB_SIDE`] bin columns; reuse it for every frame.
#[derive(Debug)]
pub struct Thumbnailer {
    width: usize,
    height: usize,
    /// Per bin column, the range of sampled columns in it (sample `k` is pixel column `2k`).
    col_samples: Vec<std::ops::Range<usize>>,
    counts: Vec<u32>,
    sums: Vec<u32>,
    /// Per sampled column, the luma summed over the sampled rows of the current bin row.
    col_sums: Vec<u32>,
    arch: pulp::Arch,
}

/// Luma of one BGRx pixel (`px` read little-endian), 0..=255.
#[inline(always)]
fn luma(px: u32) -> u32 {
    (77 * ((px >> 16) & 0xff) + 150 * ((px >> 8) & 0xff) + 29 * (px & 0xff)) >> 8
}

/// One frame's thumbnail sums, run through [`pulp`] so the per-row loop is vectorized for the
/// CPU at hand: sampled rows are summed column-wise into `col_sums` (a loop that vectorizes),
/// and each bin row's column sums are folded into its [`THUMB_SIDE`] bins once.
struct ThumbSums<'a> {
    bgrx: &'a [u8],
    stride: usize,
    width: usize,
    height: usize,
    col_samples: &'a [std::ops::Range<usize>],
    col_sums: &'a mut [u32],
    sums: &'a mut [u32],
}

impl ThumbSums<'_> {
    fn flush(&mut self, row_bin: usize) {
        let bins = &mut self.sums[row_bin * THUMB_SIDE..(row_bin + 1) * THUMB_SIDE];
        for (bin, cols) in bins.iter_mut().zip(self.col_samples) {
            *bin += self.col_sums[cols.clone()].iter().sum::<u32>();
        }
        self.col_sums.fill(0);
    }
}

impl pulp::WithSimd for ThumbSums<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(mut self, _simd: S) {
        let (w, h) = (self.width, self.height);
        self.col_sums.fill(0);
        let mut row_bin = 0;
        for y in (0..h).step_by(SUBSAMPLE) {
            let bin = y * THUMB_SIDE / h;
            if bin != row_bin {
                self.flush(row_bin);
                row_bin = bin;
            }
            let row = &self.bgrx[y * self.stride..y * self.stride + w * 4];
            // Pairs of pixels, the first of each sampled; an odd width leaves one last pixel.
            let pairs = row.chunks_exact(4 * SUBSAMPLE);
            let last = pairs.remainder();
            for (acc, px) in self.col_sums.iter_mut().zip(pairs) {
                *acc += luma(u32::from_le_bytes([px[0], px[1], px[2], px[3]]));
            }
            if let ([b, g, r, x], Some(acc)) = (last, self.col_sums.last_mut()) {
                *acc += luma(u32::from_le_bytes([*b, *g, *r, *x]));
            }
        }
        self.flush(row_bin);
    }
}

impl Thumbnailer {
    /// A thumbnailer for frames of `width` × `height` pixels (both ≥ 1).
    pub fn new(width: usize, height: usize) -> Self {
        let width = width.max(1);
        let height = height.max(1);
        let bin_of = |x: usize| x * THUMB_SIDE / width;
        let samples = width.div_ceil(SUBSAMPLE);
        // Bins are monotonic in x: each bin column is a run of sampled columns.
        let col_samples: Vec<std::ops::Range<usize>> = (0..THUMB_SIDE)
            .map(|c| {
                let mut ks = (0..samples).filter(|&k| bin_of(k * SUBSAMPLE) == c);
                match (ks.next(), ks.next_back()) {
                    (Some(first), last) => first..last.unwrap_or(first) + 1,
                    (None, _) => 0..0,
                }
            })
            .collect();
        let mut counts = vec![0u32; THUMB_SIDE * THUMB_SIDE];
        for y in (0..height).step_by(SUBSAMPLE) {
            let row = y * THUMB_SIDE / height * THUMB_SIDE;
            for x in (0..width).step_by(SUBSAMPLE) {
                counts[row + bin_of(x)] += 1;
            }
        }
        Self {
            width,
            height,
            col_samples,
            counts,
            sums: vec![0; THUMB_SIDE * THUMB_SIDE],
            col_sums: vec![0; samples],
            arch: pulp::Arch::new(),
        }
    }

    /// Thumbnail of a BGRx frame whose rows start every `stride` bytes; `None` if `bgrx` is too
    /// short for the configured size.
    pub fn thumb(&mut self, bgrx: &[u8], stride: usize) -> Option<Thumb> {
        let (w, h) = (self.width, self.height);
        if stride < w * 4 || bgrx.len() < stride * (h - 1) + w * 4 {
            return None;
        }
        self.sums.fill(0);
        self.arch.dispatch(ThumbSums {
            bgrx,
            stride,
            width: w,
            height: h,
            col_samples: &self.col_samples,
            col_sums: &mut self.col_sums,
            sums: &mut self.sums,
        });
        let mut out = [0u8; THUMB_SIDE * THUMB_SIDE];
        for ((o, &s), &n) in out.iter_mut().zip(&self.sums).zip(&self.counts) {
            // Bins without pixels (frames narrower than THUMB_SIDE) stay black.
            *o = (s + n / 2).checked_div(n).map_or(0, |avg| avg.min(255) as u8);
        }
        Some(out)
    }
}

#[derive(Debug, Clone)]
struct Kept {
    frame: u64,
    time_secs: f64,
    thumb: Thumb,
}

/// Picks and hashes one keyframe per shot while frames stream past.
pub struct KeyframePicker {
    hasher: Hasher,
    /// Last `window` frames, every frame.
    recent: VecDeque<Kept>,
    window: usize,
    /// Older frames of the open shot, thinned.
    history: Vec<Kept>,
    history_stride: u64,
    shot_start: u64,
}

impl std::fmt::Debug for KeyframePicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyframePicker")
            .field("recent", &self.recent.len())
            .field("history", &self.history.len())
            .field("history_stride", &self.history_stride)
            .field("shot_start", &self.shot_start)
            .finish()
    }
}

/// Name and parameters of the keyframe hash, for the digest's analyzer list.
pub const PHASH_DESCRIPTION: &str = "dct-median 8x8 over 16x16 luma (image_hasher 3)";

impl KeyframePicker {
    /// A picker for a detector that reports cuts at most `max_cut_delay_frames` frames late
    /// (the minimum shot length for the merge filter).
    pub fn new(max_cut_delay_frames: u32) -> Self {
        let hasher = HasherConfig::new().hash_size(8, 8).hash_alg(HashAlg::Median).preproc_dct().to_hasher();
        Self {
            hasher,
            recent: VecDeque::new(),
            window: max_cut_delay_frames as usize + 1,
            history: Vec::new(),
            history_stride: 1,
            shot_start: 0,
        }
    }

    /// Adds frame `frame` (numbers increase by one per call) with its time and thumbnail.
    pub fn push(&mut self, frame: u64, time_secs: f64, thumb: Thumb) {
        self.recent.push_back(Kept { frame, time_secs, thumb });
        while self.recent.len() > self.window {
            let Some(old) = self.recent.pop_front() else {
                break;
            };
            if old.frame < self.shot_start {
                continue;
            }
            let due = match self.history.last() {
                None => true,
                Some(last) => old.frame - last.frame >= self.history_stride,
            };
            if due {
                self.history.push(old);
                if self.history.len() > HISTORY_THUMBS_MAX {
                    let mut i = 0;
                    self.history.retain(|_| {
                        i += 1;
                        i % 2 == 1
                    });
                    self.history_stride *= 2;
                }
            }
        }
    }

    /// Closes the open shot at `cut` (the first frame of the next shot) and returns the
    /// keyframe of the closed shot `shot_start..cut`. `None` if no frame of it was seen.
    pub fn cut(&mut self, cut: u64) -> Option<Keyframe> {
        let key = self.pick(self.shot_start, cut);
        self.history.clear();
        self.history_stride = 1;
        self.recent.retain(|k| k.frame >= cut);
        self.shot_start = cut;
        key
    }

    /// Returns the keyframe of the last shot, `shot_start..end_frame`.
    pub fn finish(&mut self, end_frame: u64) -> Option<Keyframe> {
        self.pick(self.shot_start, end_frame)
    }

    fn pick(&self, start: u64, end: u64) -> Option<Keyframe> {
        let mid = start + end.saturating_sub(start) / 2;
        let best = self
            .history
            .iter()
            .chain(self.recent.iter())
            .filter(|k| k.frame >= start && k.frame < end)
            .min_by_key(|k| k.frame.abs_diff(mid))?;
        let img: GrayImage =
            ImageBuffer::<Luma<u8>, Vec<u8>>::from_raw(THUMB_SIDE as u32, THUMB_SIDE as u32, best.thumb.to_vec())?;
        let hash = self.hasher.hash_image(&img);
        Some(Keyframe { frame: best.frame, time_secs: best.time_secs, phash: hex::encode(hash.as_bytes()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: u8) -> Thumb {
        [v; THUMB_SIDE * THUMB_SIDE]
    }

    #[test]
    fn picks_middle_frame_of_each_shot_with_bounded_memory() {
        let mut p = KeyframePicker::new(15);
        let mut keys = Vec::new();
        // Shot 0: frames 0..1000 (longer than the history cap), cut reported 15 frames late.
        for f in 0..1015u64 {
            p.push(f, f as f64 / 25.0, flat((f % 251) as u8));
            assert!(p.history.len() <= HISTORY_THUMBS_MAX);
            assert!(p.recent.len() <= 16);
        }
        keys.push(p.cut(1000).expect("shot 0 has frames"));
        for f in 1015..1040u64 {
            p.push(f, f as f64 / 25.0, flat(0));
        }
        keys.push(p.finish(1040).expect("shot 1 has frames"));
        // Thinned history: the kept frame nearest 500 is within the final stride.
        assert!(keys[0].frame.abs_diff(500) <= 4, "{:?}", keys[0]);
        assert_eq!(keys[1].frame, 1020);
        assert!(keys.iter().all(|k| k.phash.len() == 16 && k.phash.chars().all(|c| c.is_ascii_hexdigit())));
    }

    /// A deterministic textured picture (a 64-bit LCG, so no dependency on a random crate).
    fn texture(seed: u64) -> Thumb {
        let mut x = seed;
        let mut t = flat(0);
        for px in t.iter_mut() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *px = (x >> 56) as u8;
        }
        t
    }

    #[test]
    fn similar_pictures_hash_close_and_different_pictures_far() {
        let p = KeyframePicker::new(1);
        let hash = |t: Thumb| {
            let img = GrayImage::from_raw(THUMB_SIDE as u32, THUMB_SIDE as u32, t.to_vec()).expect("size");
            p.hasher.hash_image(&img)
        };
        let a = texture(1);
        let b = texture(2);
        let mut a_brighter = a;
        for px in a_brighter.iter_mut() {
            *px = px.saturating_add(8);
        }
        assert!(hash(a).dist(&hash(b)) > 16, "unrelated pictures: {}", hash(a).dist(&hash(b)));
        assert!(hash(a).dist(&hash(a_brighter)) <= 4, "brightened: {}", hash(a).dist(&hash(a_brighter)));
        assert_eq!(hash(a).as_bytes().len(), 8, "64-bit hash");
    }

    #[test]
    fn thumbnail_averages_luma() {
        let mut t = Thumbnailer::new(32, 32);
        // White BGRx frame: luma (77 + 150 + 29) * 255 / 256 = 255.
        let frame = vec![255u8; 32 * 32 * 4];
        assert_eq!(t.thumb(&frame, 32 * 4), Some(flat(255)));
        assert_eq!(t.thumb(&frame[..10], 32 * 4), None);
    }

    /// The straightforward definition: every other pixel of every other row, binned by
    /// `x * 16 / width` and `y * 16 / height`, rounded mean of the luma per bin.
    fn thumb_reference(bgrx: &[u8], stride: usize, w: usize, h: usize) -> Thumb {
        let mut sums = [0u32; THUMB_SIDE * THUMB_SIDE];
        let mut counts = [0u32; THUMB_SIDE * THUMB_SIDE];
        for y in (0..h).step_by(2) {
            for x in (0..w).step_by(2) {
                let p = &bgrx[y * stride + 4 * x..];
                let bin = y * THUMB_SIDE / h * THUMB_SIDE + x * THUMB_SIDE / w;
                sums[bin] += (77 * u32::from(p[2]) + 150 * u32::from(p[1]) + 29 * u32::from(p[0])) >> 8;
                counts[bin] += 1;
            }
        }
        let mut out = flat(0);
        for ((o, s), n) in out.iter_mut().zip(sums).zip(counts) {
            *o = (s + n / 2).checked_div(n).unwrap_or(0) as u8;
        }
        out
    }

    #[test]
    fn thumbnail_matches_reference_on_odd_sizes_and_padded_rows() {
        for (w, h) in [(160, 90), (256, 109), (256, 188), (5, 3), (17, 33), (255, 143), (1, 1)] {
            let stride = w * 4 + 12;
            let mut x = (w * 31 + h) as u64;
            let frame: Vec<u8> = (0..stride * h)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            let mut t = Thumbnailer::new(w, h);
            assert_eq!(t.thumb(&frame, stride), Some(thumb_reference(&frame, stride, w, h)), "{w}x{h}");
        }
    }
}
