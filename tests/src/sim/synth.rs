//! What a simulated agent says about itself: capabilities, health that drifts over time, and the
//! synthetic digest it answers a job with. Everything is drawn from a seeded RNG per agent, so a
//! run with the same `--seed` describes the same fleet.

use gaffer_protocol::digest::{
    AnalyzerInfo, Cut, Digest, Keyframe, ModelStamp, ModerationAnalysis, Shot, ShotAnalysis, SourceInfo,
    SpeechAnalysis, StreamInfo, StreamKind, TechnicalMetadata, TextAnalysis, DIGEST_SCHEMA_VERSION,
};
use gaffer_protocol::health::{DiskHealth, GpuHealth, GpuInfo, Health, HealthSource, InferenceProvider};
use gaffer_protocol::messages::{Assignment, Capabilities, ModelRef, Profile};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sha2::Digest as _;

const GIB: u64 = 1024 * 1024 * 1024;
/// GPU models a simulated box may have, with their memory in GiB.
const GPU_MODELS: [(&str, u64); 4] =
    [("NVIDIA RTX A6000", 48), ("NVIDIA L40S", 48), ("NVIDIA GeForce RTX 4090", 24), ("NVIDIA RTX A4000", 16)];
/// Host memory sizes a simulated box may have, GiB.
const HOST_MEMORY_GIB: [u64; 4] = [32, 64, 128, 256];
/// The model version simulated agents claim for every model (`full` needs them all).
const SIM_MODEL_VERSION: &str = "sim";

/// The seeded RNG of agent `index` in a run with `seed` (one stream per agent and purpose).
pub fn agent_rng(seed: u64, index: usize, purpose: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose.rotate_left(32))
}

/// One GPU's state between heartbeats.
#[derive(Debug, Clone)]
struct GpuState {
    info: GpuInfo,
    utilization_percent: f64,
    memory_used_bytes: u64,
    temperature_c: f64,
    power_w: f64,
}

/// A simulated box's health: a baseline drawn once, then a random walk per heartbeat pulled back
/// toward the baseline, raised by the jobs it runs.
#[derive(Debug)]
pub struct HealthModel {
    rng: StdRng,
    cpu_base_percent: f64,
    cpu_percent: f64,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
    disk_total_bytes: u64,
    disk_available_bytes: u64,
    gpus: Vec<GpuState>,
}

impl HealthModel {
    /// The box of agent `index`: no GPU (a quarter of them), or one or two of one model.
    pub fn new(seed: u64, index: usize) -> Self {
        let mut rng = agent_rng(seed, index, 1);
        let gpu_count = match rng.gen_range(0..4) {
            0 => 0,
            1 | 2 => 1,
            _ => 2,
        };
        let (gpu_name, gpu_gib) = GPU_MODELS[rng.gen_range(0..GPU_MODELS.len())];
        let gpus = (0..gpu_count)
            .map(|i| GpuState {
                info: GpuInfo {
                    index: i,
                    name: gpu_name.to_owned(),
                    uuid: format!("GPU-{}", uuid::Uuid::from_u128(rng.gen())),
                    memory_total_bytes: gpu_gib * GIB,
                },
                utilization_percent: rng.gen_range(0.0..10.0),
                memory_used_bytes: rng.gen_range(200..800) * 1024 * 1024,
                temperature_c: rng.gen_range(32.0..45.0),
                power_w: rng.gen_range(20.0..60.0),
            })
            .collect();
        let memory_total_bytes = HOST_MEMORY_GIB[rng.gen_range(0..HOST_MEMORY_GIB.len())] * GIB;
        let disk_total_bytes = rng.gen_range(1..=8) * 1024 * GIB;
        let cpu_base_percent = rng.gen_range(2.0..25.0);
        Self {
            cpu_percent: cpu_base_percent,
            cpu_base_percent,
            memory_used_bytes: memory_total_bytes / rng.gen_range(4..10),
            memory_total_bytes,
            disk_available_bytes: disk_total_bytes / rng.gen_range(2..5),
            disk_total_bytes,
            gpus,
            rng,
        }
    }

    /// The GPUs, as the Hello lists them.
    pub fn gpu_infos(&self) -> Vec<GpuInfo> {
        self.gpus.iter().map(|g| g.info.clone()).collect()
    }

