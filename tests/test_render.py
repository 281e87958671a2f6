"""Headless rendering: known pixels of the projection and z-buffer, boxes lining up with their own points."""

from __future__ import annotations

import numpy as np

from pcd.trainer.render import (BACKGROUND, GT_COLOR, box_corners, contact_sheet, draw_box, label_colors, look_at,
                                orbit_views, read_png, render_points, write_png)


def test_projection_and_zbuffer_give_known_pixels(tmp_path):
    # Camera on the -y side looking at the origin, z up: x is right in the image, z is up.
    camera = look_at(eye=(0, -5, 0), target=(0, 0, 0), focal=100, width=64, height=48)
    uv, depth = camera.project(np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1], [0, -2, 0.5]]))
    assert np.allclose(depth, [5, 5, 5, 3])
    assert np.allclose(uv, [[32, 24], [52, 24], [32, 4], [32, 24 - 100 * 0.5 / 3]])
    red, blue = (255, 0, 0), (0, 0, 255)
    # Two points on the same pixel: the nearer one (blue, 4 m) wins whatever the order.
    xyz = np.array([[0, 0, 0], [0, -1, 0], [1, 0, 0]], np.float64)
    colors = np.array([red, blue, red], np.uint8)
    for order in ([0, 1, 2], [2, 1, 0]):
        image = render_points(xyz[order], colors[order], camera, radius=0)
        assert tuple(image[24, 32]) == blue
        assert tuple(image[24, 52]) == red
        assert (image.reshape(-1, 3) != BACKGROUND).any(axis=1).sum() == 2  # nothing else drawn
    image = render_points(xyz[:1], colors[:1], camera, radius=1)
    assert (image[23:26, 31:34] == red).all() and tuple(image[22, 32]) == BACKGROUND
    write_png(tmp_path / "a.png", image)
    assert (read_png(tmp_path / "a.png") == image).all()


def test_box_lines_up_with_its_own_points():
    """Points on the edges of a box, and the box drawn from its corners: every point pixel lies on the box's lines,
    and the box's drawn extent is the points' extent, from several views."""
    box = np.array([0.5, -0.2, 0.0, 1.7, 0.9, 0.8])
    corners = box_corners(box)
    t = np.linspace(0, 1, 200)[:, None]
    edges = [corners[a] + t * (corners[b] - corners[a]) for a, b in
             [(0, 1), (0, 2), (0, 4), (1, 3), (1, 5), (2, 3), (2, 6), (3, 7), (4, 5), (4, 6), (5, 7), (6, 7)]]
    points = np.concatenate(edges)
    for camera in orbit_views(points, 3, size=(160, 120)):
        dots = render_points(points, np.zeros((len(points), 3), np.uint8), camera, radius=0)
        lines = np.full_like(dots, 255)
        draw_box(lines, box, camera, GT_COLOR)
        dot_mask = (dots != 255).any(-1)
        line_mask = (lines != 255).any(-1)
        assert dot_mask.sum() > 100
        near_line = np.zeros_like(line_mask)  # the line pixels grown by one pixel (rounding of the two rasterisers)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near_line |= np.roll(np.roll(line_mask, dy, 0), dx, 1)
        assert near_line[dot_mask].all()
        ys, xs = np.nonzero(dot_mask)
        ly, lx = np.nonzero(line_mask)
        assert abs(ys.min() - ly.min()) <= 1 and abs(ys.max() - ly.max()) <= 1
        assert abs(xs.min() - lx.min()) <= 1 and abs(xs.max() - lx.max()) <= 1


def test_orbit_views_frame_the_cloud_and_colours():
    xyz = np.random.default_rng(0).uniform(-3, 3, size=(500, 3)) + [10, 20, 1]
    for camera in orbit_views(xyz, 4, size=(100, 80)):
        uv, depth = camera.project(xyz)
        assert (depth > 0).all() and (uv >= 0).all() and (uv[:, 0] < 100).all() and (uv[:, 1] < 80).all()
    colors = label_colors(np.array([0, 1, 0, -1, 7]), 3)
    assert (colors[0] == colors[2]).all() and (colors[0] != colors[1]).any()
    assert (colors[3] == 128).all() and (colors[4] == 128).all()
    sheet = contact_sheet([np.zeros((10, 20, 3), np.uint8)] * 3, columns=2)
    assert sheet.shape == (24, 44, 3) and (sheet[14:, 24:] == 255).all()
