"""Numeric measures of style and content on 64x64-ish images (NumPy only).

They turn "does this LoRA make images striped?" into numbers a test can compare:

    stripe_energy(img)   share of the image's detail energy at the stripe frequency     (stripes set)
    outline_score(img)   share of pixels in thin dark lines, beyond what the border strips hold (outline set)
    pastel_score(img)    share of light, softly coloured pixels                         (pastel set)
    content_scores(img)  {colour: share of the shape's pixels} for the shape that stands out
                         from the background; dominant_colour(img) is the top entry
    shape_of(img)        "circle" / "square" / "triangle" from how the shape fills its bounding box

Every function takes a PIL image or an HxWx3 uint8 array. None of them needs a mask or label: they
work the same on generated images as on the dataset's own.
"""

from __future__ import annotations

import numpy as np

from .shapes import COLOURS, STRIPE_PERIOD, pastel


def as_array(img) -> np.ndarray:
    """An HxWx3 float32 array in 0..255 from a PIL image or a uint8 array."""
    arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H x W x 3), got shape {arr.shape}")
    return arr.astype(np.float32)


# -- stripes ----------------------------------------------------------------------------------------

def stripe_energy(img, period: float = STRIPE_PERIOD) -> float:
    """Fraction of the image's AC energy in a ring of spatial frequencies around the stripes'.

    Diagonal stripes with `period` px along x repeat every period/sqrt(2) px across the stripes, a
    radial frequency of sqrt(2) * W / period cycles per image (11.3 at 64 px). Plain scenes keep
    most of their energy at low frequencies (a shape's edges fall off as 1/f), so they score near 0;
    the stripes set scores around 0.5. The ring is orientation-free, so horizontal or vertical
    stripes of a similar period count too.
    """
    arr = as_array(img)
    h, w, _ = arr.shape
    # Summed over R, G and B: some stripes differ from their background in hue more than in brightness.
    spectrum = (np.abs(np.fft.fft2(arr - arr.mean(axis=(0, 1)), axes=(0, 1))) ** 2).sum(-1)
    fy = np.fft.fftfreq(h) * h  # cycles per image
    fx = np.fft.fftfreq(w) * w
    radius = np.hypot(fy[:, None], fx[None, :])
    centre = np.sqrt(2) * w / period
    ring = (radius > 0.7 * centre) & (radius < 1.4 * centre)
    total = spectrum.sum()
    return float(spectrum[ring].sum() / total) if total > 0 else 0.0


# -- outline ----------------------------------------------------------------------------------------

