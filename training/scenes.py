"""Kubric-like (MOVi-E style) scenes, simulated and rendered on the CPU with pybullet.

A scene is a textured floor inside a textured dome, 3-10 objects of varied shapes (boxes,
spheres, cylinders, capsules, pybullet_data meshes) with procedural textures, tossed with random
velocities and falling under gravity, seen by a look-at camera that may move on a straight line
(as in MOVi-E). ``simulate_scene`` returns the rendered frames plus the exact camera and object
poses; ``training/generate.py`` turns that into ground truth (tracks, boxes) in the clip format.

Camera conventions (all verified by the plane test in ``test/test_generate.py``):

* pybullet's view matrix maps world points into an OpenGL camera (looks down -z, +y up). We store
  camera poses in the OpenCV optical convention the intrinsics use (x right, y down, z forward):
  ``cam_cv = diag(1, -1, -1) @ cam_gl``.
* TinyRenderer's ray for pixel (row r, col c) passes through raster point (x = c, y = r + 1),
  where the raster convention puts pixel centres at +0.5 (measured, see ``shared/notes/data.md``
  section 2.1). In the project convention (pixel centres at integer coordinates) the pixel sits
  at (c, r), so the principal point is ``cx = W / 2``, ``cy = H / 2 - 1``.
* The depth buffer value d in [0, 1] converts to metric z-depth with
  ``z = far * near / (far - (far - near) * d)``.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from dataclasses import dataclass
import functools
import math
import os
from pathlib import Path
import sys
import tempfile
from typing import Any

import numpy as np

__all__ = [
    'SceneConfig',
    'SceneRecording',
    'intrinsics_matrix',
    'look_at_gl',
    'make_texture',
    'pose_from_gl_view',
    'simulate_scene',
]

# Meshes from pybullet_data used when present (path relative to pybullet_data).
_NAMED_MESHES = (
    'duck.obj', 'teddy2_VHACD_CHs.obj', 'bunny.obj', 'objects/mug.obj', 'torus/torus_textured.obj',
    'toys/concave_box.obj', 'toys/prism.obj', 'toys/shape_sorter.obj',
)
_NUM_RANDOM_MESHES = 1000  # pybullet_data/random_urdfs/000..999: procedural blobs
_PRIMITIVES = ('box', 'sphere', 'cylinder', 'capsule')
# GL camera (x right, y up, z backward) -> OpenCV optical camera (x right, y down, z forward).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SceneConfig:
    """Everything that shapes a generated scene (saved in the generator's JSON).

    Distances are metres, angles degrees; ``(lo, hi)`` pairs are uniform sampling ranges.
    """

    width: int = 128
    height: int = 128
    num_frames: int = 24
    fps: float = 12.0
    substeps: int = 20  # physics steps per frame: 240 Hz at 12 fps, pybullet's default step
    num_objects: tuple[int, int] = (3, 10)  # inclusive
    object_size_m: tuple[float, float] = (0.6, 2.0)  # longest side of an object
    mesh_fraction: float = 0.5  # share of objects that are meshes rather than primitives
    spawn_half_extent_m: float = 2.5  # objects start above [-e, e]^2
    spawn_height_m: tuple[float, float] = (0.5, 3.0)
    toss_speed_m_s: float = 3.0  # horizontal speed bound, as Kubric's uniform(-4, 4) - position
    fov_deg: float = 49.13  # vertical field of view: Kubric's 35 mm lens on a 32 mm sensor
    near_m: float = 0.1
    far_m: float = 100.0
    camera_distance_m: tuple[float, float] = (6.0, 9.0)
    camera_elevation_deg: tuple[float, float] = (10.0, 60.0)
    camera_motion_prob: float = 0.8
    max_camera_move_m: float = 4.0
    dome_radius_m: float = 40.0
    texture_px: int = 64

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f'SceneConfig.{field}={getattr(self, field)!r}: {why}')

        check(self.width >= 8, 'width', 'images must be at least 8 pixels wide')
        check(self.height >= 8, 'height', 'images must be at least 8 pixels high')
        check(self.num_frames >= 1, 'num_frames', 'must be >= 1')
        check(self.fps > 0, 'fps', 'must be positive')
        check(self.substeps >= 1, 'substeps', 'must be >= 1')
        for name in ('num_objects', 'object_size_m', 'spawn_height_m', 'camera_distance_m',
                     'camera_elevation_deg'):
            lo, hi = getattr(self, name)
            check(0 <= lo <= hi, name, 'must be a (lo, hi) pair with 0 <= lo <= hi')
        check(self.num_objects[0] >= 1, 'num_objects', 'at least one object')
        check(0 < self.fov_deg < 180, 'fov_deg', 'must be in (0, 180)')
        check(0 < self.near_m < self.far_m, 'near_m', 'need 0 < near_m < far_m')
        check(self.camera_elevation_deg[1] < 89, 'camera_elevation_deg',
              'must stay below 89 degrees (the look-at up vector is world z)')
        check(self.camera_distance_m[1] + self.max_camera_move_m < self.dome_radius_m,
              'dome_radius_m', 'the camera must stay inside the dome')
        check(self.dome_radius_m * 2 < self.far_m, 'far_m', 'the dome must be inside far_m')
        check(0 <= self.camera_motion_prob <= 1, 'camera_motion_prob', 'must be in [0, 1]')
        check(0 <= self.mesh_fraction <= 1, 'mesh_fraction', 'must be in [0, 1]')

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SceneConfig:
        """Rebuild from ``dataclasses.asdict`` output (JSON turns tuples into lists)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f'SceneConfig: unknown field(s) {unknown}')
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class SceneRecording:
    """One simulated and rendered scene; object k is segmentation id k + 1."""

    video: np.ndarray  # [T, H, W, 3] uint8 RGB
    depth_m: np.ndarray  # [T, H, W] float32 z-depth, NaN where no geometry was hit
    segmentation: np.ndarray  # [T, H, W] uint16: 0 floor/dome, k + 1 object k
    floor_mask: np.ndarray  # [T, H, W] bool: pixels showing the floor plane z = 0
    intrinsics: np.ndarray  # [3, 3] float64, pixel centres at integer coordinates
    camera_pose: np.ndarray  # [T, 4, 4] float64 camera-to-world, OpenCV camera axes
    object_pose: np.ndarray  # [K, T, 4, 4] float64 object-to-world (rigid)
    object_kind: tuple[str, ...]  # [K] e.g. 'box', 'mesh:duck.obj'
    fps: float


