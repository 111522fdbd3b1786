//! Silero VAD v6 over 16 kHz mono samples, and the reference post-processing that turns its
//! per-window speech probabilities into speech segments.

use ort::memory::Allocator;
use ort::session::{IoBinding, Session};
use ort::value::Tensor;

use super::SpeechError;
use crate::models::{Registry, Runtime, SessionTuning};

/// Sample rate the model runs at, Hz (`silero_vad.onnx` accepts 8000 or 16000; we use 16000).
pub const SAMPLE_RATE_HZ: u32 = 16_000;
/// Samples per model window at 16 kHz (`OnnxWrapper.__call__`: `num_samples = 512`), 32 ms.
pub const WINDOW_SAMPLES: usize = 512;
/// Samples of the previous window prepended to each window (`OnnxWrapper.__call__`:
/// `context_size = 64` at 16 kHz); the model's input is `[1, 64 + 512]`.
pub const CONTEXT_SAMPLES: usize = 64;
/// Size of the recurrent state, `[2, 1, 128]` (`OnnxWrapper.reset_states`).
const STATE_LEN: usize = 2 * 128;

/// Parameters of the post-processing, defaults exactly those of `get_speech_timestamps` in
/// `silero_vad/utils_vad.py` (silero-vad 6.2.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadParams {
    /// A window with probability ≥ this starts (or continues) speech. Default 0.5
    /// (`threshold=0.5`).
    pub threshold: f64,
    /// While in speech, a window with probability < this counts as silence. Default
    /// `max(threshold - 0.15, 0.01)` (`neg_threshold=None` → that formula).
    pub neg_threshold: f64,
    /// Speech shorter than this is dropped, ms. Default 250 (`min_speech_duration_ms=250`).
    pub min_speech_duration_ms: u32,
    /// Silence must last this long to end a segment, ms. Default 100
    /// (`min_silence_duration_ms=100`).
    pub min_silence_duration_ms: u32,
    /// Segments are padded by this much on each side (halving the gap when two segments are
    /// closer than twice this), ms. Default 30 (`speech_pad_ms=30`).
    pub speech_pad_ms: u32,
}

impl Default for VadParams {
    fn default() -> Self {
        let threshold = 0.5;
        Self {
            threshold,
            neg_threshold: f64::max(threshold - 0.15, 0.01),
            min_speech_duration_ms: 250,
            min_silence_duration_ms: 100,
            speech_pad_ms: 30,
        }
    }
}

/// Speech segments in samples at [`SAMPLE_RATE_HZ`], as the reference returns them with
/// `return_seconds=False`: `(start, end)`, end exclusive, ordered, non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VadResult {
    /// Speech segments, samples.
    pub segments_samples: Vec<(u64, u64)>,
    /// Samples analyzed (the length of the audio).
    pub audio_samples: u64,
    /// Model windows run.
    pub windows: u64,
}

impl VadResult {
    /// Segments in seconds.
    pub fn segments_secs(&self) -> Vec<(f64, f64)> {
        let sr = f64::from(SAMPLE_RATE_HZ);
        self.segments_samples.iter().map(|&(s, e)| (s as f64 / sr, e as f64 / sr)).collect()
    }

    /// Audio analyzed, seconds.
    pub fn audio_secs(&self) -> f64 {
        self.audio_samples as f64 / f64::from(SAMPLE_RATE_HZ)
    }

    /// Share of the audio inside speech segments, 0..1 (0 for empty audio).
    pub fn speech_fraction(&self) -> f64 {
        if self.audio_samples == 0 {
            return 0.0;
        }
        let speech: u64 = self.segments_samples.iter().map(|&(s, e)| e.saturating_sub(s)).sum();
        (speech as f64 / self.audio_samples as f64).clamp(0.0, 1.0)
    }
}

/// The `get_speech_timestamps_from_probs` state machine (max_speech_duration_s = inf, so the
/// max-speech splitting branch never runs), fed one probability at a time so a long film
/// needs no list of probabilities. Raw segments are kept (a few per minute of speech) until
/// [`SpeechTimestamps::finish`] pads them.
#[derive(Debug, Clone)]
pub struct SpeechTimestamps {
    params: VadParams,
    min_speech_samples: f64,
    min_silence_samples: f64,
    speech_pad_samples: f64,
    window_index: u64,
    triggered: bool,
    start: u64,
    temp_end: u64,
    speeches: Vec<(u64, u64)>,
}

