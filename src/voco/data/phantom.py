"""Synthetic CT phantoms with consistent anatomy: the embedded default data.

A phantom is a torso (skin, subcutaneous fat, muscle wall, a textured abdominal cavity) holding organs at anatomically
consistent relative positions, drawn in a *canonical* body frame and seen through a per-subject transform: anisotropic
scale, shift, small rotation and a smooth sinusoidal deformation, plus per-organ jitter of centre and size. Every shape
is an ellipsoid, a tube or a superellipse evaluated on the deformed coordinate grid, so one volume is a few dozen
vectorised numpy expressions.

Frames: world coordinates are NIfTI RAS+ millimetres (+x towards the patient's right, +y anterior, +z superior;
``x_ras = -x_lps``), so the liver sits at x > 0 and the spleen at x < 0. z = 0 is roughly the level of the kidneys'
centres (L1/L2); the lungs and heart lie above z ~ 90, the bladder near z ~ -200.

Everything is deterministic in the seed: :func:`generate_case` draws every random number from one
``numpy.random.Generator`` built from ``(base_seed, seed_offset, case_index)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Bumped whenever the generator's output changes for the same seed (goes into SOURCE.json).
PHANTOM_VERSION = 1

#: The global phantom label map (full truth). The first 16 names follow the VoComni order and spelling.
PHANTOM_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "ivc",
    10: "portal_splenic_veins",
    11: "pancreas",
    12: "adrenal_right",
    13: "adrenal_left",
    14: "liver_tumour",
    15: "pancreas_tumour",
    16: "kidney_tumour",
    17: "colon",
    18: "lung_tumour",
    19: "lung_right",
    20: "lung_left",
    21: "heart",
    22: "spine",
    23: "bladder",
}
LABEL_ID: dict[str, int] = {v: k for k, v in PHANTOM_LABELS.items()}

#: Phantom class name -> VoComni class name, for the classes VoComni has (cards copy the entries they need).
VOCOMNI_NAME: dict[str, str] = {n: n for n in list(PHANTOM_LABELS.values())[1:18]}
VOCOMNI_NAME["lung_tumour"] = "lung_cancer"

TUMOUR_HOSTS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "kidney": ("kidney_right", "kidney_left"),
    "pancreas": ("pancreas",),
    "lung": ("lung_right", "lung_left"),
}
TUMOUR_LABEL = {
    "liver": "liver_tumour",
    "kidney": "kidney_tumour",
    "pancreas": "pancreas_tumour",
    "lung": "lung_tumour",
}

# Canonical anatomy (mm). Ellipsoids: centre (x, y, z), semi-axes (a, b, c), yaw (degrees about z).
_ELLIPSOIDS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float], float]]] = {
    "liver": [((68, 5, 65), (80, 72, 72), 0.0), ((-5, 38, 80), (50, 32, 38), 15.0)],
    "spleen": [((-88, -38, 72), (24, 48, 52), -30.0)],
    "kidney_right": [((58, -52, 0), (26, 30, 55), 20.0)],
    "kidney_left": [((-58, -48, 12), (26, 30, 55), -20.0)],
    "adrenal_right": [((42, -42, 62), (11, 6, 16), 30.0)],
    "adrenal_left": [((-44, -36, 68), (11, 6, 16), -30.0)],
    "gallbladder": [((52, 52, 28), (15, 15, 34), 20.0)],
    "stomach": [((-52, 30, 72), (46, 38, 55), -20.0), ((-15, 45, 30), (35, 22, 22), 30.0)],
    "pancreas": [
        ((28, 8, 22), (22, 16, 18), 0.0),
        ((-15, 0, 30), (30, 12, 14), -10.0),
        ((-60, -18, 40), (28, 12, 13), -35.0),
    ],
    "heart": [((-18, 28, 168), (58, 46, 52), 30.0)],
    "bladder": [((0, 30, -205), (46, 36, 36), 0.0)],
    "lung_right": [((80, -5, 215), (66, 88, 135), 0.0)],
    "lung_left": [((-82, -5, 210), (60, 88, 130), 0.0)],
}
# Tubes: (radius, [(x, y, z) knots]) -- a chain of capsules.
_TUBES: dict[str, list[tuple[float, list[tuple[float, float, float]]]]] = {
    "aorta": [
        (12.0, [(-14, -42, -130), (-14, -44, 20), (-16, -46, 130), (-20, -44, 210)]),
        (13.0, [(-20, -44, 210), (-8, 0, 250), (5, 25, 215), (0, 25, 175)]),
    ],
    "ivc": [(11.0, [(22, -36, -130), (24, -34, 40), (28, -18, 110), (15, 10, 140)])],
    "esophagus": [(8.0, [(-12, -30, 330), (-10, -32, 200), (-22, -20, 110), (-40, 15, 85)])],
    "portal_splenic_veins": [(6.5, [(45, 0, 55), (20, -2, 38), (-25, -12, 42), (-70, -28, 55)])],
    "colon": [
        (
            21.0,
            [
                (92, 10, -110),
                (95, 15, 10),
                (70, 55, 30),
                (0, 65, 15),
                (-75, 55, 35),
                (-92, 0, 20),
                (-90, -5, -110),
                (-40, 30, -150),
            ],
        )
    ],
}
# Painting order: later classes win where shapes overlap.
_ORDER = (
    "lung_right",
    "lung_left",
    "heart",
    "colon",
    "stomach",
    "liver",
    "spleen",
    "pancreas",
    "gallbladder",
    "kidney_right",
    "kidney_left",
    "adrenal_right",
    "adrenal_left",
    "esophagus",
    "portal_splenic_veins",
    "ivc",
    "aorta",
    "spine",
    "bladder",
)

# Mean HU per class (portal-venous phase); per-case offsets and texture are added on top.
_HU = {
    "spleen": 110,
    "kidney_right": 165,
    "kidney_left": 165,
    "gallbladder": 8,
    "esophagus": 40,
    "liver": 95,
    "stomach": 40,
    "aorta": 170,
    "ivc": 145,
    "portal_splenic_veins": 160,
    "pancreas": 75,
    "adrenal_right": 35,
    "adrenal_left": 35,
    "liver_tumour": 45,
    "pancreas_tumour": 35,
    "kidney_tumour": 85,
    "colon": 35,
    "lung_tumour": 25,
    "lung_right": -860,
    "lung_left": -860,
    "heart": 60,
    "spine": 320,
    "bladder": 10,
}

FOV_Z = {
    "abdomen": ((-55.0, -15.0), (260.0, 320.0)),
    "chest": ((180.0, 215.0), (240.0, 300.0)),
    "pelvis": ((-120.0, -80.0), (240.0, 280.0)),
}
FOV_XY = (370.0, 290.0)  # in-plane field of view (mm)


@dataclasses.dataclass(frozen=True)
class PhantomSettings:
    """Generator settings of one dataset (a card's ``source.synthetic`` block plus the global scale)."""

    fov: str = "abdomen"  # abdomen | chest | mixed (abdomen, some pelvis and chest)
    inplane_spacing: tuple[float, float] = (0.6, 1.0)
    slice_spacing: tuple[float, float] = (1.5, 5.0)
    spacing_scale: float = 1.0
    tumour_prob: float = 0.0
    tumour_sites: tuple[str, ...] = ("liver", "kidney")
    tumour_radius: tuple[float, float] = (8.0, 22.0)
    tumour_hu: float | None = None  # mean HU of every tumour (None: per site, liver 45, kidney 85, pancreas 35, lung 25)
    noise_hu: tuple[float, float] = (10.0, 25.0)
    orientation: str = "LPS"  # voxel axes of the written arrays: LPS (like most CT NIfTI) or RAS

    @classmethod
    def from_card(cls, synthetic: dict, spacing_scale: float = 1.0) -> PhantomSettings:
        keys = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in synthetic.items() if k in keys}
        kw["spacing_scale"] = float(spacing_scale)
        return cls(**kw)


