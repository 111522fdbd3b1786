//! Shot boundary detection by frame-to-frame content change: a port of PySceneDetect 0.7.2's
//! `ContentDetector` (`scenedetect/detectors/content_detector.py`) and its `FlashFilter` in merge
//! mode (`scenedetect/detector.py`), as run by `scenedetect detect-content` with its defaults.
//!
//! Per frame (already downscaled to the processing size, see [`processing_size`]):
//! 1. convert BGR to HSV exactly as OpenCV's 8-bit `cv2.COLOR_BGR2HSV` does (H in 0..180, S and V
//!    in 0..=255; see [`bgr_to_hsv`]). The frame arrives as BGRx (4 bytes a pixel), which
//!    vectorizes better than BGR24 and holds the same B, G, R values from swscale;
//! 2. score = mean over pixels of |ΔH|, |ΔS|, |ΔV| against the previous frame, combined with the
//!    component weights 1, 1, 1 (edges weight 0, so no edge map is computed) and divided by the
//!    sum of the weights: `(ΔH + ΔS + ΔV) / 3`, in HSV delta units 0–255. The first frame scores 0;
//! 3. a frame whose score is `>= threshold` is "above threshold"; [`FlashFilter`] turns the
//!    above/below sequence into cuts, enforcing the minimum shot length by merging.

/// Default cut threshold, HSV delta units 0–255: 27.0, as PySceneDetect's `ContentDetector`
/// (`threshold: float = 27.0`) and the `detect-content` CLI default.
pub const CONTENT_THRESHOLD_DEFAULT: f64 = 27.0;

/// Default minimum shot length, frames: 15. PySceneDetect's `ContentDetector` default is 15
/// frames; its CLI default is `--min-scene-len 0.6s`, which is 15 frames at 25 fps.
pub const MIN_SHOT_FRAMES_DEFAULT: u32 = 15;

/// Largest accepted minimum shot length, frames. The detector buffers one small thumbnail per
/// frame of this window, so the limit bounds memory (about 256 bytes per frame).
pub const MIN_SHOT_FRAMES_MAX: u32 = 10_000;

/// Frame width the processing size aims at, pixels: PySceneDetect's `DEFAULT_MIN_WIDTH = 256`
/// (`scenedetect/scene_manager.py`).
pub const PROCESSING_WIDTH_MIN: u32 = 256;

/// Processing (downscaled) frame size for a `width` × `height` source, as PySceneDetect's
/// `compute_downscale_factor` + `cv2.resize` call compute it: the factor is
/// `max(width, height) / 256` when that side is at least 256 px (otherwise 1, no scaling), and
/// each side becomes `max(1, round(side / factor))` with Python's round-half-to-even.
///
/// Returns `(width, height)` in pixels; both are at least 1 for non-zero input.
pub fn processing_size(width: u32, height: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest < PROCESSING_WIDTH_MIN || width == 0 || height == 0 {
        return (width.max(1), height.max(1));
    }
    let factor = f64::from(longest) / f64::from(PROCESSING_WIDTH_MIN);
    let side = |v: u32| ((f64::from(v) / factor).round_ties_even() as u32).max(1);
    (side(width), side(height))
}

/// Fixed-point shift of OpenCV's 8-bit HSV conversion (`hsv_shift = 12` in
/// `modules/imgproc/src/color_hsv.simd.hpp`).
const HSV_SHIFT: u32 = 12;

/// OpenCV's `sdiv_table` and `hdiv_table180`: `round((255 << 12) / v)` and
/// `round((180 << 12) / (6 * d))`, with entry 0 = 0.
struct HsvTables {
    sdiv: [i32; 256],
    hdiv180: [i32; 256],
}