impl SpeechTimestamps {
    /// A fresh state machine.
    pub fn new(params: VadParams) -> Self {
        let sr = f64::from(SAMPLE_RATE_HZ);
        Self {
            params,
            min_speech_samples: sr * f64::from(params.min_speech_duration_ms) / 1000.0,
            min_silence_samples: sr * f64::from(params.min_silence_duration_ms) / 1000.0,
            speech_pad_samples: sr * f64::from(params.speech_pad_ms) / 1000.0,
            window_index: 0,
            triggered: false,
            start: 0,
            temp_end: 0,
            speeches: Vec::new(),
        }
    }

    /// Feeds the probability of the next window.
    pub fn push(&mut self, speech_prob: f32) {
        let p = f64::from(speech_prob);
        let cur_sample = self.window_index * WINDOW_SAMPLES as u64;
        self.window_index += 1;
        if p >= self.params.threshold && self.temp_end != 0 {
            self.temp_end = 0;
        }
        if p >= self.params.threshold && !self.triggered {
            self.triggered = true;
            self.start = cur_sample;
            return;
        }
        if p < self.params.neg_threshold && self.triggered {
            if self.temp_end == 0 {
                self.temp_end = cur_sample;
            }
            let silence = (cur_sample - self.temp_end) as f64;
            if silence < self.min_silence_samples {
                return;
            }
            let end = self.temp_end;
            if (end - self.start) as f64 > self.min_speech_samples {
                self.speeches.push((self.start, end));
            }
            self.temp_end = 0;
            self.triggered = false;
        }
    }

    /// Ends the audio at `audio_length_samples` and applies the padding; returns the segments.
    pub fn finish(mut self, audio_length_samples: u64) -> Vec<(u64, u64)> {
        if self.triggered && (audio_length_samples.saturating_sub(self.start)) as f64 > self.min_speech_samples {
            self.speeches.push((self.start, audio_length_samples));
        }
        let pad = self.speech_pad_samples;
        let n = self.speeches.len();
        // Same arithmetic as the reference: floats, then int() (truncation toward zero).
        let mut s: Vec<(f64, f64)> = self.speeches.iter().map(|&(a, b)| (a as f64, b as f64)).collect();
        let len = audio_length_samples as f64;
        for i in 0..n {
            if i == 0 {
                s[i].0 = f64::max(0.0, s[i].0 - pad).trunc();
            }
            if i != n - 1 {
                let silence = s[i + 1].0 - s[i].1;
                if silence < 2.0 * pad {
                    s[i].1 += (silence / 2.0).floor();
                    s[i + 1].0 = f64::max(0.0, s[i + 1].0 - (silence / 2.0).floor()).trunc();
                } else {
                    s[i].1 = f64::min(len, s[i].1 + pad).trunc();
                    s[i + 1].0 = f64::max(0.0, s[i + 1].0 - pad).trunc();
                }
            } else {
                s[i].1 = f64::min(len, s[i].1 + pad).trunc();
            }
        }
        s.into_iter().map(|(a, b)| (a as u64, b as u64)).collect()
    }
}

