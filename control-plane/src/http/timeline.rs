//! The job page's findings of the `full` profile: the timeline and the tables of moderation
//! ranges, text readings, speech segments and model stamps.
//!
//! The timeline is an inline `<svg>` whose geometry (every `x`, `width` and `y`) is computed here,
//! so the template only loops and the strict Content-Security-Policy needs no inline style or
//! script: colours come from classes in `app.css`, tooltips are SVG `<title>` elements.
//!
//! Geometry, in viewBox units: the SVG is [`TIMELINE_W`] wide; lane labels sit right-aligned in a
//! gutter of [`GUTTER_W`] and the plot maps 0..duration seconds linearly onto the
//! [`PLOT_W`] units after it. Lanes, top to bottom: shots (alternating blocks with cut marks),
//! one per moderation label (alphabetical, at most [`MODERATION_LANES_MAX`]), speech, text, then
//! the time axis with at most [`TICKS_MAX`] + 1 `HH:MM:SS` ticks. A section absent from the digest
//! draws no lane.
//!
//! Bounds: marks closer together than [`MERGE_GAP_UNITS`] are merged into one mark whose tooltip
//! says how many it holds, and shots narrower than [`SHOT_BLOCK_W_MIN`] are grouped, so a lane
//! holds at most about one mark per viewBox unit however large the digest. Tables show at most
//! [`TABLE_ROWS_MAX`] rows and say how many were left out. All text from the digest (labels, text
//! read on screen, model names) is untrusted and reaches the page only through askama's HTML
//! escaping.

use std::collections::BTreeMap;

use gaffer_protocol::digest::{BoxPx, Digest, ModelStamp, ModerationAnalysis, SpeechAnalysis, TextAnalysis};

use super::view::timecode;

/// Width of the timeline's viewBox, units.
pub(crate) const TIMELINE_W: u32 = 1000;
/// Width of the lane-label gutter at the left, units.
pub(crate) const GUTTER_W: u32 = 200;
/// Free space right of the plot (room for the last tick label), units.
const RIGHT_MARGIN_W: u32 = 12;
/// Width of the plot (the media's full duration), units.
pub(crate) const PLOT_W: u32 = TIMELINE_W - GUTTER_W - RIGHT_MARGIN_W;
/// Height of one lane, units.
const LANE_H: u32 = 16;
/// Vertical space between lanes, units.
const LANE_GAP_H: u32 = 6;
/// Space above the first lane, units.
const TOP_H: u32 = 4;
/// Height of the time axis below the lanes, units.
const AXIS_H: u32 = 22;
/// Narrowest mark drawn (a range that starts and ends on the same sampled frame), units.
const MARK_W_MIN: f64 = 1.5;
/// Marks whose gap is smaller than this are drawn as one, units.
pub(crate) const MERGE_GAP_UNITS: f64 = 0.5;
/// Consecutive shots are grouped into one block until the block is at least this wide, units.
pub(crate) const SHOT_BLOCK_W_MIN: f64 = 1.0;
/// Most moderation lanes drawn (one per label); further labels appear in the table only.
pub(crate) const MODERATION_LANES_MAX: usize = 32;
/// Most ticks on the time axis, not counting the one at 0.
pub(crate) const TICKS_MAX: f64 = 8.0;
/// Longest lane label drawn, characters (the full label is in its tooltip).
const LANE_LABEL_CHARS_MAX: usize = 28;
/// Longest piece of on-screen text quoted in a tooltip, characters.
const TOOLTIP_TEXT_CHARS_MAX: usize = 80;
/// Most texts quoted in the tooltip of a merged text mark.
const TOOLTIP_TEXTS_MAX: usize = 3;
/// Most rows of each findings table.
pub(crate) const TABLE_ROWS_MAX: usize = 1000;
/// Hex digits of a model's SHA-256 shown (the full hash is in the tooltip).
const SHA256_SHORT_CHARS: usize = 12;
/// Tick steps tried, seconds, smallest first.
const TICK_STEPS_SECS: [f64; 18] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 10_800.0, 21_600.0,
    43_200.0, 86_400.0,
];

/// `HH:MM:SS` of a time in seconds (the timecode without milliseconds).
fn clock(secs: f64) -> String {
    let mut tc = timecode(secs);
    tc.truncate(tc.len() - 4);
    tc
}

/// The first `max` characters of `s`, with `…` when cut.
fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// A number of viewBox units as an SVG attribute value.
fn units(v: f64) -> String {
    format!("{v:.2}")
}