    /// The next heartbeat's health, `jobs_running` of `job_slots` busy.
    pub fn sample(&mut self, jobs: JobLoad) -> Health {
        let busy = if jobs.job_slots == 0 { 0.0 } else { f64::from(jobs.jobs_running) / f64::from(jobs.job_slots) };
        let rng = &mut self.rng;
        let target = self.cpu_base_percent + busy * 60.0;
        self.cpu_percent =
            (self.cpu_percent + (target - self.cpu_percent) * 0.3 + rng.gen_range(-4.0..4.0)).clamp(0.5, 100.0);
        let mem_step = rng.gen_range(-64i64..=64) * 1024 * 1024;
        self.memory_used_bytes =
            self.memory_used_bytes.saturating_add_signed(mem_step).clamp(GIB, self.memory_total_bytes - GIB);
        self.disk_available_bytes =
            self.disk_available_bytes.saturating_add_signed(rng.gen_range(-16i64..=8) * 1024 * 1024).max(GIB);
        let gpus = self
            .gpus
            .iter_mut()
            .map(|g| {
                let util_target = busy * 85.0 + 3.0;
                g.utilization_percent =
                    (g.utilization_percent + (util_target - g.utilization_percent) * 0.4 + rng.gen_range(-5.0..5.0))
                        .clamp(0.0, 100.0);
                g.temperature_c = (g.temperature_c
                    + (35.0 + g.utilization_percent * 0.45 - g.temperature_c) * 0.2
                    + rng.gen_range(-1.0..1.0))
                .clamp(25.0, 95.0);
                g.power_w = (40.0 + g.utilization_percent * 2.5 + rng.gen_range(-10.0..10.0)).max(10.0);
                let mem_step = rng.gen_range(-256i64..=256) * 1024 * 1024;
                g.memory_used_bytes = g
                    .memory_used_bytes
                    .saturating_add_signed(mem_step)
                    .clamp(128 * 1024 * 1024, g.info.memory_total_bytes);
                GpuHealth {
                    index: g.info.index,
                    name: g.info.name.clone(),
                    utilization_percent: g.utilization_percent.round() as u32,
                    memory_used_bytes: g.memory_used_bytes,
                    memory_total_bytes: g.info.memory_total_bytes,
                    temperature_c: g.temperature_c.round() as u32,
                    power_w: Some(g.power_w as f32),
                }
            })
            .collect::<Vec<_>>();
        let (source, inference) = if gpus.is_empty() {
            (
                HealthSource::CpuOnly { reason: "simulated box without an NVIDIA GPU".into() },
                InferenceProvider {
                    provider: "cpu".into(),
                    runtime_version: "1.22.0".into(),
                    note: "simulated: NVML absent, CPU provider".into(),
                },
            )
        } else {
            (
                HealthSource::Nvml { driver_version: "550.54.15".into() },
                InferenceProvider {
                    provider: "cuda".into(),
                    runtime_version: "1.22.0".into(),
                    note: "simulated: CUDA provider on GPU 0".into(),
                },
            )
        };
        Health {
            sampled_at_unix_ms: crate::sim::now_unix_ms(),
            source,
            cpu_percent: self.cpu_percent as f32,
            load_avg_1m: self.cpu_percent / 100.0 * 16.0,
            memory_used_bytes: self.memory_used_bytes,
            memory_total_bytes: self.memory_total_bytes,
            disks: vec![DiskHealth {
                path: "/".into(),
                available_bytes: self.disk_available_bytes,
                total_bytes: self.disk_total_bytes,
            }],
            gpus,
            inference: Some(inference),
            jobs_running: jobs.jobs_running,
            job_slots: jobs.job_slots,
            jobs_queued: jobs.jobs_queued,
            outbox_pending: jobs.outbox_pending,
            outbox_full: jobs.outbox_full,
        }
    }
}

/// The job side of a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct JobLoad {
    /// Jobs running now.
    pub jobs_running: u32,
    /// Configured slots.
    pub job_slots: u32,
    /// Jobs accepted and waiting for a slot.
    pub jobs_queued: u32,
    /// Outbox entries not yet acknowledged.
    pub outbox_pending: u64,
    /// The outbox is at its bound.
    pub outbox_full: bool,
}

