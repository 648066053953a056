"""JPEG decoding for the ECom-RF-IMMR pipeline: Pillow, simplejpeg and OpenCV side by side in one run.

    python benchmarks/jpeg_decoders.py                # the README table
    python benchmarks/jpeg_decoders.py --smoke        # seconds: checks the script runs

For each source size (a 256-px synthetic item and 512/800-px catalogue photos, quality 90, made here from
the synthetic renderer), each library decodes the same bytes to RGB uint8 at the smallest libjpeg-turbo
DCT scale whose output is still >= the pipeline's minimum (``--min-size``: 224 / sqrt(0.6), what a
random-resized crop of scale >= 0.6 needs for 224 px), then the fused crop+resize to 224 (Pillow,
bilinear with antialias, as the pipeline does) runs on the result. Columns: decode ms, decode+resize ms
(median of ``--repeats`` interleaved rounds, one thread), the decoded size, the largest pixel
difference of each decoder's output from Pillow's (-1: another size), and the largest / mean difference
after the crop+resize to 224. ``ecomax`` is ``pipeline.decode_rgb`` (simplejpeg at Pillow's power-of-two
scale); ``simplejpeg-M/8`` lets libjpeg-turbo pick any M/8 scale (smaller output, other pixels). PyTurboJPEG is not measured: it
needs a system libturbojpeg, which the package index does not ship.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import statistics
import sys
import time
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines.ecom_rf_immr import pipeline  # noqa: E402


def sample_jpegs(size: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` synthetic product photos rendered at ``size`` px, JPEG quality 90."""
    from data_pipelines.ecom_rf_immr import synthetic

    specs = synthetic.make_catalogue(count, seed)
    out = []
    for i, spec in enumerate(specs):
        img, _ = synthetic.render_item_image(spec, np.random.default_rng((seed, i)), size, view=0)
        out.append(synthetic._encode(img, "JPEG"))
    return out


def pillow_decode(data: bytes, min_wh) -> np.ndarray:
    """Pillow with ``draft`` (power-of-two DCT scaling), what the pipeline used before simplejpeg."""
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", min_wh)
    return np.asarray(im.convert("RGB"))


def decoders() -> dict:
    """name -> decode(bytes, min_wh) -> uint8 [h, w, 3] (OpenCV when ``opencv-python-headless`` is installed)."""
    import simplejpeg

    found = {
        "pillow": pillow_decode,
        "ecomax": lambda data, min_wh: pipeline.decode_rgb(data, min_wh)[0],
        "simplejpeg-M/8": lambda data, min_wh: simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_wh[0],
                                                                  min_height=min_wh[1]),
    }
    try:
        import cv2
    except ImportError:
        return found
    cv2.setNumThreads(1)

    def cv2_decode(data: bytes, min_wh):
        w, h = simplejpeg.decode_jpeg_header(data)[1::-1]
        factor = max((f for f in (1, 2, 4, 8) if w // f >= min_wh[0] and h // f >= min_wh[1]), default=1)
        flag = {1: cv2.IMREAD_COLOR_RGB, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
        out = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        return out if factor == 1 else out[..., ::-1]

    return {**found, "opencv": cv2_decode}


def bench(sizes: list[int], count: int, repeats: int, min_size: int, out_size: int) -> dict:
    rows = []
    decs = decoders()
    crop = (0.1, 0.1, 0.9, 0.9)
    for size in sizes:
        jpegs = sample_jpegs(size, count)
        min_wh = (min_size, min_size)
        ref = [decs["pillow"](j, min_wh) for j in jpegs]
        times = {name: ([], []) for name in decs}
        for _ in range(repeats):
            for name, dec in decs.items():
                t0 = time.perf_counter()
                arrays = [dec(j, min_wh) for j in jpegs]
                t1 = time.perf_counter()
                for a in arrays:
                    pipeline.crop_resize(a, crop, (out_size, out_size))
                t2 = time.perf_counter()
                times[name][0].append((t1 - t0) / count)
                times[name][1].append((t2 - t0) / count)
        ref_out = [pipeline.crop_resize(r, crop, (out_size, out_size)).astype(int) for r in ref]
        for name, dec in decs.items():
            arrays = [dec(j, min_wh) for j in jpegs]
            diff = max(int(np.abs(a.astype(int) - r.astype(int)).max()) if a.shape == r.shape else -1
                       for a, r in zip(arrays, ref))
            outs = [pipeline.crop_resize(a, crop, (out_size, out_size)).astype(int) for a in arrays]
            resized = max(int(np.abs(o - r).max()) for o, r in zip(outs, ref_out))
            mean_resized = float(np.mean([np.abs(o - r).mean() for o, r in zip(outs, ref_out)]))
            rows.append({"source_px": size, "decoder": name, "decoded_px": list(arrays[0].shape[:2]),
                         "decode_ms": 1e3 * statistics.median(times[name][0]),
                         "decode_resize_ms": 1e3 * statistics.median(times[name][1]),
                         "max_abs_diff_vs_pillow": diff, "max_abs_diff_after_resize": resized,
                         "mean_abs_diff_after_resize": mean_resized})
    return {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "images_per_round": count,
            "repeats": repeats, "min_size": min_size, "out_size": out_size, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512,800")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-size", type=int, default=math.ceil(224 / math.sqrt(0.6)))
    p.add_argument("--out-size", type=int, default=224)
    p.add_argument("--json", default="")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.count, a.repeats = "64", 3, 1
    report = bench([int(s) for s in a.sizes.split(",")], a.count, a.repeats, a.min_size, a.out_size)
    print(f"{'source':>6} {'decoder':>14} {'decoded':>9} {'decode ms':>9} {'+resize ms':>10} {'max diff':>8} "
          f"{'after resize max / mean':>24}")
    for r in report["rows"]:
        print(f"{r['source_px']:>6} {r['decoder']:>14} {'x'.join(map(str, r['decoded_px'])):>9} "
              f"{r['decode_ms']:9.3f} {r['decode_resize_ms']:10.3f} {r['max_abs_diff_vs_pillow']:8d} "
              f"{r['max_abs_diff_after_resize']:17d} / {r['mean_abs_diff_after_resize']:.2f}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
