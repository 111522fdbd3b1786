//! Loading the provisioned ONNX Runtime, choosing the execution provider, creating sessions.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use gaffer_protocol::health::InferenceProvider;
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::session::Session;

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
        let path = registry.model_path(name)?;
        let fail = |detail: String| ModelsError::Session { model: name.to_owned(), detail };
        let mut builder = Session::builder(&self.environment)
            .map_err(|e| fail(e.to_string()))?
            .with_intra_threads(self.options.intra_threads)
            .map_err(|e| fail(e.to_string()))?;
        if self.use_cuda {
            builder = builder
                .with_execution_providers([cuda_ep(self.options.cuda_device_id)])
                .map_err(|e| fail(e.to_string()))?;
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