def intrinsics_matrix(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole K of TinyRenderer for a vertical FOV, in the integer-pixel-centre convention."""
    focal_px = (height / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    # Half-pixel raster offset of TinyRenderer, see the module docstring.
    return np.array([[focal_px, 0.0, width / 2.0],
                     [0.0, focal_px, height / 2.0 - 1.0],
                     [0.0, 0.0, 1.0]])


def look_at_gl(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """World-to-camera matrix [4, 4] of an OpenGL look-at camera (as gluLookAt)."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    side = np.cross(forward, up)
    side = side / np.linalg.norm(side)
    true_up = np.cross(side, forward)
    view = np.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = side, true_up, -forward
    view[:3, 3] = -view[:3, :3] @ eye
    return view


def pose_from_gl_view(view: np.ndarray) -> np.ndarray:
    """Camera-to-world pose [4, 4] in OpenCV camera axes from a GL world-to-camera matrix."""
    return np.linalg.inv(_GL_TO_CV @ view)


# ---------------------------------------------------------------------------------------------
# Procedural textures (tileable, so floor and dome can repeat them)


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 3] float RGB in [0, 1] from random hue, saturation and value."""
    hue = rng.uniform(0, 1, count)
    sat = rng.uniform(0.2, 1.0, count)
    val = rng.uniform(0.35, 1.0, count)
    # HSV -> RGB, vectorised over the channel offsets of the standard formula.
    k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6.0) % 6.0
    return val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4.0 - k), 0, 1)


def make_texture(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """A tileable procedural texture [size, size, 3] uint8.

    Args:
        rng: randomness source.
        size: texture side in pixels.
        kind: 'solid', 'stripes', 'checker' or 'noise'; random when None.
    """
    kinds = ('solid', 'stripes', 'checker', 'noise')
    kind = kinds[rng.integers(len(kinds))] if kind is None else kind
    y, x = np.mgrid[0:size, 0:size] / size  # [S, S] in [0, 1)
    colours = _random_colours(rng, 3)
    if kind == 'solid':
        weight = np.zeros_like(x)
    elif kind == 'stripes':
        # Integer wave vectors keep every pattern periodic over the texture (tileable).
        kx, ky = rng.integers(-4, 5, 2)
        kx = kx if (kx, ky) != (0, 0) else 3
        weight = (np.sin(2 * np.pi * (kx * x + ky * y) + rng.uniform(0, 2 * np.pi)) > 0) * 1.0
    elif kind == 'checker':
        cells = int(rng.choice([2, 4, 8]))
        weight = ((np.floor(x * cells) + np.floor(y * cells)) % 2) * 1.0
    elif kind == 'noise':
        weight = np.zeros_like(x)
        for _ in range(8):
            kx, ky = rng.integers(-6, 7, 2)
            weight += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (kx * x + ky * y)
                                                     + rng.uniform(0, 2 * np.pi))
        weight = (weight - weight.min()) / max(float(np.ptp(weight)), 1e-6)
    else:
        raise ValueError(f'unknown texture kind {kind!r}; expected one of {kinds}')
    # Blend two colours by the pattern and a third one faintly by a smooth gradient field.
    rgb = colours[0] * (1 - weight[..., None]) + colours[1] * weight[..., None]
    shade = 0.15 * np.sin(2 * np.pi * (x + rng.uniform()))[..., None]
    rgb = np.clip(rgb + shade * (colours[2] - 0.5), 0, 1)
    grain = rng.normal(0, 0.03, rgb.shape)  # breaks up flat areas a little
    return np.clip((rgb + grain) * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Meshes


@functools.lru_cache(maxsize=64)
def _read_obj(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] and triangles [F, 3] (fan-triangulated) of a Wavefront OBJ file."""
    vertices, faces = [], []
    with open(path) as handle:
        for line in handle:
            if line.startswith('v '):
                vertices.append([float(v) for v in line.split()[1:4]])
            elif line.startswith('f '):
                # 'f a b c', 'f a/ta b/tb c/tc', 'f a//na ...'; negative indices count back.
                ids = [int(tok.split('/')[0]) for tok in line.split()[1:]]
                ids = [i - 1 if i > 0 else len(vertices) + i for i in ids]
                faces.extend([ids[0], ids[j], ids[j + 1]] for j in range(1, len(ids) - 1))
    if not vertices or not faces:
        raise ValueError(f'mesh {path} has no vertices or faces')
    return np.asarray(vertices), np.asarray(faces, dtype=np.int64)


