"""Image geometry shared by the node, ``moog_infer`` and the demo: input pixels <-> model pixels.

A camera frame of any size is mapped onto the model canvas by one of three explicit aspect
policies:

- ``'crop'``: scale so the model canvas is covered, then centre-crop (loses the image borders of
  the longer side; no distortion; the default).
- ``'pad'``: scale so the whole image fits, then centre it on a black canvas (keeps everything;
  the model sees black bars, outputs there are invalid).
- ``'stretch'``: scale each axis independently (keeps everything, distorts the aspect).

Every policy is one axis-aligned affine map per axis, ``model = input * scale + offset``, in the
project's pixel convention (pixel centres at integer coordinates, see ``docs/architecture.md``).
:class:`FrameGeometry` stores the integer crop rectangle in the input and the integer rectangle it
lands on in the model canvas, so warping an image (crop view + one ``cv2.resize``), mapping points
and boxes both ways, un-warping a depth map and scaling camera intrinsics all agree exactly.

The overlay renderer used for the ``overlay`` topic and the bag tool lives here too: it draws in
input pixels with OpenCV and needs nothing from ROS.
"""
from __future__ import annotations

from collections.abc import Sequence
import colorsys
from dataclasses import dataclass
import functools

import cv2
import numpy as np

RESIZE_MODES = ('crop', 'pad', 'stretch')