/// Maps presentation times onto the plot.
#[derive(Clone, Copy)]
struct Scale {
    duration_secs: f64,
}

impl Scale {
    /// x of `secs`, units; clamped to the plot, non-finite times at its left edge.
    fn x(self, secs: f64) -> f64 {
        let f = if secs.is_finite() { (secs / self.duration_secs).clamp(0.0, 1.0) } else { 0.0 };
        f64::from(GUTTER_W) + f * f64::from(PLOT_W)
    }
}

/// One block of a lane.
pub(crate) struct Mark {
    /// Left edge, units.
    pub x: String,
    /// Width, units.
    pub width: String,
    /// CSS class (`shot-a`, `mod-exposed`, `speech`, …).
    pub class: &'static str,
    /// Tooltip.
    pub title: String,
}

/// One lane of the timeline.
pub(crate) struct Lane {
    /// Label in the gutter (truncated).
    pub label: String,
    /// Tooltip of the label: full label and counts.
    pub summary: String,
    /// `shots`, `moderation`, `speech` or `text` (CSS class `lane-{kind}`).
    pub kind: &'static str,
    /// Top edge, units.
    pub y: u32,
    /// Baseline of the label, units.
    pub text_y: u32,
    /// The blocks.
    pub marks: Vec<Mark>,
    /// x of each cut mark, units (shots lane only).
    pub cuts: Vec<String>,
    /// Top and bottom of the cut marks, units.
    pub cut_y1: u32,
    /// See `cut_y1`.
    pub cut_y2: u32,
}

/// A tick of the time axis.
pub(crate) struct Tick {
    /// Position, units.
    pub x: String,
    /// `HH:MM:SS`.
    pub label: String,
    /// SVG `text-anchor`: `start` for the first tick, `end` near the right edge, else `middle`.
    pub anchor: &'static str,
}

/// The timeline SVG, ready to draw.
pub(crate) struct TimelineView {
    /// viewBox width, units.
    pub width: u32,
    /// viewBox height, units.
    pub height: u32,
    /// x of the lane labels' right edge, units.
    pub label_x: u32,
    /// Left edge and width of the plot, units.
    pub plot_x: u32,
    /// See `plot_x`.
    pub plot_w: u32,
    /// Lane height, units.
    pub lane_h: u32,
    /// The lanes, top to bottom.
    pub lanes: Vec<Lane>,
    /// y of the axis line; tick marks go below it, grid lines from `TOP_H` down to it.
    pub axis_y: u32,
    /// Bottom of the tick marks and baseline of the tick labels, units.
    pub tick_y2: u32,
    /// See `tick_y2`.
    pub tick_text_y: u32,
    /// Top of the grid lines, units.
    pub grid_y1: u32,
    /// The ticks.
    pub ticks: Vec<Tick>,
    /// Full width in time, `HH:MM:SS.mmm`.
    pub duration: String,
    /// Moderation labels without a lane (beyond [`MODERATION_LANES_MAX`]).
    pub labels_omitted: usize,
}

/// A time range to draw, with what its tooltip needs.
struct Span<'a> {
    start_secs: f64,
    end_secs: f64,
    peak_score: Option<f32>,
    text: Option<&'a str>,
}

/// Spans merged into one mark.
struct Group<'a> {
    x0: f64,
    x1: f64,
    start_secs: f64,
    end_secs: f64,
    count: usize,
    peak_score: Option<f32>,
    texts: Vec<&'a str>,
}

/// Marks of time ranges, sorted by start and merged where closer than [`MERGE_GAP_UNITS`];
/// `title` writes the tooltip of a group.
fn range_marks<'a>(
    scale: Scale,
    mut spans: Vec<Span<'a>>,
    class: &'static str,
    title: impl Fn(&Group<'a>) -> String,
) -> Vec<Mark> {
    spans.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs));
    let mut groups: Vec<Group<'a>> = Vec::new();
    for s in spans {
        let x0 = scale.x(s.start_secs);
        let x1 = scale.x(s.end_secs).max(x0 + MARK_W_MIN);
        match groups.last_mut() {
            Some(g) if x0 <= g.x1 + MERGE_GAP_UNITS => {
                g.x1 = g.x1.max(x1);
                g.end_secs = g.end_secs.max(s.end_secs);
                g.count += 1;
                g.peak_score = match (g.peak_score, s.peak_score) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                if let Some(t) = s.text {
                    if g.texts.len() < TOOLTIP_TEXTS_MAX {
                        g.texts.push(t);
                    }
                }
            }
            _ => groups.push(Group {
                x0,
                x1,
                start_secs: s.start_secs,
                end_secs: s.end_secs,
                count: 1,
                peak_score: s.peak_score,
                texts: s.text.into_iter().collect(),
            }),
        }
    }
    groups.iter().map(|g| Mark { x: units(g.x0), width: units(g.x1 - g.x0), class, title: title(g) }).collect()
}