const HSV_TABLES: HsvTables = {
    let mut sdiv = [0i32; 256];
    let mut hdiv180 = [0i32; 256];
    let mut i = 1;
    while i < 256 {
        // Integer round-half-up of a/b equals OpenCV's cvRound here: no entry is an exact tie
        // (255 << 12 and 180 << 12 / 6 have too few factors of two for i <= 255).
        let a = 255i32 << HSV_SHIFT;
        sdiv[i] = (2 * a + i as i32) / (2 * i as i32);
        let b = (180i32 << HSV_SHIFT) / 6; // 122880, exact
        hdiv180[i] = (2 * b + i as i32) / (2 * i as i32);
        i += 1;
    }
    HsvTables { sdiv, hdiv180 }
};

/// Converts one 8-bit BGR pixel to HSV bit-exactly as OpenCV's `cv2.cvtColor(img,
/// cv2.COLOR_BGR2HSV)` on `uint8` images: H in 0..180 (degrees / 2), S and V in 0..=255.
#[inline(always)]
pub fn bgr_to_hsv(b: u8, g: u8, r: u8) -> (u8, u8, u8) {
    let v8 = b.max(g).max(r);
    let diff8 = v8 - b.min(g).min(r);
    let (b, g, r) = (i32::from(b), i32::from(g), i32::from(r));
    let (v, diff) = (i32::from(v8), i32::from(diff8));
    let round = 1i32 << (HSV_SHIFT - 1);
    // Indexing with a u8 needs no bounds check; the selects below are branch-free like
    // OpenCV's masks (unpredictable branches would dominate the cost).
    let s = (diff * HSV_TABLES.sdiv[usize::from(v8)] + round) >> HSV_SHIFT;
    let vr = -i32::from(v == r);
    let vg = -i32::from(v == g);
    let h_raw = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    let h = (h_raw * HSV_TABLES.hdiv180[usize::from(diff8)] + round) >> HSV_SHIFT;
    let h = h + ((h >> 31) & 180);
    (h as u8, s as u8, v8)
}

/// `1.5 × 2^23` as f32: adding it to a float in `0..2^22` rounds the float to the nearest
/// integer (ties to even) and leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Bit pattern of [`ROUND_MAGIC`].
const ROUND_MAGIC_BITS: i32 = 0x4B40_0000;