/// Silero VAD v6 (`silero_vad.onnx`, opset 16) over 16 kHz mono `f32` samples in −1..1.
///
/// Pre-processing as `OnnxWrapper.__call__` in `silero_vad/utils_vad.py`: windows of
/// [`WINDOW_SAMPLES`] samples, each prefixed with the last [`CONTEXT_SAMPLES`] samples of the
/// previous window (zeros for the first), run with inputs `input` `[1, 576]` f32, `state`
/// `[2, 1, 128]` f32 (zeros at the start, then the previous `stateN`) and `sr` (scalar i64
/// 16000); output `output` `[1, 1]` is the window's speech probability. As in
/// `get_speech_timestamps`, a final partial window is zero-padded to 512 samples.
///
/// Feed samples with [`SileroVad::push_samples`] in any chunk sizes (e.g. straight from a
/// resampler), then [`SileroVad::finish`]. All tensors are allocated once and bound to the
/// session with an [`IoBinding`]: each window is written into the bound `input` in place, the
/// model writes `output` and `stateN` into preallocated tensors, and `stateN` is copied into the
/// bound `state`, so a window costs no allocation and no name lookup.
pub struct SileroVad {
    session: Session,
    binding: IoBinding,
    /// Bound to `input`, `[1, 576]`.
    input: Tensor<f32>,
    /// Bound to `state`, `[2, 1, 128]`.
    state: Tensor<f32>,
    /// Bound to the `output` output, `[1, 1]`.
    prob: Tensor<f32>,
    /// Bound to the `stateN` output, `[2, 1, 128]`.
    next_state: Tensor<f32>,
    /// Samples of the window being filled, `input[CONTEXT_SAMPLES + filled]`.
    filled: usize,
    samples: u64,
    windows: u64,
    timestamps: SpeechTimestamps,
}

impl std::fmt::Debug for SileroVad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroVad").field("samples", &self.samples).field("windows", &self.windows).finish()
    }
}

impl SileroVad {
    /// Opens the installed `silero-vad` model on `runtime` with default [`VadParams`].
    ///
    /// # Errors
    /// [`SpeechError::Models`] when the model is not installed or the session fails,
    /// [`SpeechError::BadModel`] when its inputs are not Silero VAD v5/v6's.
    pub fn new(runtime: &Runtime, registry: &Registry) -> Result<Self, SpeechError> {
        Self::from_session(runtime.session_with(registry, MODEL_NAME, &Self::TUNING)?, VadParams::default())
    }

    /// Session settings: one intra-op thread. The model runs one 32 ms window at a time, far too
    /// small to split; a second thread only spins and competes with decoding and the other
    /// analyzers (measured: steadier and faster under load, `agent/benches/speech.rs`).
    pub const TUNING: SessionTuning = SessionTuning {
        intra_threads: Some(1),
        inter_threads: None,
        optimization_level: None,
        cpu_mem_arena: None,
        memory_pattern: None,
        intra_op_spinning: None,
    };

    /// Wraps an existing session of `silero_vad.onnx`.
    ///
    /// # Errors
    /// [`SpeechError::BadModel`] when the session's inputs are not `input`, `state`, `sr` or
    /// its outputs not `output`, `stateN`; [`SpeechError::Inference`] if tensors cannot be made.
    pub fn from_session(session: Session, params: VadParams) -> Result<Self, SpeechError> {
        let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if inputs != ["input", "state", "sr"] || outputs != ["output", "stateN"] {
            return Err(SpeechError::BadModel {
                detail: format!(
                    "inputs {inputs:?}, outputs {outputs:?}; expected [input, state, sr] → [output, stateN]"
                ),
            });
        }
        let tensor_err = |e: ort::Error| SpeechError::Inference { detail: e.to_string() };
        let input = Tensor::from_array((
            [1usize, CONTEXT_SAMPLES + WINDOW_SAMPLES],
            vec![0f32; CONTEXT_SAMPLES + WINDOW_SAMPLES],
        ))
        .map_err(tensor_err)?;
        let state = Tensor::from_array(([2usize, 1, 128], vec![0f32; STATE_LEN])).map_err(tensor_err)?;
        let sr = Tensor::from_array(((), vec![i64::from(SAMPLE_RATE_HZ)])).map_err(tensor_err)?;
        // Outputs must be allocated by ONNX Runtime (`IoBinding::bind_output` rejects Rust-backed
        // tensors); they are uninitialized until the first run, which writes every value.
        let allocator = Allocator::default();
        let mut prob = Tensor::<f32>::new(&allocator, [1usize, 1]).map_err(tensor_err)?;
        let mut next_state = Tensor::<f32>::new(&allocator, [2usize, 1, 128]).map_err(tensor_err)?;
        // On the CPU, binding an owned tensor shares its buffer with the session (no copy), so
        // writing `input` and `state` in place is what the next run sees.
        let mut binding = session.create_binding().map_err(tensor_err)?;
        binding.bind_input("input", &input).map_err(tensor_err)?;
        binding.bind_input("state", &state).map_err(tensor_err)?;
        binding.bind_input("sr", &sr).map_err(tensor_err)?;
        binding.bind_output("output", &mut prob).map_err(tensor_err)?;
        binding.bind_output("stateN", &mut next_state).map_err(tensor_err)?;
        Ok(Self {
            session,
            binding,
            input,
            state,
            prob,
            next_state,
            filled: 0,
            samples: 0,
            windows: 0,
            timestamps: SpeechTimestamps::new(params),
        })
    }

