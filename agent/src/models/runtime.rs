//! Loading the provisioned ONNX Runtime, choosing the execution provider, creating sessions.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use gaffer_protocol::health::InferenceProvider;
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::session::builder::BuilderResult;
use ort::session::Session;

/// ONNX Runtime's graph optimization levels (`ort`'s enum): `Disable` (`ORT_DISABLE_ALL`),
/// `Level1` (`ORT_ENABLE_BASIC`), `Level2` (`ORT_ENABLE_EXTENDED`), `Level3`
/// (`ORT_ENABLE_LAYOUT`), `All` (`ORT_ENABLE_ALL`, ONNX Runtime's default).
pub use ort::session::builder::GraphOptimizationLevel;

use super::manifest::{self, ONNX_RUNTIME_VERSION};
use super::{ModelsError, Registry};

/// The one ONNX Runtime environment of this process, and the library it was loaded from.
static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();
/// Serializes the first initialization (library load + environment build).
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Options for [`Runtime::init_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Intra-op threads per session. Defaults to the number of available cores
    /// (`std::thread::available_parallelism`, 1 if unknown).
    pub intra_threads: usize,
    /// CUDA device to use when the CUDA execution provider is chosen. Defaults to 0.
    pub cuda_device_id: i32,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self { intra_threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), cuda_device_id: 0 }
    }
}

/// Per-session ONNX Runtime options for [`Runtime::session_with`]. Every field is optional:
/// `None` keeps what [`Runtime::session`] does (the runtime's intra-op threads, ONNX Runtime's
/// defaults for the rest), so `SessionTuning::default()` gives exactly a [`Runtime::session`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTuning {
    /// Intra-op threads (at least 1). `None`: [`Runtime::intra_threads`].
    pub intra_threads: Option<usize>,
    /// Inter-op threads (only used with parallel execution; at least 1). `None`: ONNX
    /// Runtime's default.
    pub inter_threads: Option<usize>,
    /// Graph optimization level. `None`: ONNX Runtime's default, [`GraphOptimizationLevel::All`].
    pub optimization_level: Option<GraphOptimizationLevel>,
    /// The CPU execution provider's memory arena (`enable_cpu_mem_arena`). `None`: ONNX
    /// Runtime's default (on). Ignored when CUDA is in use.
    pub cpu_mem_arena: Option<bool>,
    /// Memory pattern planning (`enable_mem_pattern`). `None`: ONNX Runtime's default (on).
    pub memory_pattern: Option<bool>,
    /// Whether idle intra-op threads spin before blocking (`session.intra_op.allow_spinning`).
    /// `None`: ONNX Runtime's default (spin).
    pub intra_op_spinning: Option<bool>,
}

/// The loaded ONNX Runtime and the execution provider sessions use.
#[derive(Clone)]
pub struct Runtime {
    environment: Environment,
    library: PathBuf,
    use_cuda: bool,
    provider: InferenceProvider,
    options: RuntimeOptions,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library)
            .field("provider", &self.provider)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// [`Runtime::init_with`] with default [`RuntimeOptions`].
    ///
    /// # Errors
    /// See [`Runtime::init_with`].
    pub fn init(registry: &Registry, gpu_count: usize) -> Result<Runtime, ModelsError> {
        Self::init_with(registry, gpu_count, RuntimeOptions::default())
    }

    /// Loads the provisioned ONNX Runtime library (`ort::init_from`, once per process) and
    /// chooses the execution provider.
    ///
    /// * `gpu_count > 0` (NVML saw a GPU): wants CUDA. Uses the `onnxruntime-gpu` runtime and
    ///   registers the CUDA provider on a probe session builder. If the GPU runtime is not
    ///   installed or the provider does not register, logs an ERROR with the reason and falls
    ///   back to CPU, saying why in [`InferenceProvider::note`].
    /// * `gpu_count == 0`: CPU, note "NVML found no GPU: CPU execution provider".
    ///
    /// Later calls in the same process reuse the loaded library.
    ///
    /// # Errors
    /// [`ModelsError::RuntimeNotInstalled`] when no runtime is installed and verified,
    /// [`ModelsError::RuntimeLoad`] when it cannot be loaded, [`ModelsError::RuntimeConflict`]
    /// when another library is already loaded in this process.
    pub fn init_with(registry: &Registry, gpu_count: usize, options: RuntimeOptions) -> Result<Runtime, ModelsError> {
        let cpu = registry.runtime(manifest::RUNTIME_CPU);
        let gpu = registry.runtime(manifest::RUNTIME_GPU);
        let data_dir = registry.data_dir().display().to_string();
        let want_cuda = gpu_count > 0;
        let (library, mut note) = match (want_cuda, gpu, cpu) {
            (true, Some(g), _) => (g.primary_path(), String::new()),
            (true, None, Some(c)) => {
                let note = format!(
                    "NVML found {gpu_count} GPU(s) but the {} runtime is not installed \
                     (`gaffer-agent models fetch --gpu yes`): CPU execution provider",
                    manifest::RUNTIME_GPU
                );
                tracing::error!("{note}");
                (c.primary_path(), note)
            }
            (false, _, Some(c)) => (c.primary_path(), "NVML found no GPU: CPU execution provider".to_owned()),
            (false, Some(g), None) => {
                (g.primary_path(), "NVML found no GPU: CPU execution provider (GPU runtime library)".to_owned())
            }
            (_, None, None) => return Err(ModelsError::RuntimeNotInstalled { data_dir }),
        };
        let environment = load(&library)?;
        let mut use_cuda = false;
        if want_cuda && note.is_empty() {
            match probe_cuda(&environment, options.cuda_device_id) {
                Ok(()) => {
                    use_cuda = true;
                    note = format!("CUDA execution provider registered on GPU {}", options.cuda_device_id);
                    tracing::info!("{note}");
                }
                Err(reason) => {
                    note = format!(
                        "NVML found {gpu_count} GPU(s) but the CUDA execution provider did not register \
                         ({reason}): CPU execution provider"
                    );
                    tracing::error!("{note}");
                }
            }
        }
        let provider = InferenceProvider {
            provider: if use_cuda { "cuda" } else { "cpu" }.to_owned(),
            runtime_version: ONNX_RUNTIME_VERSION.to_owned(),
            note,
        };
        Ok(Runtime { environment, library, use_cuda, provider, options })
    }

    /// The execution provider in use and why, for health reports and `models list`.
    pub fn provider(&self) -> InferenceProvider {
        self.provider.clone()
    }

    /// The ONNX Runtime library loaded.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Intra-op threads per session.
    pub fn intra_threads(&self) -> usize {
        self.options.intra_threads
    }

    /// Sets the intra-op threads of sessions created afterwards (at least 1).
    pub fn set_intra_threads(&mut self, threads: usize) {
        self.options.intra_threads = threads.max(1);
    }

    /// Creates a session for the verified model `name` on the chosen execution provider
    /// (CUDA registered with `error_on_failure`, so a CUDA failure is an error here, not a
    /// silent CPU fallback), with [`Runtime::intra_threads`] intra-op threads.
    ///
    /// # Errors
    /// [`ModelsError::NotInstalled`] or [`ModelsError::Session`].
    pub fn session(&self, registry: &Registry, name: &str) -> Result<Session, ModelsError> {
        self.session_with(registry, name, &SessionTuning::default())
    }

    /// [`Runtime::session`] with the options of `tuning` (its `None` fields as there).
    ///
    /// # Errors
    /// [`ModelsError::NotInstalled`] or [`ModelsError::Session`] (also when ONNX Runtime
    /// rejects an option).
    pub fn session_with(
        &self,
        registry: &Registry,
        name: &str,
        tuning: &SessionTuning,
    ) -> Result<Session, ModelsError> {
        let path = registry.model_path(name)?;
        let fail = |detail: String| ModelsError::Session { model: name.to_owned(), detail };
        let step = |r: BuilderResult| r.map_err(|e| fail(e.to_string()));
        let intra = tuning.intra_threads.unwrap_or(self.options.intra_threads).max(1);
        let mut builder = Session::builder(&self.environment).map_err(|e| fail(e.to_string()))?;
        builder = step(builder.with_intra_threads(intra))?;
        if let Some(threads) = tuning.inter_threads {
            builder = step(builder.with_inter_threads(threads.max(1)))?;
        }
        if let Some(level) = tuning.optimization_level {
            builder = step(builder.with_optimization_level(level))?;
        }
        if let Some(enable) = tuning.memory_pattern {
            builder = step(builder.with_memory_pattern(enable))?;
        }
        if let Some(enable) = tuning.intra_op_spinning {
            builder = step(builder.with_intra_op_spinning(enable))?;
        }
        if self.use_cuda {
            builder = step(builder.with_execution_providers([cuda_ep(self.options.cuda_device_id)]))?;
        } else if let Some(enable) = tuning.cpu_mem_arena {
            builder =
                step(builder.with_execution_providers([ort::ep::CPU::default().with_arena_allocator(enable).build()]))?;
        }
        builder.commit_from_file(&path).map_err(|e| fail(e.to_string()))
    }
}

fn cuda_ep(device_id: i32) -> ExecutionProviderDispatch {
    ort::ep::CUDA::default().with_device_id(device_id).build().error_on_failure()
}

/// Registers the CUDA provider on a throwaway session builder; Err has ONNX Runtime's reason.
fn probe_cuda(environment: &Environment, device_id: i32) -> Result<(), String> {
    let mut builder = Session::builder(environment).map_err(|e| e.to_string())?;
    cuda_ep(device_id).register(&mut builder).map_err(|e| e.to_string())
}

/// Loads `library` once per process and builds the environment.
fn load(library: &Path) -> Result<Environment, ModelsError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        return if loaded == library {
            Ok(env.clone())
        } else {
            Err(ModelsError::RuntimeConflict {
                loaded: loaded.display().to_string(),
                wanted: library.display().to_string(),
            })
        };
    }
    let fail = |detail: String| ModelsError::RuntimeLoad { path: library.display().to_string(), detail };
    let environment = ort::init_from(library)
        .map_err(|e| fail(e.to_string()))?
        .with_name("gaffer-agent")
        .with_telemetry(false)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(library = %library.display(), "loaded ONNX Runtime");
    let _ = ENVIRONMENT.set((library.to_path_buf(), environment.clone()));
    Ok(environment)
}