def _unwrap_mesh(vertices: np.ndarray, faces: np.ndarray, uv_scale: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-corner vertices, smooth normals and box-projected UVs for a textured visual mesh.

    The pybullet_data meshes mostly lack UVs, so each triangle is projected onto the plane of
    its dominant normal axis (box mapping). Corners are unshared so every triangle keeps its own
    projection; normals are the area-weighted vertex normals so shading stays smooth.
    """
    corners = vertices[faces]  # [F, 3, 3]
    face_normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    vertex_normal = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(vertex_normal, faces[:, i], face_normal)
    vertex_normal /= np.maximum(np.linalg.norm(vertex_normal, axis=1, keepdims=True), 1e-12)
    axis = np.abs(face_normal).argmax(axis=1)  # [F]
    plane_axes = np.array([[1, 2], [0, 2], [0, 1]])[axis]  # [F, 2]
    uvs = np.take_along_axis(corners, plane_axes[:, None, :], axis=2) * uv_scale  # [F, 3, 2]
    return corners.reshape(-1, 3), vertex_normal[faces].reshape(-1, 3), uvs.reshape(-1, 2)


def _pybullet_data_path() -> Path | None:
    try:
        import pybullet_data
    except ImportError:
        return None
    return Path(pybullet_data.getDataPath())


@functools.lru_cache(maxsize=1)
def _mesh_catalogue() -> tuple[str, ...]:
    """Mesh files (relative to pybullet_data) that exist in this installation."""
    root = _pybullet_data_path()
    if root is None:
        return ()
    names = [*_NAMED_MESHES,
             *(f'random_urdfs/{i:03d}/{i:03d}.obj' for i in range(_NUM_RANDOM_MESHES))]
    return tuple(name for name in names if (root / name).is_file())


# ---------------------------------------------------------------------------------------------
# pybullet plumbing


@contextlib.contextmanager
def _quiet_output():
    """Silence pybullet's chatter (its banner goes to fd 2 with C stdio, other notes to fd 1).

    Only wraps import and connect; errors still surface as Python exceptions.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    libc = ctypes.CDLL(None)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        yield
    finally:
        libc.fflush(None)  # drain C buffers while the fds still point to /dev/null
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _import_pybullet():
    with _quiet_output():
        import pybullet
    return pybullet


class _Builder:
    """Creates bodies in one pybullet client; keeps the ids that segmentation needs."""

    def __init__(self, pb, client: int, texture_dir: Path, rng: np.random.Generator,
                 cfg: SceneConfig) -> None:
        self.pb, self.client, self.rng, self.cfg = pb, client, rng, cfg
        self.texture_dir = texture_dir
        self.num_textures = 0

    def texture(self, kind: str | None = None) -> int:
        image = make_texture(self.rng, self.cfg.texture_px, kind)
        path = self.texture_dir / f'tex{self.num_textures}.png'
        self.num_textures += 1
        _write_png(path, image)
        return self.pb.loadTexture(str(path), physicsClientId=self.client)

    def static_mesh(self, vertices, indices, uvs, normals, texture: int,
                    collision: int = -1) -> int:
        pb = self.pb
        visual = pb.createVisualShape(pb.GEOM_MESH, vertices=vertices, indices=indices, uvs=uvs,
                                      normals=normals, physicsClientId=self.client)
        body = pb.createMultiBody(0, collision, visual, physicsClientId=self.client)
        pb.changeVisualShape(body, -1, textureUniqueId=texture, rgbaColor=[1, 1, 1, 1],
                             physicsClientId=self.client)
        return body

    def floor(self) -> int:
        half = self.cfg.dome_radius_m
        repeats = half / 2.0  # one texture tile per 4 m, so the floor shows perspective
        collision = self.pb.createCollisionShape(self.pb.GEOM_PLANE, physicsClientId=self.client)
        body = self.static_mesh(
            vertices=[[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]],
            indices=[0, 1, 2, 0, 2, 3],
            uvs=[[0, 0], [repeats, 0], [repeats, repeats], [0, repeats]],
            normals=[[0, 0, 1]] * 4, texture=self.texture(), collision=collision)
        friction = self.rng.uniform(0.4, 0.9)
        self.pb.changeDynamics(body, -1, lateralFriction=friction, restitution=0.3,
                               physicsClientId=self.client)
        return body

    def dome(self) -> int:
        """Hemisphere seen from inside (triangles wound inward; TinyRenderer culls back faces)."""
        rings, segments, radius = 8, 32, self.cfg.dome_radius_m
        elevation = np.linspace(0, np.pi / 2, rings + 1)[:, None]  # [R + 1, 1]
        azimuth = np.linspace(0, 2 * np.pi, segments + 1)[None, :]  # [1, S + 1]
        unit = np.stack(np.broadcast_arrays(np.cos(elevation) * np.cos(azimuth),
                                            np.cos(elevation) * np.sin(azimuth),
                                            np.sin(elevation)), axis=-1)
        repeats = float(self.rng.integers(2, 6))
        uv = np.stack(np.broadcast_arrays(repeats * azimuth / (2 * np.pi),
                                          2 * elevation / np.pi), axis=-1)
        a = (np.arange(rings)[:, None] * (segments + 1) + np.arange(segments)[None]).ravel()
        b, c = a + 1, a + segments + 1
        indices = np.stack([a, c + 1, b, a, c, c + 1], axis=1).ravel()
        return self.static_mesh(vertices=(radius * unit).reshape(-1, 3).tolist(),
                                indices=indices.tolist(), uvs=uv.reshape(-1, 2).tolist(),
                                normals=(-unit).reshape(-1, 3).tolist(), texture=self.texture())

    def shape(self) -> tuple[int, int, np.ndarray, str]:
        """A random object shape: (visual id, collision id, half extents [3] m, kind)."""
        pb, rng, cfg = self.pb, self.rng, self.cfg
        size = rng.uniform(*cfg.object_size_m)
        meshes = _mesh_catalogue()
        if not (meshes and rng.uniform() < cfg.mesh_fraction):
            kind = _PRIMITIVES[rng.integers(len(_PRIMITIVES))]
            return (*self._primitive(kind, size), kind)
        # Half the meshes from the named assets, half from the 1000 procedural blobs.
        named = [m for m in meshes if not m.startswith('random_urdfs/')]
        blobs = [m for m in meshes if m.startswith('random_urdfs/')]
        pick_named = bool(named) and (not blobs or rng.uniform() < 0.5)
        pool = named if pick_named else blobs
        name = pool[rng.integers(len(pool))]
        vertices, faces = _read_obj(str(_pybullet_data_path() / name))
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        # Centre on the bounding box (the body frame) and scale the longest side to `size`.
        vertices = (vertices - (lo + hi) / 2) * (size / (hi - lo).max())
        corners, normals, uvs = _unwrap_mesh(vertices, faces, uv_scale=rng.uniform(0.6, 1.5))
        visual = pb.createVisualShape(pb.GEOM_MESH, vertices=corners.tolist(),
                                      indices=list(range(len(corners))), uvs=uvs.tolist(),
                                      normals=normals.tolist(), physicsClientId=self.client)
        # Dynamic mesh bodies collide as the convex hull of their vertices.
        collision = pb.createCollisionShape(pb.GEOM_MESH, vertices=vertices.tolist(),
                                            physicsClientId=self.client)
        return visual, collision, (hi - lo) / 2 * (size / (hi - lo).max()), f'mesh:{name}'

    def body(self, visual: int, collision: int, half_extent: np.ndarray,
             position: np.ndarray) -> int:
        """A dynamic, textured body with random orientation, mass and contact properties."""
        pb, rng, client = self.pb, self.rng, self.client
        mass = float(np.prod(2 * half_extent)) * rng.uniform(0.3, 1.0)  # density x box volume
        quat = pb.getQuaternionFromEuler(rng.uniform(-np.pi, np.pi, 3).tolist())
        body = pb.createMultiBody(mass, collision, visual, basePosition=position.tolist(),
                                  baseOrientation=quat, physicsClientId=client)
        pb.changeVisualShape(body, -1, textureUniqueId=self.texture(), rgbaColor=[1, 1, 1, 1],
                             physicsClientId=client)
        pb.changeDynamics(body, -1, lateralFriction=rng.uniform(0.3, 0.9),
                          restitution=rng.uniform(0.1, 0.6), physicsClientId=client)
        return body

    def _primitive(self, kind: str, size: float) -> tuple[int, int, np.ndarray]:
        pb, rng, client = self.pb, self.rng, self.client
        if kind == 'box':
            half = size / 2 * np.concatenate([[1.0], rng.uniform(0.35, 1.0, 2)])
            half = rng.permutation(half)
            args = {'halfExtents': half.tolist()}
            return (pb.createVisualShape(pb.GEOM_BOX, **args, physicsClientId=client),
                    pb.createCollisionShape(pb.GEOM_BOX, **args, physicsClientId=client), half)
        if kind == 'sphere':
            radius = size / 2
            return (pb.createVisualShape(pb.GEOM_SPHERE, radius=radius, physicsClientId=client),
                    pb.createCollisionShape(pb.GEOM_SPHERE, radius=radius,
                                            physicsClientId=client),
                    np.full(3, radius))
        geom = pb.GEOM_CYLINDER if kind == 'cylinder' else pb.GEOM_CAPSULE
        radius = size / 2 * rng.uniform(0.3, 0.8)
        # Capsule length excludes its two hemispherical caps; keep the total at `size`.
        length = size if kind == 'cylinder' else max(size - 2 * radius, 0.05)
        visual = pb.createVisualShape(geom, radius=radius, length=length, physicsClientId=client)
        # createCollisionShape names the axis length `height` (createVisualShape: `length`).
        collision = pb.createCollisionShape(geom, radius=radius, height=length,
                                            physicsClientId=client)
        return visual, collision, np.array([radius, radius, size / 2])


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2  # training-only dependency; keeps `import training.scenes` light

    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f'could not write texture {path}')