/// `00:00:10.000–00:00:12.500` of a group.
fn span_tc(g: &Group<'_>) -> String {
    format!("{}–{}", timecode(g.start_secs), timecode(g.end_secs))
}

/// Colour class of a NudeNet label: exposed, covered, or anything else (faces, feet, …).
fn moderation_class(label: &str) -> &'static str {
    if label.contains("EXPOSED") {
        "mod-exposed"
    } else if label.contains("COVERED") {
        "mod-covered"
    } else {
        "mod-other"
    }
}

impl TimelineView {
    /// The timeline of a digest; `None` when neither the container nor any finding gives the
    /// media a positive duration.
    pub(crate) fn new(d: &Digest) -> Option<Self> {
        let duration_secs = media_duration_secs(d)?;
        let scale = Scale { duration_secs };
        let mut lanes = Vec::new();
        let mut next_y = TOP_H;
        let mut lane = |label: &str, summary: String, kind: &'static str, marks: Vec<Mark>, cuts: Vec<String>| {
            let y = next_y;
            next_y += LANE_H + LANE_GAP_H;
            lanes.push(Lane {
                label: truncate_chars(label, LANE_LABEL_CHARS_MAX),
                summary,
                kind,
                y,
                text_y: y + LANE_H - 4,
                marks,
                cuts,
                cut_y1: y.saturating_sub(2),
                cut_y2: y + LANE_H + 2,
            });
        };

        let (shot_marks, cuts) = shot_lane(scale, d);
        lane("shots", format!("{} shots, {} cuts", d.shots.shots.len(), d.shots.cuts.len()), "shots", shot_marks, cuts);

        let mut labels_omitted = 0;
        if let Some(m) = &d.moderation {
            let mut by_label: BTreeMap<&str, Vec<Span<'_>>> = BTreeMap::new();
            for r in &m.ranges {
                by_label.entry(r.label.as_str()).or_default().push(Span {
                    start_secs: r.start_secs,
                    end_secs: r.end_secs,
                    peak_score: Some(r.peak_score),
                    text: None,
                });
            }
            labels_omitted = by_label.len().saturating_sub(MODERATION_LANES_MAX);
            for (label, spans) in by_label.into_iter().take(MODERATION_LANES_MAX) {
                let summary = format!("{label}: {} ranges", spans.len());
                let marks = range_marks(scale, spans, moderation_class(label), |g| {
                    let peak = g.peak_score.map(|p| format!("{p:.2}")).unwrap_or_else(|| "–".into());
                    if g.count == 1 {
                        format!("{label} · {} · peak {peak}", span_tc(g))
                    } else {
                        format!("{label} · {} ranges · {} · peak {peak}", g.count, span_tc(g))
                    }
                });
                lane(label, summary, "moderation", marks, Vec::new());
            }
        }

        if let Some(s) = &d.speech {
            let spans = s
                .segments
                .iter()
                .map(|seg| Span { start_secs: seg.start_secs, end_secs: seg.end_secs, peak_score: None, text: None })
                .collect();
            let marks = range_marks(scale, spans, "speech", |g| {
                let secs = g.end_secs - g.start_secs;
                if g.count == 1 {
                    format!("Speech · {} ({secs:.1} s)", span_tc(g))
                } else {
                    format!("Speech · {} segments · {}", g.count, span_tc(g))
                }
            });
            lane("speech", format!("{} speech segments", s.segments.len()), "speech", marks, Vec::new());
        }

        if let Some(t) = &d.text {
            let spans = t
                .readings
                .iter()
                .map(|r| Span {
                    start_secs: r.start_secs,
                    end_secs: r.end_secs,
                    peak_score: Some(r.confidence),
                    text: Some(r.text.as_str()),
                })
                .collect();
            let marks = range_marks(scale, spans, "text", |g| {
                let quoted: Vec<String> =
                    g.texts.iter().map(|t| format!("“{}”", truncate_chars(t, TOOLTIP_TEXT_CHARS_MAX))).collect();
                let more = if g.count > g.texts.len() { ", …" } else { "" };
                if g.count == 1 {
                    let conf = g.peak_score.map(|c| format!("{c:.2}")).unwrap_or_else(|| "–".into());
                    format!("{} · {} · confidence {conf}", quoted.join(", "), span_tc(g))
                } else {
                    format!("{} readings · {} · {}{more}", g.count, span_tc(g), quoted.join(", "))
                }
            });
            lane("text", format!("{} text readings", t.readings.len()), "text", marks, Vec::new());
        }

