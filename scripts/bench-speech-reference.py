#!/usr/bin/env python3
"""Python side of agent/benches/speech.rs: times silero-vad's own get_speech_timestamps.

Loads each WAV given on the command line (16 kHz mono, as written by the bench with
`ffmpeg -ac 1 -ar 16000 -c:a pcm_f32le`) with soundfile, loads the package's ONNX model
(`load_silero_vad(onnx=True)`, i.e. silero_vad.onnx through OnnxWrapper, the package's own
session options), prints one JSON line `{"ready": ..., "versions": {...}}`, then serves the
bench: for each line `I` read on stdin it runs `get_speech_timestamps` (default parameters)
on WAV number I and prints `{"secs": <wall seconds of that call>, "segments": [[start, end],
...]}` (samples). Only the call is timed, not reading the file. Exits at end of input.

Usage (environment: `pip install silero-vad==6.2.3 onnxruntime==1.31.1 soundfile numpy torch`):
    python3 scripts/bench-speech-reference.py A.wav [B.wav ...]
"""
import json
import sys
import time
from importlib.metadata import version

import numpy as np
import soundfile
import torch
from silero_vad import get_speech_timestamps, load_silero_vad


def main():
    audio = []
    for path in sys.argv[1:]:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=False)
        if rate != 16000 or samples.ndim != 1:
            sys.exit(f"{path}: expected 16 kHz mono, got {rate} Hz, shape {samples.shape}")
        audio.append(torch.from_numpy(np.ascontiguousarray(samples)))
    model = load_silero_vad(onnx=True)
    versions = {p: version(p) for p in ("silero-vad", "onnxruntime", "torch", "numpy")}
    print(json.dumps({"ready": True, "versions": versions, "torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        wav = audio[int(line)]
        start = time.perf_counter()
        stamps = get_speech_timestamps(wav, model, sampling_rate=16000)
        secs = time.perf_counter() - start
        print(json.dumps({"secs": secs, "segments": [[s["start"], s["end"]] for s in stamps]}), flush=True)


if __name__ == "__main__":
    main()