def _sample_camera_path(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Start and end eye positions [3] on a MOVi-E-like shell around the origin."""

    def on_shell() -> np.ndarray:
        dist = rng.uniform(*cfg.camera_distance_m)
        elev = math.radians(rng.uniform(*cfg.camera_elevation_deg))
        azim = rng.uniform(0, 2 * math.pi)
        return dist * np.array([math.cos(elev) * math.cos(azim),
                                math.cos(elev) * math.sin(azim), math.sin(elev)])

    def in_shell(eye: np.ndarray) -> bool:
        dist = np.linalg.norm(eye)
        elev = math.degrees(math.asin(eye[2] / dist))
        lo_d, hi_d = cfg.camera_distance_m
        lo_e, hi_e = cfg.camera_elevation_deg
        return lo_d <= dist <= hi_d and lo_e <= elev <= hi_e

    start = on_shell()
    if rng.uniform() >= cfg.camera_motion_prob:
        return start, start
    # Straight-line move of random direction and length that ends inside the shell again.
    for _ in range(32):
        step = rng.normal(size=3)
        end = start + step / np.linalg.norm(step) * rng.uniform(0, cfg.max_camera_move_m)
        if in_shell(end):
            return start, end
    return start, start


def simulate_scene(cfg: SceneConfig, seed: int | np.random.SeedSequence) -> SceneRecording:
    """Build, simulate and render one scene in a fresh pybullet DIRECT client.

    Deterministic for a given ``(cfg, seed)``: every random choice comes from one numpy
    generator and the physics runs in its own client.

    Args:
        cfg: scene settings.
        seed: integer seed or numpy SeedSequence.

    Returns:
        The frames, depth, segmentation, floor mask, intrinsics and all poses.
    """
    pb = _import_pybullet()
    rng = np.random.default_rng(seed)
    with _quiet_output():
        client = pb.connect(pb.DIRECT)
    try:
        with tempfile.TemporaryDirectory(prefix='moog_scene_') as tmp:
            return _simulate(pb, client, Path(tmp), rng, cfg)
    finally:
        pb.disconnect(physicsClientId=client)


def _simulate(pb, client: int, texture_dir: Path, rng: np.random.Generator,
              cfg: SceneConfig) -> SceneRecording:
    pb.setGravity(0, 0, -9.81, physicsClientId=client)
    pb.setTimeStep(1.0 / (cfg.fps * cfg.substeps), physicsClientId=client)
    builder = _Builder(pb, client, texture_dir, rng, cfg)
    floor_id = builder.floor()
    dome_id = builder.dome()

    # Objects: rejection-sample start positions whose bounding spheres do not overlap.
    bodies, kinds, placed = [], [], []  # placed: (centre [3], radius)
    num_objects = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1] + 1))
    for _ in range(num_objects):
        visual, collision, half_extent, kind = builder.shape()
        radius = float(np.linalg.norm(half_extent))
        e = cfg.spawn_half_extent_m
        for attempt in range(64):
            # After many misses, lift the object above the others rather than overlap them.
            lift = max(attempt - 47, 0) * 1.0
            centre = np.array([rng.uniform(-e, e), rng.uniform(-e, e),
                               radius + rng.uniform(*cfg.spawn_height_m) + lift])
            if all(np.linalg.norm(centre - c) > radius + r for c, r in placed):
                break
        placed.append((centre, radius))
        body = builder.body(visual, collision, half_extent, centre)
        # Kubric's toss: a random horizontal velocity biased back towards the centre.
        speed = cfg.toss_speed_m_s
        velocity = np.array([*(rng.uniform(-speed, speed, 2) - 0.5 * centre[:2]), 0.0])
        pb.resetBaseVelocity(body, velocity.tolist(), rng.uniform(-3, 3, 3).tolist(),
                             physicsClientId=client)
        bodies.append(body)
        kinds.append(kind)

    eye_start, eye_end = _sample_camera_path(rng, cfg)
    target = np.array([*rng.uniform(-0.5, 0.5, 2), rng.uniform(0.0, 0.5)])
    light = {
        'lightDirection': _unit_from_angles(rng.uniform(0, 360), rng.uniform(25, 80)).tolist(),
        'lightColor': (1.0 - rng.uniform(0, 0.15, 3)).tolist(),
        'lightAmbientCoeff': rng.uniform(0.45, 0.7),
        'lightDiffuseCoeff': rng.uniform(0.3, 0.55),
        'lightSpecularCoeff': rng.uniform(0.0, 0.3),
    }
    # TinyRenderer's shadow maps are broken (acne, no cast shadows); leave them off.
    projection = pb.computeProjectionMatrixFOV(cfg.fov_deg, cfg.width / cfg.height, cfg.near_m,
                                               cfg.far_m, physicsClientId=client)

    T, H, W, K = cfg.num_frames, cfg.height, cfg.width, len(bodies)
    video = np.empty((T, H, W, 3), np.uint8)
    depth_m = np.empty((T, H, W), np.float32)
    body_ids = np.empty((T, H, W), np.int32)
    camera_pose = np.empty((T, 4, 4))
    object_pose = np.empty((K, T, 4, 4))
    for t in range(T):
        if t > 0:
            for _ in range(cfg.substeps):
                pb.stepSimulation(physicsClientId=client)
        alpha = t / (T - 1) if T > 1 else 0.0
        eye = (1 - alpha) * eye_start + alpha * eye_end
        view = look_at_gl(eye, target, np.array([0.0, 0.0, 1.0]))
        camera_pose[t] = pose_from_gl_view(view)
        _, _, rgba, depth_buffer, seg = pb.getCameraImage(
            W, H, viewMatrix=view.T.ravel().tolist(), projectionMatrix=projection,
            renderer=pb.ER_TINY_RENDERER, shadow=0, **light, physicsClientId=client)
        video[t] = np.asarray(rgba, np.uint8).reshape(H, W, 4)[..., :3]
        d = np.asarray(depth_buffer, np.float64).reshape(H, W)
        z = cfg.far_m * cfg.near_m / (cfg.far_m - (cfg.far_m - cfg.near_m) * d)
        depth_m[t] = np.where(d < 1.0, z, np.nan)  # d == 1: the ray hit nothing
        body_ids[t] = np.asarray(seg, np.int32).reshape(H, W)
        for k, body in enumerate(bodies):
            position, quat = pb.getBasePositionAndOrientation(body, physicsClientId=client)
            object_pose[k, t] = np.eye(4)
            object_pose[k, t, :3, :3] = np.reshape(pb.getMatrixFromQuaternion(quat), (3, 3))
            object_pose[k, t, :3, 3] = position

    # Body id -> segment id (background: no hit (-1), floor, dome -> 0; object k -> k + 1).
    lookup = np.zeros(max(bodies + [floor_id, dome_id]) + 2, np.uint16)
    lookup[np.asarray(bodies) + 1] = np.arange(1, K + 1)
    segmentation = lookup[body_ids + 1]
    return SceneRecording(
        video=video, depth_m=depth_m, segmentation=segmentation,
        floor_mask=body_ids == floor_id,
        intrinsics=intrinsics_matrix(W, H, cfg.fov_deg), camera_pose=camera_pose,
        object_pose=object_pose, object_kind=tuple(kinds), fps=float(cfg.fps))


def _unit_from_angles(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    azim, elev = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim),
                     math.sin(elev)])