        let axis_y = next_y;
        let ticks = tick_secs(duration_secs)
            .into_iter()
            .enumerate()
            .map(|(i, secs)| {
                let x = scale.x(secs);
                let anchor = if i == 0 {
                    "start"
                } else if x > f64::from(GUTTER_W + PLOT_W) - 30.0 {
                    "end"
                } else {
                    "middle"
                };
                Tick { x: units(x), label: clock(secs), anchor }
            })
            .collect();
        Some(TimelineView {
            width: TIMELINE_W,
            height: axis_y + AXIS_H,
            label_x: GUTTER_W - 8,
            plot_x: GUTTER_W,
            plot_w: PLOT_W,
            lane_h: LANE_H,
            lanes,
            axis_y,
            tick_y2: axis_y + 4,
            tick_text_y: axis_y + 16,
            grid_y1: TOP_H,
            ticks,
            duration: timecode(duration_secs),
            labels_omitted,
        })
    }
}

/// The media's duration, seconds: the container's when known and positive, else the latest end of
/// any shot, range, segment or reading; `None` when that is not positive either.
fn media_duration_secs(d: &Digest) -> Option<f64> {
    if let Some(secs) = d.technical.duration_secs.filter(|s| s.is_finite() && *s > 0.0) {
        return Some(secs);
    }
    let ends = d
        .shots
        .shots
        .iter()
        .map(|s| s.end_secs)
        .chain(d.moderation.iter().flat_map(|m| m.ranges.iter().map(|r| r.end_secs)))
        .chain(d.speech.iter().flat_map(|s| s.segments.iter().map(|g| g.end_secs)))
        .chain(d.text.iter().flat_map(|t| t.readings.iter().map(|r| r.end_secs)));
    let max = ends.filter(|e| e.is_finite()).fold(0.0_f64, f64::max);
    (max > 0.0).then_some(max)
}

/// The shots lane: alternating blocks (`shot-a`, `shot-b`), consecutive shots grouped until a
/// block is [`SHOT_BLOCK_W_MIN`] wide, and the x of each cut, dropping cuts within
/// [`SHOT_BLOCK_W_MIN`] of the previous one drawn.
fn shot_lane(scale: Scale, d: &Digest) -> (Vec<Mark>, Vec<String>) {
    let shots = &d.shots.shots;
    let mut marks = Vec::new();
    let mut i = 0;
    while i < shots.len() {
        let first = &shots[i];
        let x0 = scale.x(first.start_secs);
        let mut j = i;
        while j + 1 < shots.len() && scale.x(shots[j].end_secs) - x0 < SHOT_BLOCK_W_MIN {
            j += 1;
        }
        let last = &shots[j];
        let x1 = scale.x(last.end_secs).max(x0 + MARK_W_MIN.min(SHOT_BLOCK_W_MIN));
        let title = if i == j {
            format!("Shot {} · {}–{}", first.index, timecode(first.start_secs), timecode(first.end_secs))
        } else {
            format!("Shots {}–{} · {}–{}", first.index, last.index, timecode(first.start_secs), timecode(last.end_secs))
        };
        let class = if marks.len() % 2 == 0 { "shot-a" } else { "shot-b" };
        marks.push(Mark { x: units(x0), width: units(x1 - x0), class, title });
        i = j + 1;
    }
    let mut cuts = Vec::new();
    let mut last_x = f64::NEG_INFINITY;
    for c in &d.shots.cuts {
        let x = scale.x(c.time_secs);
        if x - last_x >= SHOT_BLOCK_W_MIN {
            cuts.push(units(x));
            last_x = x;
        }
    }
    (marks, cuts)
}

/// Tick times, seconds: multiples of the smallest step in [`TICK_STEPS_SECS`] giving at most
/// [`TICKS_MAX`] steps over `duration_secs` (whole days beyond that), from 0 to the duration.
fn tick_secs(duration_secs: f64) -> Vec<f64> {
    let step = TICK_STEPS_SECS
        .iter()
        .copied()
        .find(|s| duration_secs / s <= TICKS_MAX)
        .unwrap_or_else(|| (duration_secs / TICKS_MAX / 86_400.0).ceil() * 86_400.0);
    let count = (duration_secs / step + 1e-9).floor() as usize;
    (0..=count).map(|k| k as f64 * step).collect()
}

