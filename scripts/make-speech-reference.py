#!/usr/bin/env python3
"""Reference speech segments for agent/tests/speech.rs, from the silero-vad package itself.

For each input, the audio is decoded and resampled to 16 kHz mono f32 by FFmpeg's
libswresample (`ffmpeg -map 0:a:0 -ac 1 -ar 16000 -f f32le`, the conversion the agent does
through ffmpeg-next), then passed to `silero_vad.get_speech_timestamps` with the ONNX model
(`load_silero_vad(onnx=True)`, i.e. `silero_vad/data/silero_vad.onnx` through OnnxWrapper) and
default parameters. Writes tests/fixtures/speech/<name>.json.

Usage (see tests/fixtures/speech/README.md for the environment):
    python3 scripts/make-speech-reference.py [MEDIA_DIR]
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime
import silero_vad
import torch
from importlib.metadata import version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "speech")

# The known-speech clip: espeak-ng lines muxed onto bikes.mp4 (which has no audio) at these
# offsets. agent/tests/speech.rs rebuilds the clip from this same description (read from the
# fixture) with the same commands.
ESPEAK_CLIP = {
    "base": "bikes.mp4",
    "voice": "en",
    "speed_wpm": 150,
    "lines": [
        {"text": "The shot opens on a wide street at dawn.", "offset_secs": 0.8},
        {"text": "Cut to the riders.", "offset_secs": 4.6},
        {"text": "Hold on the last frame.", "offset_secs": 7.4},
    ],
}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_espeak_clip(media_dir, workdir):
    """Same steps as make_espeak_clip() in agent/tests/speech.rs."""
    inputs = ["-i", os.path.join(media_dir, ESPEAK_CLIP["base"])]
    chains = []
    for i, line in enumerate(ESPEAK_CLIP["lines"]):
        raw = os.path.join(workdir, f"line{i}.wav")
        subprocess.run(["espeak-ng", "-v", ESPEAK_CLIP["voice"], "-s", str(ESPEAK_CLIP["speed_wpm"]),
                        "-w", raw, line["text"]], check=True)
        inputs += ["-i", raw]
        delay_ms = int(round(line["offset_secs"] * 1000))
        chains.append(f"[{i + 1}:a]aresample=48000,adelay={delay_ms}:all=1[a{i}]")
    mix = "".join(f"[a{i}]" for i in range(len(ESPEAK_CLIP["lines"])))
    graph = ";".join(chains) + f";{mix}amix=inputs={len(ESPEAK_CLIP['lines'])}:normalize=0,apad[a]"
    out = os.path.join(workdir, "espeak-clip.mkv")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *inputs, "-filter_complex", graph,
                    "-map", "0:v", "-map", "[a]", "-shortest", "-c:v", "copy", "-c:a", "pcm_s16le", out],
                   check=True)
    return out


def resample_16k(path):
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-ac", "1",
                          "-ar", "16000", "-f", "f32le", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(pcm, dtype="<f4").copy(), hashlib.sha256(pcm).hexdigest()


def reference(name, path, model, extra=None):
    audio, samples_sha = resample_16k(path)
    wav = torch.from_numpy(audio)
    segs = silero_vad.get_speech_timestamps(wav, model, return_seconds=False)
    secs = silero_vad.get_speech_timestamps(wav, model, return_seconds=True)
    doc = {
        "input": os.path.basename(path),
        "input_sha256": sha256_file(path),
        "samples_sha256": samples_sha,
        "samples": int(len(audio)),
        "sample_rate_hz": 16000,
        "segments_samples": [[int(s["start"]), int(s["end"])] for s in segs],
        "segments_secs_rounded": [[s["start"], s["end"]] for s in secs],
        "generator": {
            "script": "scripts/make-speech-reference.py",
            "silero_vad": version("silero-vad"),
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "ffmpeg": subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()[0],
            "call": "get_speech_timestamps(wav, load_silero_vad(onnx=True)) with defaults",
        },
    }
    if extra:
        doc.update(extra)
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{name}: {len(audio) / 16000:.2f} s, {len(segs)} segments")


def main():
    media_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "GAFFER_MEDIA_DIR", os.path.expanduser("~/.cache/gaffer/media"))
    os.makedirs(OUT, exist_ok=True)
    model = silero_vad.load_silero_vad(onnx=True)
    reference("megamind", os.path.join(media_dir, "Megamind.avi"), model)
    reference("bigbuckbunny", os.path.join(media_dir, "bigbuckbunny.mp4"), model)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_espeak_clip(media_dir, tmp)
        espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
        reference("espeak", clip, model, {"clip": ESPEAK_CLIP, "espeak_ng": espeak})


if __name__ == "__main__":
    main()