@dataclasses.dataclass
class PhantomCase:
    """One generated volume. ``image`` int16 HU and ``label`` uint8 (global map), both (X, Y, Z) under ``affine``."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    meta: dict

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def case_rng(base_seed: int, seed_offset: int, index: int) -> np.random.Generator:
    """The generator for one case: independent streams per (base seed, dataset offset, case index)."""
    return np.random.default_rng(np.random.SeedSequence([int(base_seed), int(seed_offset), int(index)]))


# ----------------------------------------------------------------------------------------------------------- geometry
def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def _rot_y(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def grid_affine(
    shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float], orientation: str
) -> np.ndarray:
    """Affine of an axis-aligned grid centred on ``centre`` (RAS mm); ``LPS`` flips the x and y voxel axes."""
    sx, sy, sz = (float(s) for s in spacing)
    signs = (-1.0, -1.0, 1.0) if orientation == "LPS" else (1.0, 1.0, 1.0)
    aff = np.eye(4)
    for ax, (s, sg, n, c) in enumerate(zip((sx, sy, sz), signs, shape, centre, strict=True)):
        aff[ax, ax] = sg * s
        aff[ax, 3] = round(c - sg * s * (n - 1) / 2.0, 2)
    return aff


def _canonical_grid(shape, affine, transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical body coordinates (float32 arrays of ``shape``) of every voxel centre."""
    lin, scale, shift, deform = transform
    inv = np.linalg.inv(lin)  # world offset -> canonical
    # world = diag(affine) * index + origin (axis aligned): separable, so build per-axis vectors and broadcast.
    axes = [affine[a, a] * np.arange(n, dtype=np.float32) + affine[a, 3] - shift[a] for a, n in enumerate(shape)]
    wx, wy, wz = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    cx = (inv[0, 0] * wx + inv[0, 1] * wy + inv[0, 2] * wz) / scale[0]
    cy = (inv[1, 0] * wx + inv[1, 1] * wy + inv[1, 2] * wz) / scale[1]
    cz = (inv[2, 0] * wx + inv[2, 1] * wy + inv[2, 2] * wz) / scale[2]
    cx, cy, cz = (np.broadcast_to(c, shape).astype(np.float32) for c in (cx, cy, cz))
    # smooth deformation: a few long-wavelength sinusoids per component
    out = []
    for comp, base in enumerate((cx, cy, cz)):
        d = np.zeros(shape, np.float32)
        for amp, k, phase in deform[comp]:
            d += np.float32(amp) * np.sin(k[0] * cx + k[1] * cy + k[2] * cz + np.float32(phase))
        out.append(base + d)
    return out[0], out[1], out[2]