/// A model stamp, ready to show.
pub(crate) struct StampRow {
    /// What the model does in its section (`detector`, `recognizer`, …).
    pub role: &'static str,
    /// Registry name.
    pub name: String,
    /// Package version.
    pub version: String,
    /// First [`SHA256_SHORT_CHARS`] hex digits of the model file's SHA-256.
    pub sha256_short: String,
    /// The full SHA-256.
    pub sha256: String,
}

impl StampRow {
    fn new(role: &'static str, m: &ModelStamp) -> Self {
        StampRow {
            role,
            name: m.name.clone(),
            version: m.version.clone(),
            sha256_short: m.sha256.chars().take(SHA256_SHORT_CHARS).collect(),
            sha256: m.sha256.clone(),
        }
    }
}

/// `x 12, y 30, 64×80 px` of a box (rounded to whole pixels).
fn box_text(b: &BoxPx) -> String {
    format!("x {:.0}, y {:.0}, {:.0}×{:.0} px", b.x, b.y, b.width, b.height)
}

/// One row of the moderation table.
pub(crate) struct ModerationRow {
    pub label: String,
    pub class: &'static str,
    pub start_tc: String,
    pub end_tc: String,
    pub peak_score: String,
    pub peak_tc: String,
    pub box_px: String,
    pub frames: u32,
}

/// The moderation section, ready to show.
pub(crate) struct ModerationView {
    pub stamps: Vec<StampRow>,
    pub sample_fps: String,
    pub score_threshold: String,
    pub frames_analyzed: u64,
    pub label_count: usize,
    pub range_count: usize,
    /// Ranges ordered by start, at most [`TABLE_ROWS_MAX`].
    pub rows: Vec<ModerationRow>,
    pub rows_omitted: usize,
}

impl ModerationView {
    pub(crate) fn new(m: &ModerationAnalysis) -> Self {
        let mut ranges: Vec<_> = m.ranges.iter().collect();
        ranges.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs).then_with(|| a.label.cmp(&b.label)));
        let label_count = ranges.iter().map(|r| r.label.as_str()).collect::<std::collections::BTreeSet<_>>().len();
        ModerationView {
            stamps: vec![StampRow::new("detector", &m.model)],
            sample_fps: format!("{:.2}", m.sample_fps),
            score_threshold: format!("{:.2}", m.score_threshold),
            frames_analyzed: m.frames_analyzed,
            label_count,
            range_count: ranges.len(),
            rows_omitted: ranges.len().saturating_sub(TABLE_ROWS_MAX),
            rows: ranges
                .into_iter()
                .take(TABLE_ROWS_MAX)
                .map(|r| ModerationRow {
                    label: r.label.clone(),
                    class: moderation_class(&r.label),
                    start_tc: timecode(r.start_secs),
                    end_tc: timecode(r.end_secs),
                    peak_score: format!("{:.2}", r.peak_score),
                    peak_tc: timecode(r.peak_time_secs),
                    box_px: box_text(&r.peak_box),
                    frames: r.frames,
                })
                .collect(),
        }
    }
}

/// One row of the text table.
pub(crate) struct TextRow {
    pub text: String,
    pub start_tc: String,
    pub end_tc: String,
    pub confidence: String,
    pub box_px: String,
}

/// The on-screen text section, ready to show.
pub(crate) struct TextView {
    pub stamps: Vec<StampRow>,
    pub frames_analyzed: u64,
    pub reading_count: usize,
    /// Readings ordered by start, at most [`TABLE_ROWS_MAX`].
    pub rows: Vec<TextRow>,
    pub rows_omitted: usize,
}

impl TextView {
    pub(crate) fn new(t: &TextAnalysis) -> Self {
        let mut stamps = vec![StampRow::new("detector", &t.detector), StampRow::new("recognizer", &t.recognizer)];
        if let Some(c) = &t.classifier {
            stamps.push(StampRow::new("orientation classifier", c));
        }
        let mut readings: Vec<_> = t.readings.iter().collect();
        readings.sort_by(|a, b| a.start_secs.total_cmp(&b.start_secs));
        TextView {
            stamps,
            frames_analyzed: t.frames_analyzed,
            reading_count: readings.len(),
            rows_omitted: readings.len().saturating_sub(TABLE_ROWS_MAX),
            rows: readings
                .into_iter()
                .take(TABLE_ROWS_MAX)
                .map(|r| TextRow {
                    text: r.text.clone(),
                    start_tc: timecode(r.start_secs),
                    end_tc: timecode(r.end_secs),
                    confidence: format!("{:.2}", r.confidence),
                    box_px: box_text(&r.box_px),
                })
                .collect(),
        }
    }
}

