//! Per-frame detections and readings aggregated into the digest's time ranges.
//!
//! Frames are pushed in time order (sampled frames and keyframes interleaved, as decoded). A
//! label (or a text) whose last sighting is more than `gap_secs` before the current frame is
//! closed; seeing it again opens a new range. Default `gap_secs` is
//! [`GAP_SECS_DEFAULT`] = 1.0 s, i.e. up to one missed sample at the default 2 samples/s.

use std::collections::BTreeMap;

use gaffer_protocol::digest::{BoxPx, ModerationRange, TextReading};

use super::nudenet::Detection;
use super::ocr::OcrLine;

/// Default gap after which an absent label or text closes its range, seconds.
pub const GAP_SECS_DEFAULT: f64 = 1.0;

/// Builds [`ModerationRange`]s from NudeNet detections on sampled frames.
#[derive(Debug, Clone)]
pub struct ModerationAggregator {
    gap_secs: f64,
    frames: u64,
    last_time_secs: f64,
    open: BTreeMap<&'static str, ModerationRange>,
    closed: Vec<ModerationRange>,
}

impl Default for ModerationAggregator {
    fn default() -> Self {
        Self::new(GAP_SECS_DEFAULT)
    }
}

impl ModerationAggregator {
    /// An empty aggregator; `gap_secs` (≥ 0) as in the module docs.
    pub fn new(gap_secs: f64) -> Self {
        Self {
            gap_secs: gap_secs.max(0.0),
            frames: 0,
            last_time_secs: f64::NEG_INFINITY,
            open: BTreeMap::new(),
            closed: Vec::new(),
        }
    }

    /// Adds one analyzed frame at `time_secs` (non-decreasing; an earlier time is treated as
    /// the previous frame's) with its detections (possibly none).
    pub fn push(&mut self, time_secs: f64, detections: &[Detection]) {
        let t = if time_secs.is_finite() { time_secs.max(self.last_time_secs) } else { self.last_time_secs };
        if !t.is_finite() {
            return;
        }
        self.last_time_secs = t;
        self.frames += 1;
        let gap = self.gap_secs;
        let stale: Vec<&'static str> =
            self.open.iter().filter(|(_, r)| t - r.end_secs > gap).map(|(label, _)| *label).collect();
        for label in stale {
            if let Some(r) = self.open.remove(label) {
                self.closed.push(r);
            }
        }
        // One count per label per frame, peak from the best detection of that label.
        let mut best: BTreeMap<&'static str, &Detection> = BTreeMap::new();
        for d in detections {
            let e = best.entry(d.label).or_insert(d);
            if d.score > e.score {
                *e = d;
            }
        }
        for (label, d) in best {
            let r = self.open.entry(label).or_insert_with(|| ModerationRange {
                label: label.to_owned(),
                start_secs: t,
                end_secs: t,
                peak_score: d.score,
                peak_time_secs: t,
                peak_box: d.box_px,
                frames: 0,
            });
            r.end_secs = t;
            r.frames += 1;
            if d.score > r.peak_score {
                r.peak_score = d.score;
                r.peak_time_secs = t;
                r.peak_box = d.box_px;
            }
        }
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Closes every range; returns them ordered by start time, then label.
    pub fn finish(mut self) -> Vec<ModerationRange> {
        self.closed.extend(self.open.into_values());
        self.closed.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs).then_with(|| a.label.cmp(&b.label)));
        self.closed
    }
}

#[derive(Debug, Clone)]
struct OpenReading {
    reading: TextReading,
    last_box: BoxPx,
    confidence_sum: f64,
    count: u32,
}

/// Builds [`TextReading`]s from OCR lines on analyzed frames: the same text with an
/// overlapping box (IoU > 0) on consecutive analyzed frames is one reading.
#[derive(Debug, Clone)]
pub struct TextAggregator {
    gap_secs: f64,
    frames: u64,
    last_time_secs: f64,
    open: Vec<OpenReading>,
    closed: Vec<TextReading>,
}

impl Default for TextAggregator {
    fn default() -> Self {
        Self::new(GAP_SECS_DEFAULT)
    }
}

impl TextAggregator {
    /// An empty aggregator; `gap_secs` (≥ 0) as in the module docs.
    pub fn new(gap_secs: f64) -> Self {
        Self {
            gap_secs: gap_secs.max(0.0),
            frames: 0,
            last_time_secs: f64::NEG_INFINITY,
            open: Vec::new(),
            closed: Vec::new(),
        }
    }