def _resize_interpolation(src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> int:
    """INTER_AREA when shrinking (anti-aliased), INTER_LINEAR otherwise (AREA blocks on zoom)."""
    shrinking = dst_wh[0] <= src_wh[0] and dst_wh[1] <= src_wh[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


@dataclass(frozen=True)
class FrameGeometry:
    """How one input resolution maps onto the model canvas (see the module docstring).

    Attributes:
        input_wh: input image size ``(width, height)`` in pixels.
        model_wh: model canvas size ``(width, height)`` in pixels.
        mode: one of :data:`RESIZE_MODES`.
        crop_xywh: the input rectangle the model sees ``(x0, y0, w, h)``, integer pixel edges.
        place_xywh: where that rectangle lands on the model canvas ``(x0, y0, w, h)``.
    """

    input_wh: tuple[int, int]
    model_wh: tuple[int, int]
    mode: str
    crop_xywh: tuple[int, int, int, int]
    place_xywh: tuple[int, int, int, int]

    @classmethod
    def fit(cls, input_wh: Sequence[int], model_wh: Sequence[int], mode: str) -> FrameGeometry:
        """Builds the geometry that maps ``input_wh`` onto ``model_wh`` under ``mode``.

        Raises:
            ValueError: unknown mode or a non-positive size.
        """
        Wi, Hi = (int(v) for v in input_wh)
        Wm, Hm = (int(v) for v in model_wh)
        if mode not in RESIZE_MODES:
            raise ValueError(f'resize mode: expected one of {RESIZE_MODES}, got {mode!r}')
        if min(Wi, Hi) <= 0:
            raise ValueError(f'input size must be positive, got {Wi}x{Hi}')
        if min(Wm, Hm) <= 0:
            raise ValueError(f'model size must be positive, got {Wm}x{Hm}')
        crop = (0, 0, Wi, Hi)
        place = (0, 0, Wm, Hm)
        if mode == 'crop':
            # The scale that covers the canvas; the crop is rounded to whole input pixels so the
            # warp is a plain slice (no sub-pixel shift) and the map stays exact.
            scale = max(Wm / Wi, Hm / Hi)
            cw = min(Wi, max(1, round(Wm / scale)))
            ch = min(Hi, max(1, round(Hm / scale)))
            crop = ((Wi - cw) // 2, (Hi - ch) // 2, cw, ch)
        elif mode == 'pad':
            scale = min(Wm / Wi, Hm / Hi)
            pw = min(Wm, max(1, round(Wi * scale)))
            ph = min(Hm, max(1, round(Hi * scale)))
            place = ((Wm - pw) // 2, (Hm - ph) // 2, pw, ph)
        return cls((Wi, Hi), (Wm, Hm), mode, crop, place)

    # ----------------------------------------------------------------------------------------
    # The affine map. model = input * scale + offset, per axis, pixel centres at integers:
    # the centre of input pixel cx0 + i (edge at cx0 + i) lands on model pixel px0 + (i + 0.5) *
    # scale - 0.5, hence offset = (0.5 - cx0) * scale - 0.5 + px0.
    # ----------------------------------------------------------------------------------------

    @property
    def scale_xy(self) -> np.ndarray:
        """Model pixels per input pixel ``[2]`` (x, y)."""
        return np.array([self.place_xywh[2] / self.crop_xywh[2],
                         self.place_xywh[3] / self.crop_xywh[3]])

    @property
    def offset_xy(self) -> np.ndarray:
        """Offset ``[2]`` of the map ``model = input * scale + offset``, in model pixels."""
        scale = self.scale_xy
        crop0 = np.array(self.crop_xywh[:2], dtype=np.float64)
        place0 = np.array(self.place_xywh[:2], dtype=np.float64)
        return (0.5 - crop0) * scale - 0.5 + place0

    def affine_to_model(self) -> np.ndarray:
        """``[3, 3]`` homogeneous matrix taking input pixels to model pixels."""
        (sx, sy), (bx, by) = self.scale_xy, self.offset_xy
        return np.array([[sx, 0.0, bx], [0.0, sy, by], [0.0, 0.0, 1.0]])

    def to_model_xy(self, xy_input: np.ndarray) -> np.ndarray:
        """Maps points ``[..., 2]`` from input pixels to model pixels (float32)."""
        xy = np.asarray(xy_input, dtype=np.float64)
        return (xy * self.scale_xy + self.offset_xy).astype(np.float32)

    def to_input_xy(self, xy_model: np.ndarray) -> np.ndarray:
        """Maps points ``[..., 2]`` from model pixels back to input pixels (float32)."""
        xy = np.asarray(xy_model, dtype=np.float64)
        return ((xy - self.offset_xy) / self.scale_xy).astype(np.float32)

    def to_model_xyxy(self, xyxy_input: np.ndarray) -> np.ndarray:
        """Maps boxes ``[..., 4]`` (xyxy) from input to model pixels (float32)."""
        xyxy = np.asarray(xyxy_input, dtype=np.float64)
        return self.to_model_xy(xyxy.reshape(*xyxy.shape[:-1], 2, 2)).reshape(xyxy.shape)

    def to_input_xyxy(self, xyxy_model: np.ndarray) -> np.ndarray:
        """Maps boxes ``[..., 4]`` (xyxy) from model to input pixels (float32)."""
        xyxy = np.asarray(xyxy_model, dtype=np.float64)
        return self.to_input_xy(xyxy.reshape(*xyxy.shape[:-1], 2, 2)).reshape(xyxy.shape)

    def input_in_view(self, xy_input: np.ndarray) -> np.ndarray:
        """bool ``[...]``: input-pixel points inside the part of the input the model sees."""
        xy = np.asarray(xy_input, dtype=np.float64)
        x0, y0, w, h = self.crop_xywh
        # The crop covers pixel edges [x0, x0 + w]: centre coordinates [x0 - 0.5, x0 + w - 0.5].
        with np.errstate(invalid='ignore'):
            return ((xy[..., 0] >= x0 - 0.5) & (xy[..., 0] <= x0 + w - 0.5)
                    & (xy[..., 1] >= y0 - 0.5) & (xy[..., 1] <= y0 + h - 0.5))

    # ----------------------------------------------------------------------------------------
    # Pixels.
    # ----------------------------------------------------------------------------------------

    def warp(self, image: np.ndarray) -> np.ndarray:
        """Maps an input image ``[Hi, Wi, C]`` (or ``[Hi, Wi]``) onto the model canvas.

        The crop is a view (no copy); exactly one resize happens; pad bars are zeros.
        """
        Wi, Hi = self.input_wh
        if image.shape[:2] != (Hi, Wi):
            raise ValueError(f'warp: geometry is for {Wi}x{Hi} input, got image of shape '
                             f'{list(image.shape)}')
        cx, cy, cw, ch = self.crop_xywh
        px, py, pw, ph = self.place_xywh
        region = image[cy:cy + ch, cx:cx + cw]
        if (cw, ch) != (pw, ph):
            region = cv2.resize(region, (pw, ph),
                                interpolation=_resize_interpolation((cw, ch), (pw, ph)))
        if (pw, ph) == self.model_wh:
            return np.ascontiguousarray(region)
        Wm, Hm = self.model_wh
        canvas = np.zeros((Hm, Wm, *image.shape[2:]), dtype=image.dtype)
        canvas[py:py + ph, px:px + pw] = region
        return canvas

    def model_valid_mask(self) -> np.ndarray:
        """bool ``[Hm, Wm]``: model pixels that show image content (False on pad bars)."""
        Wm, Hm = self.model_wh
        px, py, pw, ph = self.place_xywh
        mask = np.zeros((Hm, Wm), dtype=bool)
        mask[py:py + ph, px:px + pw] = True
        return mask

    def unwarp(self, model_map: np.ndarray) -> np.ndarray:
        """Maps a float map ``[Hm, Wm]`` (e.g. depth) back to the input resolution ``[Hi, Wi]``.

        Input pixels the model never saw (cropped away) are NaN, as are the pixels whose
        bilinear neighbourhood touches a NaN in the model map.
        """
        Wm, Hm = self.model_wh
        if model_map.shape != (Hm, Wm):
            raise ValueError(f'unwarp: geometry is for a {Wm}x{Hm} model map, got shape '
                             f'{list(model_map.shape)}')
        cx, cy, cw, ch = self.crop_xywh
        px, py, pw, ph = self.place_xywh
        region = model_map[py:py + ph, px:px + pw]
        if (cw, ch) != (pw, ph):
            # Linear, not AREA: AREA would average NaNs into a wider invalid border on shrink.
            region = cv2.resize(region, (cw, ch), interpolation=cv2.INTER_LINEAR)
        if (cw, ch) == self.input_wh:
            return np.ascontiguousarray(region)
        Wi, Hi = self.input_wh
        out = np.full((Hi, Wi), np.nan, dtype=model_map.dtype)
        out[cy:cy + ch, cx:cx + cw] = region
        return out

    def scale_intrinsics(self, K: np.ndarray) -> np.ndarray:
        """Intrinsics of the model canvas: ``A @ K`` for ``[3, 3]`` K or ``[3, 4]`` P.

        A pinhole projection followed by the per-axis affine map is again a pinhole projection,
        so ``fx, fy`` scale and ``cx, cy`` follow the same map as any pixel (crop offset included).
        """
        K = np.asarray(K, dtype=np.float64)
        if K.shape not in ((3, 3), (3, 4)):
            raise ValueError(f'scale_intrinsics: expected [3, 3] or [3, 4], got {list(K.shape)}')
        return self.affine_to_model() @ K


def sample_bilinear(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Samples a float map ``[H, W]`` at points ``[N, 2]`` (pixel centres at integers).

    Points outside ``[0, W-1] x [0, H-1]`` take the nearest border value; NaN in any of the
    four neighbours gives NaN, as does a non-finite point. Returns float32 ``[N]``.
    """
    xy = np.asarray(xy, dtype=np.float32).reshape(-1, 2)
    if not len(xy):
        return np.zeros(0, np.float32)
    finite = np.isfinite(xy).all(axis=1)
    coords = np.where(finite[:, None], xy, 0.0).astype(np.float32)
    # cv2.remap shares the convention (integer = pixel centre); one C call, not 20 numpy ones.
    out = cv2.remap(np.ascontiguousarray(image, dtype=np.float32), coords[:, :1], coords[:, 1:],
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[:, 0]
    out[~finite] = np.nan
    return out


# ------------------------------------------------------------------------------------------------
# Overlay rendering (input pixels, RGB).
# ------------------------------------------------------------------------------------------------

_GOLDEN_RATIO = 0.618033988749895


@functools.lru_cache(maxsize=4096)
def id_colour(track_id: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour (0-255) for a track id; the same in overlay and markers."""
    # Golden-ratio hue steps keep consecutive ids far apart on the colour wheel.
    r, g, b = colorsys.hsv_to_rgb((int(track_id) * _GOLDEN_RATIO) % 1.0, 0.86, 1.0)
    return round(255 * r), round(255 * g), round(255 * b)


def draw_overlay(
    rgb: np.ndarray,
    track_ids: np.ndarray,
    tracks_xy: np.ndarray,
    tracks_visible: np.ndarray,
    trails_xy: np.ndarray | Sequence[np.ndarray] | None,
    box_ids: np.ndarray,
    boxes_xyxy: np.ndarray,
    box_labels: Sequence[str] | None = None,
    box_scores: np.ndarray | None = None,
    label_tracks: bool = True,
) -> np.ndarray:
    """Draws point tracks (dot + trail + id) and boxes (rectangle + id) on a copy of ``rgb``.

    Args:
        rgb: uint8 ``[H, W, 3]`` input image.
        track_ids: uint32 ``[N]``.
        tracks_xy: ``[N, 2]`` input pixels.
        tracks_visible: bool ``[N]``; occluded tracks are drawn hollow.
        trails_xy: per track ``[L, 2]`` recent positions (oldest first, NaN gaps skipped), as
            an ``[N, L, 2]`` array or a sequence, or None.
        box_ids: uint32 ``[M]``.
        boxes_xyxy: ``[M, 4]`` input pixels.
        box_labels: optional class label per box (drawn after the id).
        box_scores: optional presence probability per box.
        label_tracks: write each track's id next to its dot.

    Returns:
        uint8 ``[H, W, 3]`` annotated copy.
    """
    out = np.ascontiguousarray(rgb).copy()
    H, W = out.shape[:2]
    # Line widths grow with the image so the overlay stays legible at 1080p and at 128 px.
    thickness = max(1, round(min(H, W) / 240))
    radius = thickness + 2
    font_scale = 0.35 * thickness
    ids = np.asarray(track_ids).tolist()
    xy = np.asarray(tracks_xy, dtype=np.float64).reshape(-1, 2)
    # Per-track work in the loop is only OpenCV calls: rounding and masks are done up front.
    finite = np.isfinite(xy).all(axis=1)
    centres = np.round(np.where(finite[:, None], xy, 0.0)).astype(np.int32).tolist()
    for k, track_id in enumerate(ids):
        colour = id_colour(track_id)
        if trails_xy is not None and len(trails_xy[k]) > 1:
            trail = np.asarray(trails_xy[k])
            trail = trail[np.isfinite(trail).all(axis=1)]
            if len(trail) > 1:
                cv2.polylines(out, [np.round(trail).astype(np.int32)], False, colour,
                              thickness, cv2.LINE_AA)
        if not finite[k]:
            continue
        centre = centres[k]
        cv2.circle(out, centre, radius, colour, -1 if tracks_visible[k] else thickness,
                   cv2.LINE_AA)
        if label_tracks:
            cv2.putText(out, str(track_id), (centre[0] + radius + 1, centre[1] - radius - 1),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.8 * font_scale, colour,
                        max(1, thickness // 2), cv2.LINE_AA)
    for k, box_id in enumerate(np.asarray(box_ids).tolist()):
        x0, y0, x1, y1 = boxes_xyxy[k]
        if not np.isfinite([x0, y0, x1, y1]).all():
            continue
        colour = id_colour(box_id)
        cv2.rectangle(out, (round(float(x0)), round(float(y0))),
                      (round(float(x1)), round(float(y1))), colour, thickness + 1, cv2.LINE_AA)
        text = f'#{box_id}'
        if box_labels is not None and box_labels[k]:
            text += f' {box_labels[k]}'
        if box_scores is not None:
            text += f' {float(box_scores[k]):.2f}'
        origin = (round(float(x0)), max(round(float(y0)) - 3 * thickness, 10 * thickness))
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale, colour, thickness,
                    cv2.LINE_AA)
    return out
