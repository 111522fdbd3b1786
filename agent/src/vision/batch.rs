//! Batching frames for inference within a memory budget, and halving the batch on GPU
//! out-of-memory errors instead of failing the job.

use std::ops::Range;

/// Default memory budget for one batch's input tensor, bytes (256 MiB). With NudeNet's
/// 3×320×320 `f32` input (1.2 MB per frame) the frame cap binds first.
pub const BATCH_MEMORY_BUDGET_BYTES_DEFAULT: usize = 256 << 20;

/// How many frames go into one inference run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most frames per run. Default 8 (on 2 CPU cores larger batches do not run faster; on a
    /// GPU it amortizes launches).
    pub batch_frames_max: usize,
    /// Most bytes of input tensor per run. Default [`BATCH_MEMORY_BUDGET_BYTES_DEFAULT`].
    pub memory_budget_bytes: usize,
    /// Halve the batch and retry when ONNX Runtime reports an out-of-memory error (set when
    /// the CUDA execution provider is in use). Default false.
    pub halve_on_oom: bool,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { batch_frames_max: 8, memory_budget_bytes: BATCH_MEMORY_BUDGET_BYTES_DEFAULT, halve_on_oom: false }
    }
}

impl BatchPolicy {
    /// Frames per run for inputs of `frame_bytes` each: `batch_frames_max` capped by the budget,
    /// at least 1.
    pub fn frames_per_run(&self, frame_bytes: usize) -> usize {
        let by_budget = self.memory_budget_bytes / frame_bytes.max(1);
        by_budget.min(self.batch_frames_max).max(1)
    }
}

/// Why one inference run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The device ran out of memory; a smaller batch may fit.
    OutOfMemory(String),
    /// Anything else.
    Other(String),
}

impl RunError {
    /// Classifies an ONNX Runtime error message: CUDA/BFC-arena allocation failures are
    /// [`RunError::OutOfMemory`].
    pub fn from_message(message: String) -> Self {
        if is_out_of_memory(&message) {
            RunError::OutOfMemory(message)
        } else {
            RunError::Other(message)
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        match self {
            RunError::OutOfMemory(m) | RunError::Other(m) => m,
        }
    }
}

/// True for ONNX Runtime's out-of-memory messages ("Failed to allocate memory", CUDA
/// `cudaErrorMemoryAllocation` / "out of memory", BFC arena exhaustion).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("failed to allocate")
        || m.contains("cudaerrormemoryallocation")
        || m.contains("bfcarena")
        || m.contains("cublas_status_alloc_failed")
        || m.contains("cudnn_status_alloc_failed")
}

/// Runs `run` over `0..items` in consecutive chunks of at most `*batch` items. When a chunk
/// fails with [`RunError::OutOfMemory`] and `halve_on_oom` is set, `*batch` is halved (and stays
/// halved for later calls) and the same chunk is retried; an out-of-memory error at batch 1, or
/// any other error, is returned.
///
/// # Errors
/// The failing run's [`RunError`].
pub fn run_chunks(
    items: usize,
    batch: &mut usize,
    halve_on_oom: bool,
    mut run: impl FnMut(Range<usize>) -> Result<(), RunError>,
) -> Result<(), RunError> {
    *batch = (*batch).max(1);
    let mut start = 0;
    while start < items {
        let end = (start + *batch).min(items);
        match run(start..end) {
            Ok(()) => start = end,
            Err(RunError::OutOfMemory(message)) if halve_on_oom && *batch > 1 => {
                *batch /= 2;
                tracing::warn!(batch_frames = *batch, error = %message, "out of memory in inference: halving the batch and retrying");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake device that runs out of memory above `fits` items per run.
    fn device(fits: usize, seen: &mut Vec<Range<usize>>) -> impl FnMut(Range<usize>) -> Result<(), RunError> + '_ {
        move |r: Range<usize>| {
            if r.len() > fits {
                return Err(RunError::from_message(
                    "CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size)".into(),
                ));
            }
            seen.push(r);
            Ok(())
        }
    }

    #[test]
    fn out_of_memory_halves_the_batch_and_finishes_every_item() {
        let mut seen = Vec::new();
        let mut batch = 8;
        run_chunks(21, &mut batch, true, device(3, &mut seen)).expect("retries until it fits");
        assert_eq!(batch, 2, "8 → 4 → 2, then it stays at 2");
        let covered: Vec<usize> = seen.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..21).collect::<Vec<_>>(), "every item exactly once, in order");
        assert!(seen.iter().all(|r| r.len() <= 2));
    }

    #[test]
    fn out_of_memory_at_batch_one_or_on_cpu_is_an_error() {
        let mut seen = Vec::new();
        let mut batch = 4;
        let err = run_chunks(5, &mut batch, true, device(0, &mut seen)).expect_err("nothing fits");
        assert!(matches!(err, RunError::OutOfMemory(_)));
        assert_eq!(batch, 1);
        let mut batch = 4;
        let err = run_chunks(5, &mut batch, false, device(2, &mut seen)).expect_err("no halving on CPU");
        assert!(matches!(err, RunError::OutOfMemory(_)));
        assert_eq!(batch, 4);
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut calls = 0;
        let mut batch = 4;
        let err = run_chunks(8, &mut batch, true, |_| {
            calls += 1;
            Err(RunError::from_message("Invalid input name: images".into()))
        })
        .expect_err("fails");
        assert_eq!((calls, batch), (1, 4));
        assert!(matches!(err, RunError::Other(_)));
    }

    #[test]
    fn budget_caps_the_batch() {
        let p = BatchPolicy { batch_frames_max: 16, memory_budget_bytes: 10 << 20, halve_on_oom: false };
        assert_eq!(p.frames_per_run(3 * 320 * 320 * 4), 8);
        assert_eq!(p.frames_per_run(usize::MAX), 1);
    }
}