    /// Adds one analyzed frame at `time_secs` (non-decreasing) with its OCR lines.
    pub fn push(&mut self, time_secs: f64, lines: &[OcrLine]) {
        let t = if time_secs.is_finite() { time_secs.max(self.last_time_secs) } else { self.last_time_secs };
        if !t.is_finite() {
            return;
        }
        self.last_time_secs = t;
        self.frames += 1;
        let gap = self.gap_secs;
        let mut i = 0;
        while i < self.open.len() {
            if t - self.open[i].reading.end_secs > gap {
                let r = self.open.swap_remove(i);
                self.closed.push(finish_reading(r));
            } else {
                i += 1;
            }
        }
        let mut extended = vec![false; self.open.len()];
        for line in lines {
            let hit = self.open.iter().enumerate().position(|(k, o)| {
                !extended.get(k).copied().unwrap_or(true)
                    && o.reading.text == line.text
                    && super::iou(&o.last_box, &line.box_px) > 0.0
            });
            match hit {
                Some(k) => {
                    let o = &mut self.open[k];
                    o.reading.end_secs = t;
                    o.last_box = line.box_px;
                    o.confidence_sum += f64::from(line.confidence);
                    o.count += 1;
                    extended[k] = true;
                }
                None => self.open.push(OpenReading {
                    reading: TextReading {
                        text: line.text.clone(),
                        start_secs: t,
                        end_secs: t,
                        box_px: line.box_px,
                        confidence: line.confidence,
                    },
                    last_box: line.box_px,
                    confidence_sum: f64::from(line.confidence),
                    count: 1,
                }),
            }
        }
    }

    /// Frames pushed so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Closes every reading; returns them ordered by start time, then text.
    pub fn finish(mut self) -> Vec<TextReading> {
        let open = std::mem::take(&mut self.open);
        self.closed.extend(open.into_iter().map(finish_reading));
        self.closed.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs).then_with(|| a.text.cmp(&b.text)));
        self.closed
    }
}

fn finish_reading(o: OpenReading) -> TextReading {
    TextReading { confidence: (o.confidence_sum / f64::from(o.count.max(1))) as f32, ..o.reading }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(label: &'static str, score: f32) -> Detection {
        Detection { label, score, box_px: BoxPx { x: 1.0, y: 2.0, width: 3.0, height: 4.0 } }
    }

    #[test]
    fn a_label_missing_for_longer_than_the_gap_splits_its_range() {
        let mut agg = ModerationAggregator::new(1.0);
        agg.push(0.0, &[det("FACE_FEMALE", 0.5)]);
        agg.push(0.5, &[det("FACE_FEMALE", 0.9), det("FACE_FEMALE", 0.4), det("FEET_EXPOSED", 0.3)]);
        agg.push(1.0, &[]); // one missed sample: within the gap
        agg.push(1.5, &[det("FACE_FEMALE", 0.6)]);
        agg.push(2.0, &[]);
        agg.push(2.5, &[]);
        agg.push(3.0, &[det("FACE_FEMALE", 0.7)]); // 1.5 s after the last sighting: new range
        assert_eq!(agg.frames(), 7);
        let r = agg.finish();
        let summary: Vec<(&str, f64, f64, f32, f64, u32)> = r
            .iter()
            .map(|r| (r.label.as_str(), r.start_secs, r.end_secs, r.peak_score, r.peak_time_secs, r.frames))
            .collect();
        assert_eq!(
            summary,
            [
                ("FACE_FEMALE", 0.0, 1.5, 0.9, 0.5, 3),
                ("FEET_EXPOSED", 0.5, 0.5, 0.3, 0.5, 1),
                ("FACE_FEMALE", 3.0, 3.0, 0.7, 3.0, 1),
            ]
        );
    }

    fn line(text: &str, x: f32, confidence: f32) -> OcrLine {
        OcrLine {
            text: text.into(),
            confidence,
            box_px: BoxPx { x, y: 10.0, width: 100.0, height: 20.0 },
            quad_px: [[0.0; 2]; 4],
        }
    }

    #[test]
    fn identical_consecutive_readings_merge_and_moved_or_changed_text_does_not() {
        let mut agg = TextAggregator::new(1.0);
        agg.push(0.0, &[line("Scene 12", 0.0, 0.8), line("Take 3", 500.0, 0.9)]);
        agg.push(0.5, &[line("Scene 12", 5.0, 1.0), line("Take 4", 500.0, 0.9)]);
        agg.push(1.0, &[line("Scene 12", 800.0, 0.9)]); // same text elsewhere: a new reading
        let r = agg.finish();
        let summary: Vec<(&str, f64, f64, f32)> =
            r.iter().map(|r| (r.text.as_str(), r.start_secs, r.end_secs, r.confidence)).collect();
        assert_eq!(
            summary,
            [
                ("Scene 12", 0.0, 0.5, 0.9),
                ("Take 3", 0.0, 0.0, 0.9),
                ("Take 4", 0.5, 0.5, 0.9),
                ("Scene 12", 1.0, 1.0, 0.9)
            ]
        );
    }
}
