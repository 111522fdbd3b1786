//! Shot boundary detection by frame-to-frame content change: a port of PySceneDetect 0.7.2's
//! `ContentDetector` (`scenedetect/detectors/content_detector.py`) and its `FlashFilter` in merge
//! mode (`scenedetect/detector.py`), as run by `scenedetect detect-content` with its defaults.
//!
//! Per frame (already downscaled to the processing size, see [`processing_size`]):
//! 1. convert BGR to HSV exactly as OpenCV's 8-bit `cv2.COLOR_BGR2HSV` does (H in 0..180, S and V
//!    in 0..=255; see [`bgr_to_hsv`]);
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

/// Scores consecutive frames by their HSV content change.
///
/// Holds the previous frame's H, S and V planes (3 × processing width × height bytes).
#[derive(Debug, Default)]
pub struct ContentScorer {
    width: usize,
    height: usize,
    prev: Vec<u8>,
    cur: Vec<u8>,
    has_prev: bool,
}

impl ContentScorer {
    /// A scorer for frames of `width` × `height` pixels (the processing size).
    pub fn new(width: usize, height: usize) -> Self {
        let n = width * height * 3;
        Self { width, height, prev: vec![0; n], cur: vec![0; n], has_prev: false }
    }

    /// Scores one packed BGR24 frame whose rows start every `stride` bytes.
    ///
    /// Returns the content score in HSV delta units 0–255 (0.0 for the first frame), or `None`
    /// when `bgr` is too short for the configured size and `stride`.
    pub fn score_bgr(&mut self, bgr: &[u8], stride: usize) -> Option<f64> {
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || stride < w * 3 || bgr.len() < stride * (h - 1) + w * 3 {
            return None;
        }
        let plane = w * h;
        let (hue, rest) = self.cur.split_at_mut(plane);
        let (sat, val) = rest.split_at_mut(plane);
        let (ph, prest) = self.prev.split_at(plane);
        let (ps, pv) = prest.split_at(plane);
        // One pass per row: convert, store for the next frame, and accumulate |Δ| against the
        // previous frame (u64 sums: a 16384² frame of 255s cannot overflow them).
        let (mut sum_h, mut sum_s, mut sum_v) = (0u64, 0u64, 0u64);
        for y in 0..h {
            let row = &bgr[y * stride..y * stride + w * 3];
            let o = y * w;
            let (rh, rs, rv) = (&mut hue[o..o + w], &mut sat[o..o + w], &mut val[o..o + w]);
            let (qh, qs, qv) = (&ph[o..o + w], &ps[o..o + w], &pv[o..o + w]);
            let (mut acc_h, mut acc_s, mut acc_v) = (0u32, 0u32, 0u32);
            for (x, px) in row.chunks_exact(3).enumerate() {
                let (hh, ss, vv) = bgr_to_hsv(px[0], px[1], px[2]);
                rh[x] = hh;
                rs[x] = ss;
                rv[x] = vv;
                acc_h += u32::from(hh.abs_diff(qh[x]));
                acc_s += u32::from(ss.abs_diff(qs[x]));
                acc_v += u32::from(vv.abs_diff(qv[x]));
            }
            sum_h += u64::from(acc_h);
            sum_s += u64::from(acc_s);
            sum_v += u64::from(acc_v);
        }
        let score = if self.has_prev {
            let n = plane as f64;
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

    /// Processes frame `frame` (BGR24 at the processing size, rows every `stride` bytes) and
    /// returns a cut it completes, if any. `None` as well when the buffer is too short (the
    /// caller sizes it, so this does not happen).
    pub fn process(&mut self, frame: u64, time_secs: f64, bgr: &[u8], stride: usize) -> Option<ScoredFrame> {
        let score = self.scorer.score_bgr(bgr, stride)?;
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
        // Black then white: ΔH 0, ΔS 0, ΔV 255 -> 85.
        assert_eq!(s.score_bgr(&[0; 6], 6), Some(0.0));
        assert_eq!(s.score_bgr(&[255; 6], 6), Some(85.0));
        // Same frame again: no change.
        assert_eq!(s.score_bgr(&[255; 6], 6), Some(0.0));
        // Short buffer is refused, not a panic.
        assert_eq!(s.score_bgr(&[255; 5], 6), None);
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
