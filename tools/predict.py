"""Classify your own images of digits (or clothes) with the trained model: python -m tools.predict FILE...

Not a DVC stage: a command for people. Each image is prepared the way MNIST was made (grayscale,
light ink on a dark background, cropped to the ink, longest side scaled to 20 px, centred by its
centre of mass in a 28x28 frame), so that the model sees what it was trained on.
"""

import argparse
import json
import sys

from stages.common import CLASS_NAMES, MODEL_FILE, PipelineError, load_params, load_split, require, run

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages import evaluate

FRAME, BOX = 28, 20  # MNIST: the ink fits a 20x20 box, centred by centre of mass in 28x28
CENTRE = 14  # where MNIST's centres of mass sit (row and column 14.0 on average over the test set)
NOISE = 0.1  # ink darker than 10% of the image's contrast is paper texture or JPEG noise
# Memory stays bounded whatever the file: a larger image is shrunk to WORK pixels on its longer side
# before any array is made (the digit ends up 20 px anyway), a JPEG already while it is decoded, at
# 1/2, 1/4 or 1/8 scale. What is decoded at full size (a PNG) may have up to MAX_PIXELS, 8000x8000:
# a 48 MP phone photo or a 600-dpi A4 scan (35 MP) fits, and its decoded RGBA pixels take 256 MB.
WORK = 2048
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # Pillow's own limit would warn about a JPEG before its reduced decode


def read_image(path):
    """Grayscale uint8 array of an image file, at most WORK pixels on a side; a transparent
    background counts as white paper."""
    with Image.open(path, formats=("PNG", "JPEG")) as im:
        longest = max(im.size)
        if longest > WORK:  # JPEG only: libjpeg decodes at a smaller scale, straight to grey
            im.draft("L", tuple(max(1, side * WORK // longest) for side in im.size))
        if im.width * im.height > MAX_PIXELS:
            raise PipelineError(
                f"{im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} this command decodes; "
                f"scale it down (to {WORK} pixels on its longer side, say)"
            )
        if max(im.size) > WORK:  # a box filter averages every pixel, as a smaller photo would
            if im.mode in ("1", "P"):  # which Pillow resizes by picking pixels, dropping thin strokes
                im = im.convert("RGBA")
            scale = WORK / max(im.size)
            im = im.resize(tuple(max(1, round(side * scale)) for side in im.size), Image.Resampling.BOX)
        im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
        if im.mode.startswith("I"):  # 16-bit greyscale PNG: Pillow's convert("L") would clip it, not scale it
            return np.round(np.asarray(im, dtype="float32") / 257).clip(0, 255).astype("uint8")
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return np.asarray(im.convert("L"))


def prepare(gray):
    """An image (uint8 [H, W], any polarity) as a 28x28 uint8 MNIST digit: light ink on black."""
    a = gray.astype("float32")
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background = np.median(border)
    if background > 127:  # dark ink on light paper; MNIST is light on dark
        a, background = 255 - a, 255 - background
    contrast = a.max() - background
    if contrast < 32:
        raise PipelineError("no ink found: the image is (nearly) one flat colour")
    ink = np.clip((a - background) / contrast, 0, 1)
    ink[ink < NOISE] = 0
    crop = Image.fromarray(np.round(ink * 255).astype("uint8"))
    crop = crop.crop(crop.getbbox())
    scale = BOX / max(crop.size)
    size = tuple(max(1, round(side * scale)) for side in crop.size)
    small = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype="float32")
    # Thin pen strokes fade when shrunk; MNIST strokes peak at full brightness.
    small = np.round(small * (255 / small.max())).astype("uint8")
    ys, xs = np.indices(small.shape)
    centre_y, centre_x = (ys * small).sum() / small.sum(), (xs * small).sum() / small.sum()
    frame = Image.new("L", (FRAME, FRAME))
    offset = (round(CENTRE - centre_x), round(CENTRE - centre_y))
    frame.paste(Image.fromarray(small), offset)  # paste clips whatever a lopsided shape pushes out
    return np.asarray(frame)


def load(path):
    """The prepared 28x28 digit of one file, or a PipelineError naming the file and what is wrong."""
    try:
        gray = read_image(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a PNG or JPEG image") from None
    # Pillow reports damaged data as OSError ("image file is truncated"), SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    except PipelineError as e:  # too many pixels
        raise PipelineError(f"{path}: {e}") from None
    try:
        return prepare(gray)
    except PipelineError as e:
        raise PipelineError(f"{path}: {e}") from None


def report(path, probs, names):
    top = np.argsort(probs)[::-1][:3]
    top3 = [{"class": int(k), "name": names[k], "confidence": float(probs[k])} for k in top]
    return {"file": path, **top3[0], "top3": top3}


def describe(result):
    def label(r):
        return r["name"] if r["name"] == str(r["class"]) else f"{r['class']} {r['name']}"

    others = ", ".join(f"{label(r)} {r['confidence']:.1%}" for r in result["top3"])
    return f"{result['file']}: {label(result)} ({result['confidence']:.1%}); top 3: {others}"


def main():
    parser = argparse.ArgumentParser(description="Classify PNG or JPEG images with data/model.keras.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="PNG or JPEG images, any size or polarity")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    args = parser.parse_args()
    names = CLASS_NAMES[load_params("data")["data"]["dataset"]]
    require(MODEL_FILE, "train")
    _, _, divisor = load_split("test")  # the model expects pixels scaled as in training
    digits, good, failed = [], [], False
    for path in args.files:
        try:
            digits.append(load(path))
            good.append(path)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            failed = True
    if digits:
        # the evaluate stage's own prediction: the model's input shape and pixel scaling
        for path, probs in zip(good, evaluate.predict(np.stack(digits), divisor), strict=True):
            result = report(path, probs, names)
            print(json.dumps(result) if args.json else describe(result), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
