"""Synthetic NYUv2: ray-cast box rooms (floor, walls, ceiling, furniture, wall decals) whose
segmentation, depth and normals are consistent by construction, and whose image is class albedo and
texture shaded by normal and depth; written as ``{train,val}/{image,label,depth,normal}/{i}.npy``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..specs import NYUV2_SEG_CLASSES
from .drawing import _smooth_noise
from .streams import _PIXELS, _parallel, _rng

NYUV2_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
    "wall", "window",
)  # fmt: skip


# class albedo (RGB), texture strength, texture frequencies (cycles per metre along the two surface axes)
_NYU_LOOK = {
    "bed": ((0.78, 0.72, 0.88), 0.35, (4.0, 0.0)),
    "books": ((0.60, 0.30, 0.25), 0.8, (22.0, 0.0)),
    "ceiling": ((0.93, 0.93, 0.90), 0.05, (0.5, 0.5)),
    "chair": ((0.50, 0.30, 0.15), 0.25, (0.0, 9.0)),
    "floor": ((0.58, 0.42, 0.26), 0.35, (5.0, 0.3)),
    "furniture": ((0.36, 0.22, 0.12), 0.3, (0.0, 3.0)),
    "objects": ((0.30, 0.62, 0.55), 0.5, (12.0, 12.0)),
    "picture": ((0.80, 0.50, 0.20), 0.7, (6.0, 4.0)),
    "sofa": ((0.22, 0.32, 0.62), 0.15, (8.0, 8.0)),
    "table": ((0.68, 0.50, 0.32), 0.3, (2.5, 0.0)),
    "tv": ((0.07, 0.07, 0.09), 0.1, (30.0, 0.0)),
    "wall": ((0.82, 0.78, 0.68), 0.06, (0.7, 0.4)),
    "window": ((0.80, 0.90, 1.00), 0.45, (1.6, 1.6)),
}
# (width x, height y, depth z) ranges in metres of free-standing classes
_NYU_FURNITURE = {
    "bed": ((1.4, 2.0), (0.45, 0.65), (1.8, 2.1)),
    "sofa": ((1.6, 2.2), (0.75, 0.95), (0.8, 1.0)),
    "table": ((0.8, 1.6), (0.70, 0.80), (0.6, 1.0)),
    "chair": ((0.40, 0.55), (0.80, 1.00), (0.45, 0.55)),
    "furniture": ((0.6, 1.4), (0.8, 2.0), (0.4, 0.6)),
}
_NYU_IGNORE = -1


def _matmul3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for tiny matrices without BLAS (bit-identical everywhere)."""
    return (a[:, :, None] * b[None, :, :]).sum(1)