def _min_filter(arr: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    return np.lib.stride_tricks.sliding_window_view(np.pad(arr, radius, mode="edge"), (k, k)).min(axis=(-1, -2))


def _max_filter(arr: np.ndarray, radius: int) -> np.ndarray:
    k = 2 * radius + 1
    return np.lib.stride_tricks.sliding_window_view(np.pad(arr, radius, mode="edge"), (k, k)).max(axis=(-1, -2))


def outline_score(img, width: int = 7, depth: float = 50.0, border: int = 6) -> float:
    """Share of the image in thin dark lines, beyond what its emptiest border strip holds.

    Thin dark lines are found with a morphological black top-hat on brightness: closing (max filter,
    then min filter, over a `width`-px square) fills every dark line narrower than that, so pixels
    the closing brightens by more than `depth` (of 255) are in one. A black or dark shape is wider
    and is not filled; the edge between two flat colours is not brightened at all. Stripes are thin
    dark lines too, but they cover the whole image, so all four `border`-px strips along its edges
    hold them; an outline surrounds one shape and reaches at most one or two edges. The score is
    the line share of the whole image minus the line share of the emptiest strip (floored at 0).
    Plain scenes score ~0, the outline set several percent. It reads the softened, slightly grey
    outlines a model draws, which a fixed "darker than 70" rule did not.
    """
    brightness = as_array(img).mean(axis=-1)
    radius = width // 2
    in_line = (_min_filter(_max_filter(brightness, radius), radius) - brightness) > depth
    strips = (in_line[:border], in_line[-border:], in_line[:, :border], in_line[:, -border:])
    return float(max(0.0, in_line.mean() - min(strip.mean() for strip in strips)))


# -- pastel ---------------------------------------------------------------------------------------

def pastel_score(img, min_value: float = 0.8, saturation: tuple[float, float] = (0.15, 0.6)) -> float:
    """Fraction of pixels that are light and softly coloured: HSV value > 0.8, saturation 0.15..0.6.

    Pure colours are saturated (S ~ 0.8-0.9), white, grey and black have no saturation, and the
    stripes' colours are darker than 0.8, so only the pastel tints (S ~ 0.35, V ~ 0.95) count.
    """
    arr = as_array(img) / 255.0
    value = arr.max(-1)
    chroma = value - arr.min(-1)
    sat = np.where(value > 0, chroma / np.maximum(value, 1e-6), 0.0)
    is_pastel = (value > min_value) & (sat > saturation[0]) & (sat < saturation[1])
    return float(is_pastel.mean())


# -- content: which colour is the shape, what shape is it ------------------------------------------

# The colours a pixel can be named. Each pastel tint is named by its pure colour, so content reads
# the same with or without the pastel style; grey catches the stripes on white and blurred edges.
_PALETTE = {name: [rgb, pastel(rgb)] for name, rgb in COLOURS.items() if name not in ("white", "black")}
_PALETTE.update(white=[COLOURS["white"]], black=[COLOURS["black"]], gray=[(128, 128, 128)])
_NAMES = [name for name, rgbs in _PALETTE.items() for _ in rgbs]
_RGB = np.asarray([rgb for rgbs in _PALETTE.values() for rgb in rgbs], dtype=np.float32)


def _nearest(arr: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (Euclidean RGB) of every pixel."""
    dist = ((arr[..., None, :] - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def colour_names(img) -> np.ndarray:
    """HxW array of colour names (the nearest palette colour of each pixel)."""
    return np.asarray(_NAMES)[_nearest(as_array(img), _RGB)]


def shape_mask(img, border: int = 3, min_share: float = 0.15) -> np.ndarray:
    """Boolean HxW mask of the pixels that are not background-coloured.

    The background colours are those covering at least `min_share` of a `border`-px frame around
    the image (one colour for plain backgrounds, two for striped ones). Scenes keep the shape away
    from the frame, so the frame is background.
    """
    names = colour_names(img)
    frame = np.ones(names.shape, dtype=bool)
    frame[border:-border, border:-border] = False
    values, counts = np.unique(names[frame], return_counts=True)
    background = values[counts >= min_share * frame.sum()]
    return ~np.isin(names, background)


def content_scores(img, ignore: tuple[str, ...] = ()) -> dict[str, float]:
    """{colour name: share of the shape's pixels} (empty if nothing stands out from the background).

    Pass ignore=("black",) on outlined images so the outline does not count as the shape's colour.
    """
    names = colour_names(img)[shape_mask(img)]
    names = names[~np.isin(names, ignore)]
    if names.size == 0:
        return {}
    values, counts = np.unique(names, return_counts=True)
    order = np.argsort(-counts)
    return {str(values[i]): float(counts[i] / names.size) for i in order}


def dominant_colour(img, ignore: tuple[str, ...] = ()) -> str | None:
    """The colour name covering most of the shape region, or None if there is no shape."""
    scores = content_scores(img, ignore)
    return next(iter(scores), None)


def background_colour(img, border: int = 3) -> str:
    """The most common colour name in a `border`-px frame around the image."""
    names = colour_names(img)
    frame = np.ones(names.shape, dtype=bool)
    frame[border:-border, border:-border] = False
    values, counts = np.unique(names[frame], return_counts=True)
    return str(values[counts.argmax()])


def shape_of(img) -> str | None:
    """Guess the shape from the fraction of its bounding box it fills.

    A square fills all of its box, a circle pi/4 = 0.79, an upright triangle 1/2. The box is taken
    between the 2nd and 98th percentile of the mask's coordinates so stray pixels do not stretch it;
    that trims the box a little, so on the dataset's images the fills measure ~1.0 (square),
    0.80-0.90 (circle) and 0.63-0.69 (triangle), and the thresholds sit between those.
    """
    mask = shape_mask(img)
    ys, xs = np.nonzero(mask)
    if ys.size < 9:
        return None
    y0, y1 = np.percentile(ys, [2, 98])
    x0, x1 = np.percentile(xs, [2, 98])
    box = (y1 - y0 + 1) * (x1 - x0 + 1)
    fill = mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].sum() / box
    if fill > 0.94:
        return "square"
    if fill > 0.75:
        return "circle"
    return "triangle"