/// One speech segment.
pub(crate) struct SpeechRow {
    pub start_tc: String,
    pub end_tc: String,
    pub duration: String,
}

/// The speech section, ready to show.
pub(crate) struct SpeechView {
    pub stamps: Vec<StampRow>,
    pub audio_stream: u32,
    pub audio: String,
    pub segment_count: usize,
    /// Speech fraction as a percentage with one decimal, `"37.5%"` (`"–"` when not a number).
    pub speech_percent: String,
    /// Segments in order, at most [`TABLE_ROWS_MAX`].
    pub rows: Vec<SpeechRow>,
    pub rows_omitted: usize,
}

impl SpeechView {
    pub(crate) fn new(s: &SpeechAnalysis) -> Self {
        let speech_percent = if s.speech_fraction.is_finite() {
            format!("{:.1}%", (s.speech_fraction * 100.0).clamp(0.0, 100.0))
        } else {
            "–".into()
        };
        SpeechView {
            stamps: vec![StampRow::new("voice activity detector", &s.model)],
            audio_stream: s.audio_stream,
            audio: timecode(s.audio_secs),
            segment_count: s.segments.len(),
            speech_percent,
            rows_omitted: s.segments.len().saturating_sub(TABLE_ROWS_MAX),
            rows: s
                .segments
                .iter()
                .take(TABLE_ROWS_MAX)
                .map(|g| SpeechRow {
                    start_tc: timecode(g.start_secs),
                    end_tc: timecode(g.end_secs),
                    duration: format!("{:.1} s", (g.end_secs - g.start_secs).max(0.0)),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_spans(spans: &[(f64, f64)], duration_secs: f64) -> Vec<Mark> {
        let spans = spans.iter().map(|&(s, e)| Span { start_secs: s, end_secs: e, peak_score: None, text: None });
        range_marks(Scale { duration_secs }, spans.collect(), "speech", |g| format!("{}", g.count))
    }

    #[test]
    fn times_map_linearly_onto_the_plot() {
        let s = Scale { duration_secs: 200.0 };
        assert_eq!(s.x(0.0), f64::from(GUTTER_W));
        assert_eq!(s.x(100.0), f64::from(GUTTER_W) + f64::from(PLOT_W) / 2.0);
        assert_eq!(s.x(200.0), f64::from(GUTTER_W + PLOT_W));
        assert_eq!(s.x(500.0), f64::from(GUTTER_W + PLOT_W), "clamped to the plot");
        assert_eq!(s.x(f64::NAN), f64::from(GUTTER_W));
    }

    #[test]
    fn close_ranges_merge_and_instants_stay_visible() {
        // 1000 s over 788 units: 1 unit ≈ 1.27 s.
        let marks = group_spans(&[(10.0, 20.0), (20.2, 30.0), (100.0, 100.0), (500.0, 600.0)], 1000.0);
        assert_eq!(marks.len(), 3);
        assert_eq!(marks[0].title, "2", "10–20 s and 20.2–30 s are 0.16 units apart: one mark");
        assert_eq!(marks[1].width, units(MARK_W_MIN), "an instant gets the minimum width");
        assert_eq!(marks[2].x, units(f64::from(GUTTER_W) + 0.5 * f64::from(PLOT_W)));
    }

    #[test]
    fn many_ranges_stay_bounded_by_the_plot_width() {
        let spans: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64 * 0.1, i as f64 * 0.1 + 0.05)).collect();
        let marks = group_spans(&spans, 10_000.0);
        assert!(marks.len() <= PLOT_W as usize, "{} marks", marks.len());
    }

    #[test]
    fn ticks_use_round_steps() {
        assert_eq!(tick_secs(5.3), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(tick_secs(212.04), vec![0.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0]);
        assert_eq!(tick_secs(7200.0).len(), 9, "900 s steps over two hours, both ends included");
        assert!(tick_secs(30.0 * 86_400.0).len() <= TICKS_MAX as usize + 1);
        assert_eq!(clock(3725.5), "01:02:05");
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate_chars("Schöne Grüße", 4), "Schö…");
        assert_eq!(truncate_chars("short", 80), "short");
    }
}