/// `round(num / den)` for `num` in `0..2^22` and `den` in `0..=255` (0 counts as 1), in f32 and
/// bit operations only, so that it vectorizes. Used to compute OpenCV's division table entries
/// `round(num / den)` in the lanes instead of looking them up; the unit tests check that every
/// entry comes out the same as [`HSV_TABLES`]' exact integer ones.
#[inline(always)]
fn div_round(num: f32, den: i32) -> i32 {
    // `as f32` of a value in 1..=255 is exact; no saturating float-to-int cast (which does not
    // vectorize): the magic addition leaves the rounded quotient in the low mantissa bits.
    ((num / den.max(1) as f32) + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC_BITS
}

/// Numerator of OpenCV's `sdiv_table`: `255 << 12`.
const SDIV_NUM: f32 = (255 << HSV_SHIFT) as f32;
/// Numerator of OpenCV's `hdiv_table180`: `(180 << 12) / 6`.
const HDIV180_NUM: f32 = ((180 << HSV_SHIFT) / 6) as f32;

/// [`bgr_to_hsv`] for one pixel of a BGRx frame (bytes B, G, R, x; `px` read little-endian),
/// with the division tables computed instead of looked up (see [`div_round`]) so that a loop
/// over pixels vectorizes. Same results as [`bgr_to_hsv`] for all 2^24 colours (unit-tested).
#[inline(always)]
fn bgrx_to_hsv(px: u32) -> (u8, u8, u8) {
    let (b, g, r) = ((px & 0xff) as i32, ((px >> 8) & 0xff) as i32, ((px >> 16) & 0xff) as i32);
    let v = b.max(g).max(r);
    let diff = v - b.min(g).min(r);
    let round = 1i32 << (HSV_SHIFT - 1);
    // Entry 0 of both tables is 0 (black pixels, grey pixels).
    let sdiv = div_round(SDIV_NUM, v) & -i32::from(v != 0);
    let hdiv = div_round(HDIV180_NUM, diff) & -i32::from(diff != 0);
    let s = (diff * sdiv + round) >> HSV_SHIFT;
    let vr = -i32::from(v == r);
    let vg = -i32::from(v == g);
    let h_raw = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    let h = (h_raw * hdiv + round) >> HSV_SHIFT;
    let h = h + ((h >> 31) & 180);
    (h as u8, s as u8, v as u8)
}

/// Converts one row of BGRx pixels (4 bytes each) to H, S and V bytes. Written as a plain loop
/// without lookups or branches so that the compiler vectorizes it.
#[inline(always)]
fn hsv_row(bgrx: &[u8], hue: &mut [u8], sat: &mut [u8], val: &mut [u8]) {
    for (((px, h), s), v) in bgrx.chunks_exact(4).zip(hue.iter_mut()).zip(sat.iter_mut()).zip(val.iter_mut()) {
        let (hh, ss, vv) = bgrx_to_hsv(u32::from_le_bytes([px[0], px[1], px[2], px[3]]));
        *h = hh;
        *s = ss;
        *v = vv;
    }
}

/// Sum of `|a[i] - b[i]|` over two byte planes of the same length (vectorizes to `psadbw`).
#[inline(always)]
fn sum_abs_diff(a: &[u8], b: &[u8]) -> u64 {
    // 65 536 × 255 fits a u32; sum the chunks' totals in u64.
    const CHUNK: usize = 1 << 16;
    a.chunks(CHUNK)
        .zip(b.chunks(CHUNK))
        .map(|(a, b)| u64::from(a.iter().zip(b).map(|(x, y)| u32::from(x.abs_diff(*y))).sum::<u32>()))
        .sum()
}

/// One frame's HSV conversion and delta sums, run through [`pulp`] so that the loops are
/// compiled for the best instruction set the CPU has (AVX2 where available, else the baseline).
struct HsvDelta<'a> {
    bgrx: &'a [u8],
    stride: usize,
    width: usize,
    cur: &'a mut [u8],
    prev: &'a [u8],
}

impl pulp::WithSimd for HsvDelta<'_> {
    /// Sums of |ΔH|, |ΔS|, |ΔV| over the frame.
    type Output = [u64; 3];

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> [u64; 3] {
        let w = self.width;
        let plane = self.cur.len() / 3;
        let (hue, rest) = self.cur.split_at_mut(plane);
        let (sat, val) = rest.split_at_mut(plane);
        let rows = self.bgrx.chunks(self.stride).zip(hue.chunks_exact_mut(w)).zip(sat.chunks_exact_mut(w));
        for (((row, h), s), v) in rows.zip(val.chunks_exact_mut(w)) {
            hsv_row(row, h, s, v);
        }
        let (ph, prest) = self.prev.split_at(plane);
        let (ps, pv) = prest.split_at(plane);
        let (hue, rest) = self.cur.split_at(plane);
        let (sat, val) = rest.split_at(plane);
        [sum_abs_diff(hue, ph), sum_abs_diff(sat, ps), sum_abs_diff(val, pv)]
    }
}

/// Scores consecutive frames by their HSV content change.
///
/// Holds the current and the previous frame's H, S and V planes (2 × 3 × processing width ×
/// height bytes). The per-pixel work runs vectorized (see [`pulp`]): about 1 ns per pixel with
/// AVX2.
#[derive(Debug)]
pub struct ContentScorer {
    width: usize,
    height: usize,
    prev: Vec<u8>,
    cur: Vec<u8>,
    has_prev: bool,
    arch: pulp::Arch,
}

impl Default for ContentScorer {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

impl ContentScorer {
    /// A scorer for frames of `width` × `height` pixels (the processing size).
    pub fn new(width: usize, height: usize) -> Self {
        let n = width * height * 3;
        Self { width, height, prev: vec![0; n], cur: vec![0; n], has_prev: false, arch: pulp::Arch::new() }
    }

