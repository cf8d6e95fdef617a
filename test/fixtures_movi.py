"""A tiny, geometrically exact MOVi-shaped TFDS record for the MOVi reader tests.

The scene is ray cast analytically (no renderer), so every field the reader decodes has a known
true value: a fronto-parallel backdrop plane (z-depth exactly ``PLANE_Z``), one moving axis-aligned
box (instance 0, front face at z-depth exactly ``BOX_FRONT_Z``) and one box hidden behind the
plane (instance 1, zero visible frames, so its ragged box rows are empty). The camera translates
and is rolled about its optical axis, which keeps the plane fronto-parallel while exercising the
quaternion and the GL -> OpenCV axis conversion.

Keys, dtypes and encodings follow the MOVi-E table in ``shared/notes/data.md`` (section 1.2):
PNG frames (8-bit RGB video, 8-bit grey segmentation, 16-bit grey depth, 16-bit RGB normals and
object coordinates), raw int64 flows, flattened per-instance floats, ragged boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from moog_ros.training import movi

SIZE = 32  # H = W
FRAMES = 4
FOCAL_MM, SENSOR_MM = 35.0, 32.0
F_PX = FOCAL_MM / SENSOR_MM * SIZE  # 35 px
C_PX = (SIZE - 1) / 2  # principal point, integer pixel centres
PLANE_Z = 5.0  # backdrop plane at world z = -5; the camera looks down -z from z = 0
BOX_SIZE = np.array([1.0, 0.8, 0.6])
BOX_FRONT_Z = 3.0 - BOX_SIZE[2] / 2  # box centre at z = -3
ROLL = np.deg2rad(15.0)


@dataclass
class Scene:
    """Ground truth of the fixture video (all frames)."""

    camera_position: np.ndarray  # [S, 3] world
    camera_rotation: np.ndarray  # [3, 3] camera-to-world (GL axes), the same for every frame
    box_centres: np.ndarray  # [2, S, 3] world, instances 0 and 1
    range_m: np.ndarray  # [S, H, W] distance to the camera centre
    depth_z: np.ndarray  # [S, H, W] z-depth
    segmentation: np.ndarray  # [S, H, W] uint8
    object_coordinates: np.ndarray  # [S, H, W, 3] uint16
    video: np.ndarray  # [S, H, W, 3] uint8
    boxes_xyxy: np.ndarray  # [2, S, 4] pixel edges of the masks (instance 1: zeros)
    boxes_valid: np.ndarray  # [2, S]


def camera_rays(xy: np.ndarray) -> np.ndarray:
    """GL-camera ray directions (unnormalised, z = -1) for pixel coordinates ``[..., 2]``."""
    x, y = xy[..., 0], xy[..., 1]
    return np.stack([(x - C_PX) / F_PX, -(y - C_PX) / F_PX, -np.ones_like(x)], axis=-1)


def rotation() -> np.ndarray:
    c, s = np.cos(ROLL), np.sin(ROLL)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def scene_state(num_frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """Camera positions ``[S, 3]`` and box centres ``[2, S, 3]``."""
    t = np.arange(num_frames, dtype=np.float64)
    camera = np.stack([0.1 * t, 0.05 * t, np.zeros_like(t)], axis=-1)
    box0 = np.stack([-0.3 + 0.15 * t, 0.1 + 0.0 * t, np.full_like(t, -3.0)], axis=-1)
    box1 = np.stack([0.2 + 0.0 * t, 0.0 * t, np.full_like(t, -8.0)], axis=-1)  # behind the plane
    return camera, np.stack([box0, box1])


def cast(origin: np.ndarray, directions: np.ndarray, box_centre: np.ndarray) -> tuple:
    """Hit distance (along unit rays), segment id and box-local coordinates for rays ``[..., 3]``.

    Only the front (+z) face of the box can be seen from the camera, which looks down -z.
    """
    unit = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    t_plane = (-PLANE_Z - origin[2]) / unit[..., 2]
    front = box_centre[2] + BOX_SIZE[2] / 2
    t_box = (front - origin[2]) / unit[..., 2]
    hit = origin + unit * t_box[..., None]
    local = (hit - box_centre) / BOX_SIZE  # in [-0.5, 0.5] on the box
    on_box = (np.abs(local[..., 0]) <= 0.5) & (np.abs(local[..., 1]) <= 0.5) & (t_box > 0)
    distance = np.where(on_box, t_box, t_plane)
    return distance, on_box, local


def build_scene(num_frames: int = FRAMES) -> Scene:
    camera, boxes = scene_state(num_frames)
    R = rotation()
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    rays_cam = camera_rays(np.stack([xs, ys], axis=-1))  # [H, W, 3]
    rays_world = rays_cam @ R.T
    S, H, W = num_frames, SIZE, SIZE
    range_m = np.zeros((S, H, W))
    seg = np.zeros((S, H, W), np.uint8)
    local_u16 = np.zeros((S, H, W, 3), np.uint16)
    for t in range(S):
        distance, on_box, local = cast(camera[t], rays_world, boxes[0, t])
        range_m[t] = distance
        seg[t][on_box] = 1
        local_u16[t][on_box] = np.round((local[on_box] + 0.5) * 65535).astype(np.uint16)
    depth_z = range_m / np.linalg.norm(rays_cam, axis=-1)  # |ray| with z = -1 is range / z
    # Colours: a checkerboard on the plane, the object coordinates on the box.
    checker = (((xs // 4 + ys // 4) % 2) * 120 + 60).astype(np.uint8)
    video = np.repeat(checker[None, :, :, None], S, 0).repeat(3, -1).copy()
    video[seg == 1] = (local_u16[seg == 1] // 257).astype(np.uint8)
    boxes_xyxy = np.zeros((2, S, 4))
    valid = np.zeros((2, S), bool)
    for t in range(S):
        rows, cols = np.nonzero(seg[t] == 1)
        if rows.size:
            boxes_xyxy[0, t] = [cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5,
                                rows.max() + 0.5]
            valid[0, t] = True
    return Scene(camera, R, boxes, range_m, depth_z, seg, local_u16, video, boxes_xyxy, valid)


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]  # OpenCV writes BGR
    ok, buf = cv2.imencode('.png', image)
    assert ok
    return buf.tobytes()


def _quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    w = np.sqrt(max(0.0, 1 + np.trace(R))) / 2
    return np.array([w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w),
                     (R[1, 0] - R[0, 1]) / (4 * w)])


def box_corners(centre: np.ndarray) -> np.ndarray:
    """World corners ``[8, 3]`` in ``itertools.product`` order over x, y, z of low/high."""
    lo, hi = centre - BOX_SIZE / 2, centre + BOX_SIZE / 2
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                     for z in (lo[2], hi[2])])


def movi_features(scene: Scene) -> dict:
    """The flattened TFDS feature dict of the scene (MOVi-E keys)."""
    S, H, W = scene.range_m.shape
    K = 2
    dmin, dmax = float(scene.range_m.min()), float(scene.range_m.max())
    depth_u16 = np.round((scene.range_m - dmin) / (dmax - dmin) * 65535).astype(np.uint16)
    normals = np.zeros((S, H, W, 3), np.uint16)
    normals[..., 2] = 65535  # every visible surface faces +z
    normals[..., :2] = 32768
    flat_boxes, box_frames, rows = [], [], []
    for k in range(K):
        frames = [t for t in range(S) if (scene.segmentation[t] == k + 1).any()]
        rows.append(len(frames))
        for t in frames:
            ys, xs = np.nonzero(scene.segmentation[t] == k + 1)
            flat_boxes.append([ys.min() / H, xs.min() / W, (ys.max() + 1) / H, (xs.max() + 1) / W])
            box_frames.append(t)
    quat = _quaternion_wxyz(scene.camera_rotation)
    visibility = np.stack([(scene.segmentation == k + 1).sum(axis=(1, 2)) for k in range(K)])
    return {
        'video': [_png(f) for f in scene.video],
        'segmentations': [_png(f) for f in scene.segmentation],
        'depth': [_png(f) for f in depth_u16],
        'normal': [_png(f) for f in normals],
        'object_coordinates': [_png(f) for f in scene.object_coordinates],
        'forward_flow': np.zeros((S, H, W, 2), np.int64),
        'backward_flow': np.zeros((S, H, W, 2), np.int64),
        'metadata/video_name': b'fixture_0',
        'metadata/width': np.array([W]), 'metadata/height': np.array([H]),
        'metadata/num_frames': np.array([S]), 'metadata/num_instances': np.array([K]),
        'metadata/depth_range': np.array([dmin, dmax], np.float32),
        'metadata/forward_flow_range': np.array([-1.0, 1.0], np.float32),
        'metadata/backward_flow_range': np.array([-1.0, 1.0], np.float32),
        'background': b'fixture_hdri',
        'camera/focal_length': np.array([FOCAL_MM], np.float32),
        'camera/sensor_width': np.array([SENSOR_MM], np.float32),
        'camera/field_of_view': np.array([2 * np.arctan(SENSOR_MM / 2 / FOCAL_MM)], np.float32),
        'camera/positions': scene.camera_position.astype(np.float32),
        'camera/quaternions': np.tile(quat, (S, 1)).astype(np.float32),
        'instances/asset_id': [b'box_a', b'box_b'],
        'instances/category': np.array([3, 5]),
        'instances/is_dynamic': np.array([1, 0]),
        'instances/mass': np.ones(K, np.float32),
        'instances/scale': np.ones(K, np.float32),
        'instances/positions': scene.box_centres.astype(np.float32),
        'instances/quaternions': np.tile([1.0, 0, 0, 0], (K, S, 1)).astype(np.float32),
        'instances/bboxes_3d': np.stack([[box_corners(c) for c in scene.box_centres[k]]
                                         for k in range(K)]).astype(np.float32),
        'instances/visibility': visibility,
        'instances/bboxes/ragged_flat_values': np.array(flat_boxes, np.float32).reshape(-1),
        'instances/bboxes/ragged_row_lengths_0': np.array(rows),
        'instances/bbox_frames/ragged_flat_values': np.array(box_frames),
        'instances/bbox_frames/ragged_row_lengths_0': np.array(rows),
        'events/collisions/instances': np.zeros(0, np.int64),
        'events/collisions/frame': np.zeros(0, np.int64),
        'events/collisions/force': np.zeros(0, np.float32),
    }


def write_movi_shard(path: Path, num_videos: int = 1, num_frames: int = FRAMES) -> Scene:
    """Write ``num_videos`` copies of the fixture video as one TFRecord shard."""
    scene = build_scene(num_frames)
    record = movi.encode_example(movi_features(scene))
    movi.write_tfrecord(path, [record] * num_videos)
    return scene


def unproject(xy: np.ndarray, t: int, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray cast pixel positions ``[N, 2]`` of frame ``t``: (segment id, world point, box-local)."""
    rays = camera_rays(xy) @ scene.camera_rotation.T
    distance, on_box, local = cast(scene.camera_position[t], rays, scene.box_centres[0, t])
    unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    world = scene.camera_position[t] + unit * distance[..., None]
    return on_box.astype(int), world, local