class _Grid:
    """Canonical coordinates of every voxel plus, per voxel axis, the range they cover (for bounding boxes)."""

    def __init__(self, q: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.q = q
        self.shape = q[0].shape
        others = [(1, 2), (0, 2), (0, 1)]
        self.lo = [q[a].min(axis=others[a]) for a in range(3)]
        self.hi = [q[a].max(axis=others[a]) for a in range(3)]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, ...] | None:
        """Index box holding every voxel whose canonical coordinates can lie in [lo, hi] (None if empty)."""
        out = []
        for a in range(3):
            hit = np.flatnonzero((self.hi[a] >= lo[a]) & (self.lo[a] <= hi[a]))
            if hit.size == 0:
                return None
            out.append(slice(int(hit[0]), int(hit[-1]) + 1))
        return tuple(out)


def _ellipsoid(g: _Grid, centre, semi, yaw) -> np.ndarray:
    """Boolean mask (full grid) of an ellipsoid with semi-axes ``semi`` turned by ``yaw`` degrees about z."""
    r_xy = float(max(semi[0], semi[1]))
    lo = (centre[0] - r_xy, centre[1] - r_xy, centre[2] - semi[2])
    hi = (centre[0] + r_xy, centre[1] + r_xy, centre[2] + semi[2])
    mask = np.zeros(g.shape, bool)
    box = g.box(lo, hi)
    if box is None:
        return mask
    x, y, z = (c[box] for c in g.q)
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    dx, dy, dz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
    u = (c * dx + s * dy) / np.float32(semi[0])
    v = (-s * dx + c * dy) / np.float32(semi[1])
    w = dz / np.float32(semi[2])
    mask[box] = u * u + v * v + w * w <= 1
    return mask