    /// Scores one BGRx frame (4 bytes per pixel: B, G, R and one ignored byte, as FFmpeg's
    /// `bgr0` and `bgra`) whose rows start every `stride` bytes.
    ///
    /// Returns the content score in HSV delta units 0–255 (0.0 for the first frame), or `None`
    /// when `bgrx` is too short for the configured size and `stride`.
    pub fn score_bgrx(&mut self, bgrx: &[u8], stride: usize) -> Option<f64> {
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || stride < w * 4 || bgrx.len() < stride * (h - 1) + w * 4 {
            return None;
        }
        // Each row passed on is exactly `4 * w` bytes, the last one included.
        let rows = &bgrx[..stride * (h - 1) + w * 4];
        let [sum_h, sum_s, sum_v] =
            self.arch.dispatch(HsvDelta { bgrx: rows, stride, width: w, cur: &mut self.cur, prev: &self.prev });
        let score = if self.has_prev {
            let n = (w * h) as f64;
            let delta_hue = sum_h as f64 / n;
            let delta_sat = sum_s as f64 / n;
            let delta_lum = sum_v as f64 / n;
            // Same summation order as PySceneDetect: sum(component * weight) / sum(|weight|),
            // weights (1, 1, 1, 0).
            (delta_hue + delta_sat + delta_lum + 0.0) / 3.0
        } else {
            0.0
        };
        std::mem::swap(&mut self.prev, &mut self.cur);
        self.has_prev = true;
        Some(score)
    }
}

/// One frame's detection input: its number, time and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredFrame {
    /// Frame number, counted from 0 in presentation order.
    pub frame: u64,
    /// Presentation time, seconds.
    pub time_secs: f64,
    /// Content score, HSV delta units 0–255.
    pub score: f64,
}

/// PySceneDetect's `FlashFilter` in `Mode.MERGE` with a length in frames: enforces the minimum
/// shot length by merging cuts that come too close together.
///
/// Semantics (from `FlashFilter._filter_merge`): a frame above the threshold at least `length`
/// frames after the previous above-threshold frame is a cut. One that comes sooner (after the
/// first cut was emitted) starts a merge; the merge ends, emitting a cut at the *last*
/// above-threshold frame, once `length` frames pass below the threshold and the merged run
/// spans at least `length` frames. A merge still open at the end of the video emits nothing
/// (`ContentDetector` has no `post_process`). Cuts can therefore be reported up to `length`
/// frames after the frame they name.
#[derive(Debug)]
pub struct FlashFilter {
    length: u64,
    last_above: Option<ScoredFrame>,
    merge_enabled: bool,
    merge_triggered: bool,
    merge_start: u64,
}

impl FlashFilter {
    /// A merge-mode filter with minimum shot length `length_frames` (0 disables it).
    pub fn new(length_frames: u32) -> Self {
        Self {
            length: u64::from(length_frames),
            last_above: None,
            merge_enabled: false,
            merge_triggered: false,
            merge_start: 0,
        }
    }

    /// Feeds the next frame (frame numbers must increase) and returns the cut it completes, if any:
    /// the returned frame is the first frame of a new shot.
    pub fn filter(&mut self, cur: ScoredFrame, above_threshold: bool) -> Option<ScoredFrame> {
        if self.length == 0 {
            return above_threshold.then_some(cur);
        }
        let last = *self.last_above.get_or_insert(cur);
        let min_length_met = cur.frame.saturating_sub(last.frame) >= self.length;
        if above_threshold {
            self.last_above = Some(cur);
        }
        if self.merge_triggered {
            let last = self.last_above.unwrap_or(cur);
            if min_length_met && !above_threshold && last.frame.saturating_sub(self.merge_start) >= self.length {
                self.merge_triggered = false;
                return Some(last);
            }
            return None;
        }
        if !above_threshold {
            return None;
        }
        if min_length_met {
            self.merge_enabled = true;
            return Some(cur);
        }
        if self.merge_enabled {
            self.merge_triggered = true;
            self.merge_start = cur.frame;
        }
        None
    }
}