    /// Feeds 16 kHz mono samples; runs the model on every completed window.
    ///
    /// # Errors
    /// [`SpeechError::Inference`] when ONNX Runtime fails.
    pub fn push_samples(&mut self, mut samples: &[f32]) -> Result<(), SpeechError> {
        while !samples.is_empty() {
            let take = (WINDOW_SAMPLES - self.filled).min(samples.len());
            {
                let (_, data) = self.input.try_extract_tensor_mut::<f32>().map_err(inference)?;
                let at = CONTEXT_SAMPLES + self.filled;
                data[at..at + take].copy_from_slice(&samples[..take]);
            }
            self.filled += take;
            self.samples += take as u64;
            samples = &samples[take..];
            if self.filled == WINDOW_SAMPLES {
                let p = self.run_window()?;
                self.timestamps.push(p);
            }
        }
        Ok(())
    }

    /// Zero-pads and runs the last partial window, then returns the speech segments.
    ///
    /// # Errors
    /// [`SpeechError::Inference`] when ONNX Runtime fails.
    pub fn finish(self) -> Result<VadResult, SpeechError> {
        self.finish_keeping_session().map(|(result, _session)| result)
    }

    /// Like [`SileroVad::finish`], and hands the ONNX Runtime session back, so the caller can
    /// reuse it for the next stream ([`SileroVad::from_session`]) or choose when to pay for
    /// dropping it (a few milliseconds).
    ///
    /// # Errors
    /// As [`SileroVad::finish`].
    pub fn finish_keeping_session(mut self) -> Result<(VadResult, Session), SpeechError> {
        if self.filled > 0 {
            {
                let (_, data) = self.input.try_extract_tensor_mut::<f32>().map_err(inference)?;
                data[CONTEXT_SAMPLES + self.filled..].fill(0.0);
            }
            self.filled = WINDOW_SAMPLES;
            let p = self.run_window()?;
            self.timestamps.push(p);
        }
        let segments_samples = self.timestamps.finish(self.samples);
        Ok((VadResult { segments_samples, audio_samples: self.samples, windows: self.windows }, self.session))
    }

    /// Samples fed so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Runs the model on the full window in `input`, carries `stateN` into `state` and the
    /// window's last 64 samples into the context; returns the speech probability.
    fn run_window(&mut self) -> Result<f32, SpeechError> {
        // The outputs land in `prob` and `next_state`; the returned `SessionOutputs` only
        // re-wrap those buffers, so drop it unread.
        drop(self.session.run_binding(&self.binding).map_err(inference)?);
        let (_, prob) = self.prob.try_extract_tensor::<f32>().map_err(inference)?;
        let prob = *prob.first().ok_or_else(|| SpeechError::Inference { detail: "empty output".into() })?;
        let (_, next_state) = self.next_state.try_extract_tensor::<f32>().map_err(inference)?;
        let (_, state) = self.state.try_extract_tensor_mut::<f32>().map_err(inference)?;
        state.copy_from_slice(next_state);
        let (_, data) = self.input.try_extract_tensor_mut::<f32>().map_err(inference)?;
        data.copy_within(WINDOW_SAMPLES.., 0);
        self.filled = 0;
        self.windows += 1;
        if self.windows.is_multiple_of(31_250) {
            tracing::debug!(windows = self.windows, "silero vad progress");
        }
        Ok(prob)
    }
}

/// Registry name of the model.
pub const MODEL_NAME: &str = "silero-vad";

fn inference(e: ort::Error) -> SpeechError {
    SpeechError::Inference { detail: e.to_string() }
}