def _tube(g: _Grid, radius, knots) -> np.ndarray:
    """Boolean mask of a chain of capsules through ``knots`` with ``radius``."""
    mask = np.zeros(g.shape, bool)
    for p0, p1 in zip(knots[:-1], knots[1:], strict=True):
        a = np.asarray(p0, np.float32)
        ab = np.asarray(p1, np.float32) - a
        box = g.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if box is None:
            continue
        x, y, z = (c[box] for c in g.q)
        L2 = float(ab @ ab)
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / np.float32(L2)
        np.clip(t, 0, 1, out=t)
        d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        mask[box] |= d2 <= radius * radius
    return mask


def _smooth_noise(rng: np.random.Generator, shape, cells: float, spacing) -> np.ndarray:
    """Zero-mean unit-ish smooth random field with correlation length ~``cells`` mm (coarse noise, linear upsampling)."""
    coarse = [max(2, int(math.ceil(n * s / cells)) + 1) for n, s in zip(shape, spacing, strict=True)]
    field = rng.standard_normal(coarse).astype(np.float32)
    zoom = [n / c for n, c in zip(shape, coarse, strict=True)]
    out = ndimage.zoom(field, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1], : shape[2]]


# ----------------------------------------------------------------------------------------------------------- sampling
def _draw_geometry(rng: np.random.Generator, s: PhantomSettings) -> dict:
    fov = s.fov
    if fov == "mixed":
        fov = str(rng.choice(["abdomen", "abdomen", "abdomen", "pelvis", "chest"]))
    (zc0, zc1), (l0, l1) = FOV_Z[fov]
    inplane = float(rng.uniform(*s.inplane_spacing)) * s.spacing_scale
    thick = float(rng.uniform(*s.slice_spacing)) * s.spacing_scale
    inplane, thick = round(inplane, 3), round(thick, 3)
    length = float(rng.uniform(l0, l1))
    shape = (
        int(round(FOV_XY[0] / inplane)),
        int(round(FOV_XY[1] / inplane)),
        max(8, int(round(length / thick))),
    )
    centre = (float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8)), float(rng.uniform(zc0, zc1)))
    return {"fov": fov, "spacing": (inplane, inplane, thick), "shape": shape, "centre": centre}


def _draw_subject(rng: np.random.Generator) -> dict:
    size = float(rng.uniform(0.88, 1.12))
    scale = tuple(size * float(rng.uniform(0.95, 1.05)) for _ in range(3))
    lin = _rot_z(float(rng.uniform(-7, 7))) @ _rot_x(float(rng.uniform(-3, 3))) @ _rot_y(float(rng.uniform(-3, 3)))
    shift = tuple(float(v) for v in rng.uniform(-12, 12, 3) * np.array([1.0, 1.0, 1.5]))
    deform = []
    for _ in range(3):
        terms = []
        for _ in range(3):
            k = rng.normal(0, 1, 3)
            k = k / np.linalg.norm(k) * (2 * math.pi / float(rng.uniform(140, 320)))
            terms.append((float(rng.uniform(2, 7)), k.astype(np.float32), float(rng.uniform(0, 2 * math.pi))))
        deform.append(terms)
    jitter = {}
    for name in list(_ELLIPSOIDS) + list(_TUBES) + ["spine", "body"]:
        jitter[name] = (rng.normal(0, 4.0, 3), rng.uniform(0.9, 1.1, 3))
    return {
        "size": size,
        "scale": scale,
        "lin": lin,
        "shift": shift,
        "deform": deform,
        "jitter": jitter,
        "fat_mm": float(rng.uniform(8, 32)),
        "muscle_mm": float(rng.uniform(7, 13)),
        "body_ab": (float(rng.uniform(148, 168)), float(rng.uniform(105, 122))),
        "contrast": float(rng.uniform(-25, 25)),
        "organ_offset": float(rng.uniform(-8, 8)),
    }