/// The content detector: [`ContentScorer`] + threshold + [`FlashFilter`].
#[derive(Debug)]
pub struct ContentDetector {
    scorer: ContentScorer,
    filter: FlashFilter,
    threshold: f64,
}

impl ContentDetector {
    /// A detector for frames of the processing size `width` × `height` pixels, cutting at
    /// scores `>= threshold` (HSV delta units 0–255) with minimum shot length `min_shot_frames`.
    pub fn new(width: usize, height: usize, threshold: f64, min_shot_frames: u32) -> Self {
        Self { scorer: ContentScorer::new(width, height), filter: FlashFilter::new(min_shot_frames), threshold }
    }

    /// Processes frame `frame` (BGRx at the processing size, rows every `stride` bytes; see
    /// [`ContentScorer::score_bgrx`]) and returns a cut it completes, if any. `None` as well when
    /// the buffer is too short (the caller sizes it, so this does not happen).
    pub fn process(&mut self, frame: u64, time_secs: f64, bgrx: &[u8], stride: usize) -> Option<ScoredFrame> {
        let score = self.scorer.score_bgrx(bgrx, stride)?;
        let scored = ScoredFrame { frame, time_secs, score };
        self.filter.filter(scored, score >= self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_matches_opencv_reference_values() {
        // Expected values computed with cv2 5.0.0: cv2.cvtColor(np.array([[[b, g, r]]],
        // np.uint8), cv2.COLOR_BGR2HSV). The formula was also checked against OpenCV on all
        // 2^24 colours.
        type Bgr = (u8, u8, u8);
        let cases: [(Bgr, Bgr); 8] = [
            ((0, 0, 0), (0, 0, 0)),
            ((255, 255, 255), (0, 0, 255)),
            ((10, 200, 30), (57, 242, 200)),
            ((200, 10, 30), (123, 242, 200)),
            ((30, 10, 200), (177, 242, 200)),
            ((1, 2, 255), (0, 254, 255)),
            ((128, 64, 255), (170, 191, 255)),
            ((17, 250, 250), (30, 238, 250)),
        ];
        for ((b, g, r), want) in cases {
            assert_eq!(bgr_to_hsv(b, g, r), want, "bgr=({b},{g},{r})");
        }
    }

    #[test]
    fn processing_size_follows_pyscenedetect() {
        assert_eq!(processing_size(160, 90), (160, 90));
        assert_eq!(processing_size(1280, 720), (256, 144));
        // 640 / 2.5 = 256, 272 / 2.5 = 108.8 -> 109.
        assert_eq!(processing_size(640, 272), (256, 109));
        // 720 / 2.8125 = 256, 528 / 2.8125 = 187.73 -> 188.
        assert_eq!(processing_size(720, 528), (256, 188));
        assert_eq!(processing_size(1920, 1080), (256, 144));
    }

    #[test]
    fn score_is_mean_hsv_delta() {
        let mut s = ContentScorer::new(2, 1);
        // Black then white: ΔH 0, ΔS 0, ΔV 255 -> 85. The x byte is ignored.
        assert_eq!(s.score_bgrx(&[0; 8], 8), Some(0.0));
        assert_eq!(s.score_bgrx(&[255, 255, 255, 0, 255, 255, 255, 7], 8), Some(85.0));
        // Same frame again: no change.
        assert_eq!(s.score_bgrx(&[255; 8], 8), Some(0.0));
        // Short buffer is refused, not a panic.
        assert_eq!(s.score_bgrx(&[255; 7], 8), None);
        // A stride shorter than a row is refused.
        assert_eq!(s.score_bgrx(&[255; 8], 7), None);
    }

    #[test]
    fn computed_division_entries_equal_opencv_tables() {
        for i in 0..256i32 {
            let idx = i as usize;
            let sdiv = div_round(SDIV_NUM, i) & -i32::from(i != 0);
            let hdiv = div_round(HDIV180_NUM, i) & -i32::from(i != 0);
            assert_eq!(sdiv, HSV_TABLES.sdiv[idx], "sdiv_table[{i}]");
            assert_eq!(hdiv, HSV_TABLES.hdiv180[idx], "hdiv_table180[{i}]");
        }
    }

    /// The vectorized conversion (through the same dispatch and row loop the scorer uses)
    /// agrees with the OpenCV-exact reference on every one of the 2^24 colours.
    #[test]
    fn vectorized_hsv_matches_reference_for_all_colours() {
        const ROW: usize = 1 << 12;
        let arch = pulp::Arch::new();
        let mut bgrx = vec![0u8; ROW * 4];
        let (mut h, mut s, mut v) = (vec![0u8; ROW], vec![0u8; ROW], vec![0u8; ROW]);
        let mut mismatches = 0u64;
        for start in (0u32..1 << 24).step_by(ROW) {
            for (i, px) in bgrx.chunks_exact_mut(4).enumerate() {
                // x byte set to 0xA5 to check it is ignored.
                let [b, g, r, _] = (start + i as u32).to_le_bytes();
                px.copy_from_slice(&[b, g, r, 0xA5]);
            }
            struct Row<'a>(&'a [u8], &'a mut [u8], &'a mut [u8], &'a mut [u8]);
            impl pulp::WithSimd for Row<'_> {
                type Output = ();
                #[inline(always)]
                fn with_simd<S: pulp::Simd>(self, _simd: S) {
                    hsv_row(self.0, self.1, self.2, self.3);
                }
            }
            arch.dispatch(Row(&bgrx, &mut h, &mut s, &mut v));
            for (i, px) in bgrx.chunks_exact(4).enumerate() {
                if bgr_to_hsv(px[0], px[1], px[2]) != (h[i], s[i], v[i]) {
                    mismatches += 1;
                }
            }
        }
        assert_eq!(mismatches, 0);
    }

    fn run(filter: &mut FlashFilter, above: &[u64], frames: u64) -> Vec<u64> {
        (0..frames)
            .filter_map(|f| {
                let sf = ScoredFrame { frame: f, time_secs: f as f64, score: 0.0 };
                filter.filter(sf, above.contains(&f))
            })
            .map(|c| c.frame)
            .collect()
    }

    #[test]
    fn flash_filter_emits_spaced_cuts_immediately() {
        let mut f = FlashFilter::new(15);
        assert_eq!(run(&mut f, &[20, 40, 100], 200), vec![20, 40, 100]);
    }

    #[test]
    fn flash_filter_ignores_early_cut_before_first_and_merges_after() {
        // Expected outputs were produced by PySceneDetect 0.7.2's own FlashFilter (MERGE, 15).
        // Frame 5 is within 15 frames of frame 0 before any cut was emitted: dropped. 30 is a
        // cut. 35 and 38 come too soon and start a merge whose run (35..=38) never spans 15
        // frames, so it is never emitted.
        let mut f = FlashFilter::new(15);
        assert_eq!(run(&mut f, &[5, 30, 35, 38], 200), vec![30]);
        // A long flashing run 35..=55 (every 4 frames) is merged into one cut at its last frame.
        let mut f = FlashFilter::new(15);
        let above = [30, 35, 39, 43, 47, 51, 55];
        assert_eq!(run(&mut f, &above, 200), vec![30, 55]);
        let mut f = FlashFilter::new(15);
        let above = [30, 35, 39, 43, 47, 51, 55, 120];
        assert_eq!(run(&mut f, &above, 200), vec![30, 55, 120]);
    }

    #[test]
    fn flash_filter_disabled_passes_everything() {
        let mut f = FlashFilter::new(0);
        assert_eq!(run(&mut f, &[1, 2, 3], 10), vec![1, 2, 3]);
    }
}