/// What a simulated agent can do: every profile with every model `full` needs, the volume `/`
/// (so every absolute path is eligible), `job_slots` slots and the box's GPUs.
pub fn capabilities(gpus: Vec<GpuInfo>, job_slots: u32) -> Capabilities {
    Capabilities {
        gpus,
        volumes: vec!["/".into()],
        watch_roots: Vec::new(),
        job_slots,
        profiles: vec![Profile::Shots, Profile::Full],
        models: Profile::Full.required_models().iter().map(|name| model_ref(name)).collect(),
    }
}

fn model_ref(name: &str) -> ModelRef {
    ModelRef { name: name.to_owned(), version: SIM_MODEL_VERSION.to_owned(), sha256: sim_model_sha256(name) }
}

fn model_stamp(name: &str) -> ModelStamp {
    ModelStamp { name: name.to_owned(), version: SIM_MODEL_VERSION.to_owned(), sha256: sim_model_sha256(name) }
}

/// The SHA-256 a simulated agent claims for model `name`: that of the text `gaffer-sim:NAME`.
fn sim_model_sha256(name: &str) -> String {
    hex::encode(sha2::Sha256::digest(format!("gaffer-sim:{name}").as_bytes()))
}

/// A schema-valid digest for `job` (nothing is decoded): a 1080p24 H.264 + AAC clip of 10 to 120 s
/// cut into 1 to 8 shots with a keyframe each; for `full`, the moderation, text and speech
/// sections with their model stamps and nothing found.
pub fn digest(job: &Assignment, rng: &mut StdRng, analysis_secs: f64) -> Digest {
    const FPS: f64 = 24.0;
    let duration_secs = f64::from(rng.gen_range(10u32..=120));
    let frames = (duration_secs * FPS) as u64;
    let shot_count = rng.gen_range(1u64..=8);
    let bounds: Vec<u64> = (0..=shot_count).map(|i| frames * i / shot_count).collect();
    let secs = |frame: u64| frame as f64 / FPS;
    let shots: Vec<Shot> = bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let middle = (w[0] + w[1]) / 2;
            Shot {
                index: i as u32,
                start_frame: w[0],
                end_frame: w[1],
                start_secs: secs(w[0]),
                end_secs: secs(w[1]),
                keyframe: Keyframe {
                    frame: middle,
                    time_secs: secs(middle),
                    phash: format!("{:016x}", rng.gen::<u64>()),
                },
            }
        })
        .collect();
    let cuts = bounds[1..bounds.len() - 1]
        .iter()
        .map(|&frame| Cut { frame, time_secs: secs(frame), score: rng.gen_range(27.0..120.0) })
        .collect();
    let full = job.profile == Profile::Full;
    let video = StreamInfo {
        index: 0,
        kind: StreamKind::Video,
        codec: "h264".into(),
        time_base: (1, 12288),
        duration_secs: Some(duration_secs),
        frames_declared: Some(frames),
        width: Some(1920),
        height: Some(1080),
        frame_rate_fps: Some(FPS),
        pixel_format: Some("yuv420p".into()),
        sample_rate_hz: None,
        channels: None,
        bit_rate_bps: Some(8_000_000),
        language: None,
    };
    let audio = StreamInfo {
        index: 1,
        kind: StreamKind::Audio,
        codec: "aac".into(),
        time_base: (1, 48000),
        duration_secs: Some(duration_secs),
        frames_declared: None,
        width: None,
        height: None,
        frame_rate_fps: None,
        pixel_format: None,
        sample_rate_hz: Some(48000),
        channels: Some(2),
        bit_rate_bps: Some(128_000),
        language: Some("eng".into()),
    };
    let mut analyzers = vec![
        AnalyzerInfo {
            name: "shots.content".into(),
            version: "0.7.2".into(),
            parameters: vec![("threshold".into(), "27".into()), ("min_scene_len".into(), "15".into())],
        },
        AnalyzerInfo { name: "keyframes.phash".into(), version: "1".into(), parameters: Vec::new() },
    ];
    if full {
        for name in ["moderation.nudenet", "text.ppocrv4", "speech.silero-vad"] {
            analyzers.push(AnalyzerInfo {
                name: name.into(),
                version: SIM_MODEL_VERSION.into(),
                parameters: Vec::new(),
            });
        }
    }
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: job.profile.as_str().to_owned(),
        source: SourceInfo {
            path: job.path.clone(),
            size_bytes: (duration_secs * 1_016_000.0) as u64,
            modified_unix_secs: Some((crate::sim::now_unix_ms() / 1000) as i64 - rng.gen_range(0..86_400)),
        },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(duration_secs),
            bit_rate_bps: Some(8_128_000),
            streams: vec![video, audio],
            primary_video_stream: Some(0),
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: frames,
            frames_corrupt: 0,
            cuts,
            shots,
        },
        moderation: full.then(|| ModerationAnalysis {
            model: model_stamp("nudenet-320n"),
            sample_fps: 2.0,
            score_threshold: 0.5,
            frames_analyzed: (duration_secs * 2.0) as u64 + shot_count,
            ranges: Vec::new(),
        }),
        text: full.then(|| TextAnalysis {
            detector: model_stamp("ppocrv4-det"),
            recognizer: model_stamp("ppocrv4-rec"),
            classifier: Some(model_stamp("ppocr-mobile-v2-cls")),
            frames_analyzed: (duration_secs * 0.25) as u64 + shot_count,
            readings: Vec::new(),
        }),
        speech: full.then(|| SpeechAnalysis {
            model: model_stamp("silero-vad"),
            audio_stream: 1,
            audio_secs: duration_secs,
            segments: Vec::new(),
            speech_fraction: 0.0,
        }),
        analyzers,
        analysis_secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: u32) -> JobLoad {
        JobLoad { jobs_running: running, job_slots: 2, jobs_queued: 0, outbox_pending: 0, outbox_full: false }
    }

    #[test]
    fn the_same_seed_describes_the_same_box_and_health_stays_in_range() {
        let (mut a, mut b) = (HealthModel::new(7, 3), HealthModel::new(7, 3));
        assert_eq!(a.gpu_infos(), b.gpu_infos());
        let fleet: Vec<usize> = (0..64).map(|i| HealthModel::new(7, i).gpu_infos().len()).collect();
        assert!(fleet.contains(&0) && fleet.iter().any(|&n| n > 0), "some boxes with GPUs, some without");
        for i in 0..200 {
            let (h, h2) = (a.sample(load(i % 3)), b.sample(load(i % 3)));
            assert_eq!((h.cpu_percent, h.memory_used_bytes), (h2.cpu_percent, h2.memory_used_bytes));
            assert!((0.0..=100.0).contains(&h.cpu_percent));
            assert!(h.memory_used_bytes <= h.memory_total_bytes);
            assert_eq!(h.gpus.len(), a.gpu_infos().len());
            assert!(h.gpus.iter().all(|g| g.utilization_percent <= 100 && g.memory_used_bytes <= g.memory_total_bytes));
        }
    }

    #[test]
    fn digests_cover_every_frame_and_survive_the_wire() {
        let mut rng = agent_rng(1, 0, 2);
        for profile in [Profile::Shots, Profile::Full] {
            let job =
                Assignment { job_id: uuid::Uuid::new_v4(), lease_id: 1, path: "/sim/clip-000001.mov".into(), profile };
            let d = digest(&job, &mut rng, 0.5);
            assert_eq!(d.profile, profile.as_str());
            assert_eq!(d.shots.shots.first().map(|s| s.start_frame), Some(0));
            assert_eq!(d.shots.shots.last().map(|s| s.end_frame), Some(d.shots.frames_decoded));
            assert_eq!(d.shots.cuts.len() + 1, d.shots.shots.len());
            assert!(d.shots.shots.windows(2).all(|w| w[0].end_frame == w[1].start_frame));
            assert_eq!(d.moderation.is_some(), profile == Profile::Full);
            let msg = gaffer_protocol::AgentMessage::Digest { job_id: job.job_id, lease_id: 1, digest: Box::new(d) };
            let frame = gaffer_protocol::codec::encode_frame(&msg, 1 << 20).map_err(|e| e.to_string());
            assert!(frame.is_ok_and(|f| f.len() < 4096), "a small frame");
        }
        let caps = capabilities(Vec::new(), 2);
        assert!(Profile::Full.required_models().iter().all(|m| caps.models.iter().any(|have| have.name == *m)));
    }
}