@lru_cache(maxsize=4)
def _nyu_camera(h: int, w: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Focal length (pixels) and camera-ray components ``x [1, W]``, ``y [H, 1]`` (z = 1)."""
    f = 0.81 * w  # NYUv2's Kinect: 518 px at 640 wide
    x = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) / f)[None, :]
    y = ((np.arange(h, dtype=np.float32) + 0.5 - h / 2) / f)[:, None]
    return f, x, y


def _nyu_scene(rng: np.random.Generator, hw: tuple[int, int]):
    """Render one room: (image ``[H, W, 3]`` in [0, 1], label ``[H, W]`` in {-1, 0..12},
    depth ``[H, W]`` metres, normal ``[H, W, 3]`` unit vectors in camera coordinates (x right,
    y down, z forward; pointing towards the camera)), all float32.

    A box room (floor, ceiling, side and back walls) seen by a pinhole camera with random height,
    pitch and yaw; 2-5 furniture boxes on the floor, small books/objects on their tops, a TV box and
    picture/window decals on walls, sometimes an unlabelled clutter box (label -1). The image is the
    class albedo and world-space texture shaded by a directional light (normal), attenuated with
    depth, with smooth and per-pixel noise; label boundaries are marked -1 like the real maps.
    Arrays are kept per component (``[H, W]`` each): reductions over a length-3 axis are slow.
    """
    h, w = hw
    cls = {name: i for i, name in enumerate(NYUV2_CLASSES)}
    f, cam_x, cam_y = _nyu_camera(h, w)
    pitch, yaw = rng.uniform(0.0, 0.3), rng.uniform(-0.35, 0.35)
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), math.sin(pitch)], [0, -math.sin(pitch), math.cos(pitch)]])
    ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rot = _matmul3(ry, rx).astype(np.float32)  # camera -> world; the distance along a ray is the camera depth
    ray = [rot[a, 0] * cam_x + rot[a, 1] * cam_y + rot[a, 2] for a in range(3)]  # world ray components
    for r in ray:
        r[np.abs(r) < 1e-6] = 1e-6
    inv = [1.0 / r for r in ray]

    cam_h, room_h = rng.uniform(1.2, 1.6), rng.uniform(2.5, 3.0)
    left, right, back = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0), rng.uniform(4.0, 7.5)
    lo, hi = (-left, -(room_h - cam_h), -1.0), (right, cam_h, back)
    t_exit = [np.where(ray[a] > 0, np.float32(hi[a]), np.float32(lo[a])) * inv[a] for a in range(3)]
    depth = np.minimum(np.minimum(t_exit[0], t_exit[1]), t_exit[2])
    axis = np.where(t_exit[0] == depth, 0, np.where(t_exit[1] == depth, 1, 2))  # intp: used as an index
    label = np.where(axis == 1, np.where(ray[1] > 0, cls["floor"], cls["ceiling"]), cls["wall"]).astype(np.int8)
    hit = [r * depth for r in ray]

    # decals on the back wall (sometimes a side wall): pictures and windows, same depth and normal
    for _ in range(int(rng.integers(1, 4))):
        name = "picture" if rng.random() < 0.6 else "window"
        if name == "picture":
            dw, dh = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8)
        else:
            dw, dh = rng.uniform(0.8, 1.6), rng.uniform(0.8, 1.3)
        top = cam_h - rng.uniform(1.2, 2.0) - dh  # y of the upper edge (y down, floor at cam_h)
        if rng.random() < 0.7:
            x0 = rng.uniform(-left, right - dw)
            inside = (axis == 2) & (hit[0] > x0) & (hit[0] < x0 + dw)
        else:
            z0 = rng.uniform(1.0, back - dw)
            side = (hit[0] > 0) if rng.random() < 0.5 else (hit[0] < 0)
            inside = (axis == 0) & side & (hit[2] > z0) & (hit[2] < z0 + dw)
        inside &= (hit[1] > top) & (hit[1] < top + dh)
        label[inside] = cls[name]

    boxes: list[tuple[tuple[float, ...], tuple[float, ...], int]] = []
    tops = []
    for _ in range(int(rng.integers(2, 6))):
        name = ("bed", "sofa", "table", "chair", "chair", "furniture", "furniture")[int(rng.integers(7))]
        wx, wy, wz = (rng.uniform(*r) for r in _NYU_FURNITURE[name])
        x0 = rng.uniform(-left, max(right - wx, -left + 0.01))
        against_wall = name == "furniture" and rng.random() < 0.6
        z0 = back - wz - 0.02 if against_wall else rng.uniform(1.3, max(back - wz, 1.31))
        boxes.append(((x0, cam_h - wy, z0), (x0 + wx, cam_h, z0 + wz), cls[name]))
        if name in ("table", "furniture", "bed"):
            tops.append(boxes[-1])
    for b_lo, b_hi, _ in tops:  # small things on top surfaces
        for _ in range(int(rng.integers(0, 3))):
            name = "books" if rng.random() < 0.5 else "objects"
            sx, sy, sz = rng.uniform(0.1, 0.35), rng.uniform(0.08, 0.3), rng.uniform(0.1, 0.3)
            x0 = rng.uniform(b_lo[0], max(b_hi[0] - sx, b_lo[0] + 0.01))
            z0 = rng.uniform(b_lo[2], max(b_hi[2] - sz, b_lo[2] + 0.01))
            boxes.append(((x0, b_lo[1] - sy, z0), (x0 + sx, b_lo[1], z0 + sz), cls[name]))
    if rng.random() < 0.7:  # a TV: a thin box in front of the back wall
        tw, th = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.7)
        x0, y0 = rng.uniform(-left, right - tw), cam_h - rng.uniform(0.9, 1.5) - th
        boxes.append(((x0, y0, back - 0.1), (x0 + tw, y0 + th, back - 0.01), cls["tv"]))
    if rng.random() < 0.5:  # clutter nobody labelled
        sx, sy, sz = rng.uniform(0.2, 0.6, 3)
        x0, z0 = rng.uniform(-left, right - sx), rng.uniform(1.0, back - sz)
        boxes.append(((x0, cam_h - sy, z0), (x0 + sx, cam_h, z0 + sz), _NYU_IGNORE))

    corner_sel = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], bool)
    for b_lo, b_hi, c in boxes:
        # ray-test only the box's screen-space bounding rectangle
        corners = _matmul3(np.where(corner_sel, np.array(b_hi), np.array(b_lo)), rot)  # world -> camera
        if (corners[:, 2] <= 0.05).any():
            win = (slice(0, h), slice(0, w))
        else:
            px, py = corners[:, 0] / corners[:, 2] * f + w / 2, corners[:, 1] / corners[:, 2] * f + h / 2
            r0, r1 = max(int(py.min()) - 1, 0), min(int(py.max()) + 2, h)
            c0, c1 = max(int(px.min()) - 1, 0), min(int(px.max()) + 2, w)
            if r0 >= r1 or c0 >= c1:
                continue
            win = (slice(r0, r1), slice(c0, c1))
        near, far = [], []
        for a in range(3):
            iv = np.broadcast_to(inv[a], (h, w))[win]
            t1, t2 = np.float32(b_lo[a]) * iv, np.float32(b_hi[a]) * iv
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
        t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
        front = (t_near < t_far) & (t_near > 0) & (t_near < depth[win])
        if not front.any():
            continue
        np.copyto(depth[win], t_near, where=front)
        np.copyto(label[win], np.int8(c), where=front)
        face = np.where(near[0] == t_near, 0, np.where(near[1] == t_near, 1, 2))
        np.copyto(axis[win], face, where=front)

    # normals: the hit face's axis, pointing against the ray; world -> camera is rot.T
    ray_on_axis = np.where(axis == 0, ray[0], np.where(axis == 1, ray[1], ray[2]))
    towards = ray_on_axis < 0  # the face normal is +e_axis when the ray runs towards -axis
    facing = np.where(towards, np.float32(1.0), np.float32(-1.0))
    face_normals = np.concatenate([-rot, rot])  # row a of rot = camera coords of e_a; [-e_0..-e_2, e_0..e_2]
    normal = np.take(face_normals, axis + 3 * towards, axis=0)
    hit = [r * depth for r in ray]

    # appearance: albedo and world-space texture per class, Lambert shading, depth fall-off; the
    # texture and shading are scalars per pixel, so only the albedo gather and the noise touch 3 channels
    look = [_NYU_LOOK[name] for name in NYUV2_CLASSES] + [((0.5, 0.5, 0.5), 0.5, (7.0, 7.0))]
    albedo = np.clip(np.array([lk[0] for lk in look]) + rng.uniform(-0.08, 0.08, (len(look), 3)), 0.02, 1.0)
    albedo[-1] = rng.uniform(0.1, 0.9, 3)  # clutter: any colour
    albedo = albedo.astype(np.float32)
    strength = np.array([lk[1] for lk in look], np.float32)
    freq = np.array([lk[2] for lk in look], np.float32)
    phase = rng.uniform(0, 2 * math.pi, len(look)).astype(np.float32)
    index = np.where(label < 0, len(look) - 1, label).astype(np.intp)
    s1 = np.where(axis == 0, hit[2], hit[0])  # the two world axes spanning the hit face
    s2 = np.where(axis == 1, hit[2], hit[1])
    arg = np.float32(2 * math.pi) * (np.take(freq[:, 0], index) * s1 + np.take(freq[:, 1], index) * s2)
    arg += np.take(phase, index)
    st = np.take(strength, index)
    light = np.array([0.3, -1.0, -0.45]) + rng.uniform(-0.2, 0.2, 3)
    light = (light / math.sqrt(float((light * light).sum()))).astype(np.float32)
    lambert = np.maximum(np.take(light, axis) * facing, 0.0)
    scalar = (1.0 - st + st * (0.5 + 0.5 * np.cos(arg)))  # texture
    scalar *= (0.4 + 0.6 * lambert) / (1.0 + 0.01 * depth * depth) * np.float32(rng.uniform(1.0, 1.35))  # shading
    image = np.take(albedo, index, axis=0)
    image *= scalar[..., None]
    image += 0.03 * _smooth_noise(rng, 1, h, w, 1, 5)[0]
    noise = rng.random((h, w, 3), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(0.07)  # std 0.02
    image += noise
    np.clip(image, 0.0, 1.0, out=image)

    edge = np.zeros((h, w), bool)
    dv, dh_ = label[1:] != label[:-1], label[:, 1:] != label[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh_
    edge[:, :-1] |= dh_
    label = np.where(edge, np.float32(_NYU_IGNORE), label.astype(np.float32))
    np.clip(depth, 0.5, 10.0, out=depth)
    return image.astype(np.float32), label, depth.astype(np.float32), normal.astype(np.float32)


def _write_nyuv2(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    assert NYUV2_SEG_CLASSES == len(NYUV2_CLASSES)
    truth: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    maps = ("label", "depth", "normal")
    for split, folder, n in (("train", "train", n_train), ("test", "val", n_test)):
        for sub in ("image",) + maps:
            (root / folder / sub).mkdir(parents=True)

        def job(i: int, split=split, folder=folder) -> None:  # one stream per scene
            image, label, depth, normal = _nyu_scene(_rng(seed, "nyuv2", split, _PIXELS, i), hw)
            for sub, array in (("image", image), ("label", label), ("depth", depth[..., None]), ("normal", normal)):
                np.save(root / folder / sub / f"{i}.npy", array, allow_pickle=False)

        _parallel(n, job)
        for i in range(n):
            truth[split][f"{folder}/image/{i}.npy"] = np.array([f"{folder}/{sub}/{i}.npy" for sub in maps], dtype=object)
    return truth
