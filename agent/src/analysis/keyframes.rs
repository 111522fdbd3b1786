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

/// Computes the luma thumbnail of a packed BGR24 frame by box averaging every other pixel of
/// every other row (luma = (77 R + 150 G + 29 B) / 256, BT.601 weights). The 2 × 2 subsampling
/// keeps this at a quarter of a pass over the frame; each bin still averages ≥ 12 samples at
/// the usual processing sizes (≥ 160 × 90).
///
/// Precomputes the column-to-bin table for one frame size; reuse it for every frame.
#[derive(Debug)]
pub struct Thumbnailer {
    width: usize,
    height: usize,
    col_bin: Vec<usize>,
    counts: Vec<u32>,
    sums: Vec<u32>,
}

impl Thumbnailer {
    /// A thumbnailer for frames of `width` × `height` pixels (both ≥ 1).
    pub fn new(width: usize, height: usize) -> Self {
        let width = width.max(1);
        let height = height.max(1);
        let col_bin: Vec<usize> = (0..width).map(|x| x * THUMB_SIDE / width).collect();
        let mut counts = vec![0u32; THUMB_SIDE * THUMB_SIDE];
        for y in (0..height).step_by(SUBSAMPLE) {
            let row = y * THUMB_SIDE / height * THUMB_SIDE;
            for &c in col_bin.iter().step_by(SUBSAMPLE) {
                counts[row + c] += 1;
            }
        }
        Self { width, height, col_bin, counts, sums: vec![0; THUMB_SIDE * THUMB_SIDE] }
    }

    /// Thumbnail of a BGR24 frame whose rows start every `stride` bytes; `None` if `bgr` is too
    /// short for the configured size.
    pub fn thumb(&mut self, bgr: &[u8], stride: usize) -> Option<Thumb> {
        let (w, h) = (self.width, self.height);
        if stride < w * 3 || bgr.len() < stride * (h - 1) + w * 3 {
            return None;
        }
        self.sums.fill(0);
        for y in (0..h).step_by(SUBSAMPLE) {
            let row_bin = y * THUMB_SIDE / h * THUMB_SIDE;
            let row = &bgr[y * stride..y * stride + w * 3];
            for (px, &c) in row.chunks(3 * SUBSAMPLE).zip(self.col_bin.iter().step_by(SUBSAMPLE)) {
                let luma = (77 * u32::from(px[2]) + 150 * u32::from(px[1]) + 29 * u32::from(px[0])) >> 8;
                self.sums[row_bin + c] += luma;
            }
        }
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
        // White BGR frame: luma (77 + 150 + 29) * 255 / 256 = 255.
        let frame = vec![255u8; 32 * 32 * 3];
        assert_eq!(t.thumb(&frame, 32 * 3), Some(flat(255)));
        assert_eq!(t.thumb(&frame[..10], 32 * 3), None);
    }
}