def project(world: np.ndarray, t: int, scene: Scene) -> np.ndarray:
    """Pixel coordinates ``[..., 2]`` of world points ``[..., 3]`` in frame ``t``."""
    p = (world - scene.camera_position[t]) @ scene.camera_rotation  # GL camera coordinates
    return np.stack([F_PX * p[..., 0] / -p[..., 2] + C_PX, -F_PX * p[..., 1] / -p[..., 2] + C_PX],
                    axis=-1)


def explain_track(track_xy: np.ndarray, scene: Scene, frames: np.ndarray) -> tuple[int, float]:
    """Which surface a track follows and how well: (0 background / 1 box, max error in px).

    The track's position in its first frame is cast onto the backdrop plane and onto the box's
    front face; each hypothesis (static world point, or box-local point moving with the box) is
    projected into every frame, occluded or not, and the better one is returned.
    """
    rays = camera_rays(track_xy[0]) @ scene.camera_rotation.T
    origin = scene.camera_position[frames[0]]
    plane_point = origin + rays * ((-PLANE_Z - origin[2]) / rays[2])
    centre0 = scene.box_centres[0, frames[0]]
    front = origin + rays * ((centre0[2] + BOX_SIZE[2] / 2 - origin[2]) / rays[2])
    local = front - centre0
    errors = []
    for predict in (lambda t: plane_point, lambda t: scene.box_centres[0, t] + local):
        xy = np.stack([project(predict(int(t)), int(t), scene) for t in frames])
        errors.append(float(np.abs(xy - track_xy).max()))
    kind = int(np.argmin(errors))
    return kind, errors[kind]
