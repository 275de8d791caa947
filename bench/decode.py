"""Image decoding: per-image cost of the safe path vs the old one, and the long fuzz run.

    python -m bench.decode                          # cost table + fuzz over 17,837 variants (~1.5 min)
    python -m bench.decode --random-flips 2000      # a longer fuzz run (~66,000 variants)
    python -m bench.decode --no-fuzz --repeats 9    # the cost table alone

Cost: per-image decode time (the best of --repeats passes of >= 0.2 s each, single-threaded:
other work on the machine only ever adds time, so the minimum is the decode's own cost) on real data:
the handwritten digits as materialize_digits writes them (32x32 RGB PNG) and re-encoded as
JPEG, and real photos as PNG, JPEG and WebP (scikit-image's astronaut, coffee and chelsea when
scikit-image is installed; scikit-learn's china and flower always). Three paths:

    before      the old decode_image: Pillow reads the header, torchvision.io decodes JPEG,
                PNG and WebP natively (and segfaults on a corrupt PNG), Pillow the rest
    after       decode_image now: Pillow decodes everything (+ a CRC check of PNG chunks)
    validate    the alternative: Pillow verify() + load() proves the bytes, then torchvision
                decodes them again

and whether "after" gives the same pixels as "before" (max abs difference, 0 = identical), on
those images and on every flavour file the fuzz corpus starts from, plus EXIF orientations 1-8.

Fuzz: the corpus of tests/fuzz_corpus.py with --random-flips seeded random bit flips per
seed (the suite uses 24), every variant decoded in a child process; prints the counts by
format and outcome and fails (exit 1) on any crash, hang (no answer in --timeout s),
decode over 1 s of CPU or exception that is not the project's own.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import save

REPO = Path(__file__).resolve().parents[1]


def decode_before(data: bytes) -> torch.Tensor:
    """The decode_image of before issue 15, trimmed to good images: torchvision for JPEG/PNG/WebP."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as native
    from torchvision.transforms.v2.functional import to_dtype

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
    if fmt in ("JPEG", "PNG", "WEBP"):
        image = native(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                       apply_exif_orientation=True)
        image = image[0] if image.ndim == 4 else image
        return to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def decode_validate_then_native(data: bytes) -> torch.Tensor:
    """Pillow proves the bytes (verify checks PNG CRCs, load decodes), then torchvision decodes."""
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return decode_before(data)


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def real_inputs(n_digits: int) -> dict[str, list[bytes]]:
    """Named sets of encoded real images."""
    import tempfile

    from sklearn.datasets import load_sample_images

    from imgcls_core.data import materialize_digits

    root = materialize_digits(Path(tempfile.mkdtemp(prefix="imgcls-bench-decode-")) / "digits")
    digits = [p.read_bytes() for p in sorted(root.glob("train/*/*.png"))[:n_digits]]
    sets = {"digits 32x32 PNG": digits,
            "digits 32x32 JPEG q90": [_encode(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), "JPEG",
                                              quality=90) for d in digits]}
    photos: dict[str, np.ndarray] = {}
    try:
        import skimage.data

        photos.update({name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea")})
    except ImportError:
        print("scikit-image is not installed: photos from scikit-learn only", file=sys.stderr)
    photos.update(zip(("china", "flower"), load_sample_images().images))
    for name, array in photos.items():
        size = f"{array.shape[1]}x{array.shape[0]}"
        sets[f"{name} {size} PNG"] = [_encode(array, "PNG")]
        sets[f"{name} {size} JPEG q90"] = [_encode(array, "JPEG", quality=90)]
        sets[f"{name} {size} WebP q90"] = [_encode(array, "WEBP", quality=90)]
    return sets


def per_image_us(fn, items: list[bytes], min_seconds: float = 0.2) -> float:
    """Mean time of fn over items, looping over them for at least min_seconds."""
    n, start = 0, time.perf_counter()
    while True:
        for data in items:
            fn(data)
        n += len(items)
        if time.perf_counter() - start >= min_seconds:
            return (time.perf_counter() - start) / n * 1e6


def measure_cost(repeats: int, n_digits: int) -> list[dict]:
    from imgcls_core.data import decode_image

    paths = {"before": decode_before, "after": decode_image, "validate": decode_validate_then_native}
    rows = []
    print(f"{'images':<28} {'before us':>10} {'after us':>9} {'validate us':>12} {'after/before':>12} "
          f"{'max |after-before|':>19}")
    for name, items in real_inputs(n_digits).items():
        diff = max(int((decode_image(d).int() - decode_before(d).int()).abs().max()) for d in items)
        times = {k: [] for k in paths}
        for _ in range(repeats):  # interleaved, so a busy moment of the machine hits all three
            for key, fn in paths.items():
                times[key].append(per_image_us(fn, items))
        med = {k: min(v) for k, v in times.items()}
        rows.append({"images": name, "n": len(items), **{f"{k}_us": round(v, 1) for k, v in med.items()},
                     "after_over_before": round(med["after"] / med["before"], 3), "max_abs_diff": diff})
        print(f"{name:<28} {med['before']:>10.0f} {med['after']:>9.0f} {med['validate']:>12.0f} "
              f"{med['after'] / med['before']:>12.2f} {diff:>19}", flush=True)
    return rows


def check_identity() -> dict:
    """before vs after on every flavour the fuzz corpus starts from (grey, palette + tRNS, RGBA,
    16-bit, CMYK, progressive, EXIF, animated, LZW/deflate/JPEG TIFF, ...) and on a photo with
    each EXIF orientation 1-8 as JPEG and PNG: the largest pixel difference of each."""
    from imgcls_core.data import decode_image
    from tests.fuzz_corpus import real_images, seed_files

    files = {name: data for name, (_fmt, data) in seed_files().items()}
    photo = real_images()["china"]
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            photo.save(buf, fmt, exif=exif.tobytes())
            files[f"{fmt.lower()}_exif_orientation_{orientation}"] = buf.getvalue()
    diffs = {}
    for name, data in files.items():
        before, after = decode_before(data), decode_image(data)
        diffs[name] = int((before.int() - after.int()).abs().max()) if before.shape == after.shape else -1
    different = {k: v for k, v in diffs.items() if v}
    print(f"\nsame pixels before/after on {len(diffs) - len(different)} of {len(diffs)} flavour files"
          + (f"; DIFFERENT (max |diff|, -1 = shape): {different}" if different else ""))
    return {"files": len(diffs), "different": different}


def run_fuzz(random_flips: int, workers: int, timeout_s: float, max_pixels: int | None) -> dict:
    from tests.fuzz_corpus import build_corpus, run_isolated, summarize

    start = time.perf_counter()
    corpus = build_corpus(random_flips=random_flips)
    built = time.perf_counter() - start
    results = run_isolated(corpus, workers=workers, timeout_s=timeout_s, max_pixels=max_pixels)
    seconds = time.perf_counter() - start
    print(f"\nfuzz: {len(corpus):,} variants ({random_flips} random flips per seed), built in {built:.1f} s, "
          f"decoded in child processes in {seconds - built:.1f} s, max_pixels={max_pixels}")
    print(summarize(results))
    allowed = {"decoded", "CorruptImageError", "ImageTooLargeError"}
    failures = [r for r in results if r.outcome not in allowed or r.cpu_s >= 1.0]
    for r in failures[:30]:
        print(f"FAILED {r.name}: {r.outcome} {r.cpu_s:.2f} s CPU {r.detail}")
    return {"variants": len(corpus), "random_flips": random_flips, "seconds": round(seconds, 1),
            "max_pixels": max_pixels,
            "counts": {f"{fmt} {outcome}": n for (fmt, outcome), n in
                       sorted(Counter((r.fmt, r.outcome) for r in results).items())},
            "max_cpu_s": round(max(r.cpu_s for r in results), 3), "failures": len(failures)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timing passes per path (the best counts)")
    parser.add_argument("--digits", type=int, default=300, help="digit images in the digit sets")
    parser.add_argument("--no-fuzz", action="store_true", help="the cost table only")
    parser.add_argument("--random-flips", type=int, default=400, help="random bit flips per seed file")
    parser.add_argument("--workers", type=int, default=2, help="fuzz worker processes")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds without an answer before a variant counts as a hang")
    parser.add_argument("--max-pixels", type=int, default=25_000_000,
                        help="decode_image's limit in the fuzz run (0: none; default: the Serve default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))  # tests.fuzz_corpus
    result = {"cost": measure_cost(args.repeats, args.digits), "identity": check_identity()}
    if not args.no_fuzz:
        result["fuzz"] = run_fuzz(args.random_flips, args.workers, args.timeout, args.max_pixels or None)
    save("decode", result)
    if result.get("fuzz", {}).get("failures") or result["identity"]["different"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
