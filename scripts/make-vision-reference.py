#!/usr/bin/env python3
"""Reference outputs for agent/tests/vision.rs, from the Python packages themselves.

* NudeNet: `nudenet.NudeDetector().detect(PNG_PATH)` (nudenet 3.4.2, its bundled 320n.onnx,
  which is byte-identical to the model the agent installs).
* RapidOCR: `rapidocr_onnxruntime.RapidOCR()(PNG_PATH)` (rapidocr-onnxruntime 1.4.4, default
  config.yaml: PP-OCRv4 det + mobile v2 cls + PP-OCRv4 rec, all byte-identical to the agent's).

Frames are single video frames extracted with FFmpeg at fixed timestamps from the sample media,
some with text drawn on by FFmpeg's drawtext (DejaVu fonts from Debian's fonts-dejavu-core).
The exact FFmpeg arguments are stored in each fixture so agent/tests/vision.rs rebuilds the same
PNGs; the SHA-256 of each frame's decoded RGB24 pixels is stored too and checked by the test.

Usage (environment in tests/fixtures/vision/README.md):
    python3 scripts/make-vision-reference.py [MEDIA_DIR] [--bench]
--bench also times both packages on the same frames (frames/s), for the README and the report.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "vision")
FONT_DIR = "/usr/share/fonts/truetype/dejavu"


def drawtext(text, size, color, x, y, font="DejaVuSans.ttf", box=None):
    s = f"drawtext=fontfile={FONT_DIR}/{font}:text='{text}':fontsize={size}:fontcolor={color}:x={x}:y={y}"
    if box:
        s += f":box=1:boxcolor={box}:boxborderw=6"
    return s


# Frames for NudeNet parity: plain frames of the sample media (Megamind has faces).
NUDENET_FRAMES = [
    {"id": "megamind-01.0", "source": "Megamind.avi", "ss": "1.0"},
    {"id": "megamind-02.5", "source": "Megamind.avi", "ss": "2.5"},
    {"id": "megamind-04.0", "source": "Megamind.avi", "ss": "4.0"},
    {"id": "megamind-06.0", "source": "Megamind.avi", "ss": "6.0"},
    {"id": "megamind-08.0", "source": "Megamind.avi", "ss": "8.0"},
    {"id": "megamind-10.0", "source": "Megamind.avi", "ss": "10.0"},
    {"id": "bigbuckbunny-02.0", "source": "bigbuckbunny.mp4", "ss": "2.0"},
    {"id": "bikes-05.0", "source": "bikes.mp4", "ss": "5.0"},
]

# Frames for RapidOCR parity: sample-media frames with text drawn on (several lines, sizes,
# colours, fonts), plus plain frames to show what the samples carry themselves.
OCR_FRAMES = [
    {
        "id": "megamind-text",
        "source": "Megamind.avi",
        "ss": "2.0",
        "vf": ",".join([
            drawtext("GAFFER DAILIES 2024", 40, "white", 20, 20, "DejaVuSans-Bold.ttf"),
            drawtext("Scene 12 Take 3", 28, "yellow", 20, 470),
            drawtext("ROLL A047 C012", 22, "cyan", 420, 110, "DejaVuSansMono.ttf", box="black@0.6"),
        ]),
    },
    {
        "id": "bikes-text",
        "source": "bikes.mp4",
        "ss": "3.0",
        "vf": ",".join([
            drawtext("The quick brown fox", 26, "white", 30, 30, box="black@0.5"),
            drawtext("jumps over 13 lazy dogs", 20, "red", 200, 200, "DejaVuSerif.ttf"),
        ]),
    },
    {
        "id": "bigbuckbunny-text",
        "source": "bigbuckbunny.mp4",
        "ss": "2.0",
        "vf": ",".join([
            drawtext("Big Buck Bunny", 64, "white", 60, 60, "DejaVuSans-Bold.ttf"),
            drawtext("Blender Foundation 2008", 32, "orange", 60, 150),
            drawtext("TC 01.23.45.12", 36, "lime", 800, 640, "DejaVuSansMono-Bold.ttf", box="black@0.7"),
            drawtext("Camera B  Lens 35mm", 24, "white", 800, 40, "DejaVuSerif-Bold.ttf"),
        ]),
    },
    {
        "id": "megamind-text-small",
        "source": "Megamind.avi",
        "ss": "7.0",
        "vf": ",".join([
            drawtext("Property of Example Studio", 18, "white", 10, 500),
            drawtext("CONFIDENTIAL", 48, "red@0.8", 200, 240, "DejaVuSans-Bold.ttf"),
        ]),
    },
    {
        "id": "bikes-text-2",
        "source": "bikes.mp4",
        "ss": "7.0",
        "vf": ",".join([
            drawtext("STUNT UNIT", 30, "yellow", 380, 20, "DejaVuSans-Bold.ttf"),
            drawtext("Day 14 of 52", 22, "white", 20, 230, box="black@0.6"),
            drawtext("Location Harbour Road", 18, "white", 330, 236),
            drawtext("Reel 7", 26, "magenta", 30, 110, "DejaVuSerif-Bold.ttf"),
        ]),
    },
    {
        "id": "megamind-text-3",
        "source": "Megamind.avi",
        "ss": "5.0",
        "vf": ",".join([
            drawtext("PREVIEW COPY", 36, "white@0.9", 220, 30, "DejaVuSans-Bold.ttf"),
            drawtext("Director Jane Smith", 24, "yellow", 30, 420),
            drawtext("Editor Alex Brown", 24, "yellow", 30, 460),
            drawtext("v3 final mix", 20, "cyan", 560, 490, "DejaVuSansMono.ttf"),
        ]),
    },
    {
        "id": "bigbuckbunny-text-2",
        "source": "bigbuckbunny.mp4",
        "ss": "4.5",
        "vf": ",".join([
            drawtext("Visual Effects Review", 48, "white", 40, 560, "DejaVuSans-Bold.ttf", box="black@0.5"),
            drawtext("Shot 0420 Version 12", 30, "orange", 40, 640),
            drawtext("Approved", 40, "lime", 1000, 60, "DejaVuSerif.ttf"),
            drawtext("Frame 1001 to 1127", 26, "white", 900, 660, "DejaVuSansMono.ttf"),
        ]),
    },
    {"id": "bigbuckbunny-plain", "source": "bigbuckbunny.mp4", "ss": "4.0"},
    {"id": "megamind-plain", "source": "Megamind.avi", "ss": "9.0"},
]


def ffmpeg_args(frame):
    """The FFmpeg arguments after the input path (agent/tests/vision.rs uses the same)."""
    args = ["-frames:v", "1"]
    if frame.get("vf"):
        args += ["-vf", frame["vf"]]
    return args


def extract(media_dir, frame, out_png):
    cmd = ["ffmpeg", "-v", "error", "-y", "-ss", frame["ss"], "-i", os.path.join(media_dir, frame["source"])]
    cmd += ffmpeg_args(frame) + [out_png]
    subprocess.run(cmd, check=True)


def rgb_sha256(png):
    img = Image.open(png).convert("RGB")
    return hashlib.sha256(img.tobytes()).hexdigest(), img.size


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tools():
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.splitlines()[0]
    import cv2
    return {
        "ffmpeg": ffmpeg,
        "python": sys.version.split()[0],
        "nudenet": version("nudenet"),
        "rapidocr-onnxruntime": version("rapidocr-onnxruntime"),
        "onnxruntime": version("onnxruntime"),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "pyclipper": version("pyclipper"),
        "shapely": version("shapely"),
        "Pillow": version("Pillow"),
    }


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    bench = "--bench" in sys.argv  # times the packages only; writes no fixtures
    media_dir = args[0] if args else os.environ.get(
        "GAFFER_MEDIA_DIR", os.path.join(os.environ["HOME"], ".cache", "gaffer", "media"))
    os.makedirs(OUT, exist_ok=True)

    import nudenet
    from nudenet import NudeDetector
    from rapidocr_onnxruntime import RapidOCR
    import rapidocr_onnxruntime

    detector = NudeDetector()
    ocr = RapidOCR()
    nudenet_model = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
    ocr_models = os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models")

    with tempfile.TemporaryDirectory() as work:
        sources = {}
        nude_out = []
        nude_pngs = []
        for frame in NUDENET_FRAMES:
            png = os.path.join(work, frame["id"] + ".png")
            extract(media_dir, frame, png)
            sha, (w, h) = rgb_sha256(png)
            sources[frame["source"]] = sha256_file(os.path.join(media_dir, frame["source"]))
            dets = detector.detect(png)
            nude_out.append({**frame, "ffmpeg_args": ffmpeg_args(frame), "width": w, "height": h,
                             "rgb_sha256": sha, "detections": dets})
            nude_pngs.append(png)
            print(frame["id"], [(d["class"], round(d["score"], 3)) for d in dets], file=sys.stderr)

        ocr_out = []
        ocr_pngs = []
        for frame in OCR_FRAMES:
            png = os.path.join(work, frame["id"] + ".png")
            extract(media_dir, frame, png)
            sha, (w, h) = rgb_sha256(png)
            sources[frame["source"]] = sha256_file(os.path.join(media_dir, frame["source"]))
            result, _ = ocr(png)
            lines = [{"box": [[float(x), float(y)] for x, y in box], "text": text, "score": float(score)}
                     for box, text, score in (result or [])]
            ocr_out.append({**frame, "ffmpeg_args": ffmpeg_args(frame), "width": w, "height": h,
                            "rgb_sha256": sha, "lines": lines})
            ocr_pngs.append(png)
            print(frame["id"], [l["text"] for l in lines], file=sys.stderr)

        if bench:
            run_bench(detector, ocr, nude_pngs, ocr_pngs)
            return
        common = {"tools": tools(), "source_sha256": sources, "fonts_dir": FONT_DIR}
        with open(os.path.join(OUT, "nudenet.json"), "w") as f:
            json.dump({**common, "call": "nudenet.NudeDetector().detect(png_path)",
                       "model_sha256": sha256_file(nudenet_model), "frames": nude_out}, f, indent=1)
            f.write("\n")
        with open(os.path.join(OUT, "ocr.json"), "w") as f:
            json.dump({**common, "call": "rapidocr_onnxruntime.RapidOCR()(png_path)",
                       "model_sha256": {m: sha256_file(os.path.join(ocr_models, m)) for m in sorted(os.listdir(ocr_models))},
                       "frames": ocr_out}, f, indent=1)
            f.write("\n")


def run_bench(detector, ocr, nude_pngs, ocr_pngs, seconds=10.0):
    """Frames/s of the reference packages on the same PNGs (decoded once, arrays in memory)."""
    import cv2
    nude_imgs = [cv2.imread(p) for p in nude_pngs]
    ocr_imgs = [cv2.imread(p) for p in ocr_pngs if "plain" not in p]
    for name, fn, imgs in [("nudenet", detector.detect, nude_imgs), ("rapidocr", lambda i: ocr(i), ocr_imgs)]:
        fn(imgs[0])
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for img in imgs:
                fn(img)
                n += 1
        fps = n / (time.perf_counter() - start)
        print(f"python {name}: {fps:.2f} frames/s over {n} frames")


if __name__ == "__main__":
    main()