# ----------------------------------------------------------------------------------------------------------- anatomy
def _body_layers(q, subj) -> tuple[np.ndarray, np.ndarray]:
    """Normalised body radius rho (1 at the skin) and mean body semi-axis (mm)."""
    x, y, z = q
    a, b = subj["body_ab"]
    # slightly wider chest, narrower pelvis; flatter back
    a_z = a * (1 + 0.05 * np.tanh((z - 100) / 80)) * (1 - 0.04 * np.tanh((-z - 150) / 50))
    b_z = np.where(y < 0, b * 0.92, b)
    p = 2.6
    rho = (np.abs(x) / a_z) ** p + (np.abs(y + 5) / b_z) ** p
    rho **= 1.0 / p
    return rho, 0.5 * (a + b)


def _spine_masks(q, jit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vertebral bone, disc, canal) masks: bodies + posterior elements, discs every ~32 mm."""
    x, y, z = q
    dx, dy = float(jit[0][0]) * 0.4, float(jit[0][1]) * 0.4
    xs, ys = x - dx, y - dy
    body = ((xs / 20.0) ** 2 + ((ys + 72) / 17.0) ** 2) <= 1
    canal = ((xs / 9.0) ** 2 + ((ys + 98) / 9.0) ** 2) <= 1
    arch = (((xs / 17.0) ** 2 + ((ys + 98) / 15.0) ** 2) <= 1) & ~canal
    spinous = ((xs / 5.5) ** 2 + ((ys + 118) / 14.0) ** 2) <= 1
    transverse = ((np.abs(xs) - 26) / 12.0) ** 2 + ((ys + 95) / 5.0) ** 2 <= 1
    phase = np.mod(z / 32.0, 1.0)
    disc_level = phase < 0.18
    bone = (body | arch | spinous | transverse) & ~disc_level
    disc = body & disc_level
    return bone, disc, canal


def generate_case(
    settings: PhantomSettings,
    rng: np.random.Generator,
    tumour: bool | None = None,
) -> PhantomCase:
    """Draw one phantom.

    Args:
        settings: dataset-level generator settings.
        rng: the case's random generator (see :func:`case_rng`); all randomness comes from it.
        tumour: force a tumour (True) or none (False); ``None`` draws with ``settings.tumour_prob``.

    Returns:
        PhantomCase with ``image`` int16 HU (X, Y, Z), ``label`` uint8 in :data:`PHANTOM_LABELS`, the voxel-to-RAS
        ``affine`` and ``meta`` (fov, spacing, tumours, subject parameters).
    """
    geo = _draw_geometry(rng, settings)
    subj = _draw_subject(rng)
    shape, spacing = geo["shape"], geo["spacing"]
    affine = grid_affine(shape, spacing, geo["centre"], settings.orientation)
    transform = (subj["lin"], subj["scale"], subj["shift"], subj["deform"])
    q = _canonical_grid(shape, affine, transform)
    g = _Grid(q)

    label = np.zeros(shape, np.uint8)
    rho, body_r = _body_layers(q, subj)
    body = rho <= 1.0
    depth = (1.0 - rho) * body_r  # approx. mm below the skin
    cavity = depth > subj["fat_mm"] + subj["muscle_mm"] + 2

    voxel_ml = float(np.prod(spacing)) / 1000.0
    masks: dict[str, np.ndarray] = {}
    for name in _ORDER:
        jit_c, jit_s = subj["jitter"][name]
        if name in _ELLIPSOIDS:
            m = np.zeros(shape, bool)
            for c, semi, yaw in _ELLIPSOIDS[name]:
                m |= _ellipsoid(g, np.add(c, jit_c), np.multiply(semi, jit_s), yaw)
            if name.startswith("lung"):
                # diaphragm dome: lungs stop above a curved surface, highest under each lung's centre
                dome = 95 + 35 * np.exp(-((np.abs(q[0]) - 65) ** 2 + (q[1] + 5) ** 2) / (2 * 55.0**2))
                m &= q[2] > dome
        elif name in _TUBES:
            m = np.zeros(shape, bool)
            for radius, knots in _TUBES[name]:
                m |= _tube(g, radius * float(jit_s[0]), [tuple(np.add(k, jit_c * 0.5)) for k in knots])
        else:  # spine
            bone, disc, canal = _spine_masks(q, subj["jitter"]["spine"])
            masks["_disc"], masks["_canal"] = disc & body, canal & body
            m = bone
        m &= cavity if name not in ("spine", "aorta", "ivc", "esophagus") else body
        masks[name] = m
        label[m] = LABEL_ID[name]

    # tumours
    tumours = []
    want = (rng.random() < settings.tumour_prob) if tumour is None else tumour
    n_tum = 0
    if want and settings.tumour_sites:
        n_tum = 1 + int(rng.random() < 0.3)
    # hosts that are well inside this field of view
    hosts = [(site, h) for site in settings.tumour_sites for h in TUMOUR_HOSTS[site] if masks[h].sum() * voxel_ml > 20]
    for _ in range(n_tum if hosts else 0):
        site, host = hosts[int(rng.integers(len(hosts)))]
        # centre: halfway between the host's centroid (in this field of view) and a random host voxel
        idx = np.flatnonzero(masks[host])
        pick = np.unravel_index(idx[int(rng.integers(len(idx)))], shape)
        centroid = [float(np.mean(c[masks[host]])) for c in q]
        centre = np.array([0.5 * (centroid[a] + float(q[a][pick])) for a in range(3)])
        r = float(rng.uniform(*settings.tumour_radius))
        radii = r * rng.uniform(0.8, 1.2, 3)
        tmask = _ellipsoid(g, centre, radii, float(rng.uniform(0, 180))) & (label == LABEL_ID[host])
        label[tmask] = LABEL_ID[TUMOUR_LABEL[site]]
        tumours.append(
            {
                "site": site,
                "host": host,
                "centre_mm": centre.round(1).tolist(),
                "radius_mm": round(r, 1),
                "voxels": int(tmask.sum()),
            }
        )

    # ---------------------------------------------------------------- intensities
    hu = np.full(shape, -1000.0, np.float32)
    tex_fine = _smooth_noise(rng, shape, 12.0, spacing)
    tex_coarse = _smooth_noise(rng, shape, 45.0, spacing)
    hu[body] = 30.0  # skin / dermis
    fat = body & (depth > 2.5)
    hu[fat] = -105.0
    muscle = body & (depth > subj["fat_mm"] + 2) & ~cavity
    hu[muscle] = 50.0
    # cavity: bowel / mesenteric fat mix with some gas
    bowel = np.where(tex_fine > 0.9, -650.0, np.where(tex_coarse + 0.6 * tex_fine > 0.1, 25.0, -85.0))
    hu[cavity] = bowel[cavity]
    x, y, z = q
    # paraspinal muscles and psoas (unlabelled context)
    para = ((((np.abs(x) - 35) / 24.0) ** 2 + ((y + 100) / 20.0) ** 2) <= 1) & body
    psoas_r = 8 + 14 * np.clip((60 - z) / 120.0, 0, 1)
    psoas = ((((np.abs(x) - 38) ** 2 + (y + 62) ** 2) <= psoas_r**2) & (z < 60)) & cavity
    hu[para | psoas] = 50.0
    # ribs: a banded shell inside the muscle wall above the costal margin
    rib_band = np.sin(2 * np.pi * z / 26.0) > 0.6
    rib_depth = (depth > subj["fat_mm"] + 0.3 * subj["muscle_mm"]) & (depth < subj["fat_mm"] + subj["muscle_mm"] + 1)
    ribs = body & rib_depth & rib_band & (z > 35) & (y > -85)
    hu[ribs & (label == 0)] = 450.0
    hu[masks["_disc"] & (label == 0)] = 90.0
    hu[masks["_canal"] & (label == 0)] = 20.0
    # organs
    vessels = {"aorta", "ivc", "portal_splenic_veins", "kidney_right", "kidney_left", "spleen", "liver"}
    for lid, name in PHANTOM_LABELS.items():
        if lid == 0:
            continue
        m = label == lid
        if not m.any():
            continue
        mean_hu = _HU[name]
        if settings.tumour_hu is not None and name in TUMOUR_LABEL.values():
            mean_hu = float(settings.tumour_hu)
        base = mean_hu + (subj["contrast"] if name in vessels else 0.0) + subj["organ_offset"]
        tex_amp = 4.0 if name in ("aorta", "ivc", "portal_splenic_veins", "gallbladder", "bladder") else 9.0
        if name.startswith("lung"):
            tex_amp = 40.0
        hu[m] = base + tex_amp * tex_fine[m]
    # internal structure: kidney medulla / pelvis, stomach and colon gas, heart chambers, lung vessels, tumour rims
    for kname in ("kidney_right", "kidney_left"):
        (c, semi, yaw), (jc, js) = _ELLIPSOIDS[kname][0], subj["jitter"][kname]
        inner = _ellipsoid(g, np.add(c, jc), np.multiply(semi, js) * 0.55, yaw) & (label == LABEL_ID[kname])
        hu[inner] = 15.0 + 8 * tex_fine[inner]
    for gname, frac in (("stomach", 0.35), ("colon", 0.25)):
        m = label == LABEL_ID[gname]
        gas = m & (tex_coarse > 0.8 - 2 * frac) & (y > np.float32(30 if gname == "stomach" else -200))
        hu[gas] = -800.0
    heart = label == LABEL_ID["heart"]
    (c, semi, yaw), (jc, js) = _ELLIPSOIDS["heart"][0], subj["jitter"]["heart"]
    chambers = heart & _ellipsoid(g, np.add(c, jc), np.multiply(semi, js) * 0.7, yaw)
    hu[chambers] = 160.0 + subj["contrast"]
    lungs = (label == LABEL_ID["lung_right"]) | (label == LABEL_ID["lung_left"])
    lung_vessels = lungs & (np.abs(tex_fine) < 0.06)
    hu[lung_vessels] = -100.0
    tum = np.isin(label, [LABEL_ID[t] for t in TUMOUR_LABEL.values()])
    hu[tum] += 12.0 * tex_fine[tum]

    # partial volume (slight blur in-plane and across slices), then noise
    hu = ndimage.gaussian_filter(hu, sigma=(0.6, 0.6, 0.4), mode="nearest", truncate=2.5)
    sigma = float(rng.uniform(*settings.noise_hu))
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    np.clip(hu, -1024, 3071, out=hu)
    image = np.rint(hu).astype(np.int16)

    meta = {
        "fov": geo["fov"],
        "spacing": list(spacing),
        "shape": list(shape),
        "centre_mm": [round(c, 2) for c in geo["centre"]],
        "orientation": settings.orientation,
        "subject_size": round(subj["size"], 4),
        "noise_hu": round(sigma, 2),
        "tumours": tumours,
        "tumour": int(any(t["voxels"] > 0 for t in tumours)),
    }
    return PhantomCase(image=image, label=label, affine=affine, meta=meta)


def remap_labels(full: np.ndarray, card_labels: dict) -> np.ndarray:
    """Partial label in the card's own values: classes the card does not list become background.

    Args:
        full: (X, Y, Z) uint8 label in :data:`PHANTOM_LABELS`.
        card_labels: the card's ``labels`` map {"1": "liver", ...} (names from the phantom map).
    """
    lut = np.zeros(256, np.uint8)
    for value, name in card_labels.items():
        if int(value) == 0:
            continue
        if name not in LABEL_ID:
            raise KeyError(name)
        lut[LABEL_ID[name]] = int(value)
    return lut[full]
