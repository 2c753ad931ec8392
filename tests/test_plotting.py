"""The figure helpers: image shapes and dtypes, what is drawn, no pyplot state."""

import numpy as np
import pytest

from keras_curv.plotting import (
    agg_figure,
    draw_density,
    draw_stem,
    render_density,
    render_heatmap,
    render_stem,
)


def test_agg_figure_has_its_own_canvas_and_size():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = agg_figure(4.0, 2.5, dpi=50)
    assert isinstance(figure.canvas, FigureCanvasAgg)
    figure.canvas.draw()
    assert figure.canvas.get_width_height() == (200, 125)


@pytest.mark.parametrize(
    "render, shape",
    [
        (lambda: render_stem([5.0, 2.0, -1.0], "top-3"), (320, 500, 4)),
        (
            lambda: render_density(np.linspace(-1, 5, 50), np.exp(-np.arange(50.0)), "d"),
            (320, 500, 4),
        ),
        (lambda: render_heatmap(np.eye(3), "|cos|", "eigenvector", "class"), (400, 460, 4)),
    ],
)
def test_render_returns_an_rgba_image_of_the_figure_size(render, shape):
    # 5.0 x 3.2 inches (heatmap 4.6 x 4.0) at 100 dpi, RGBA, ready for tf.summary.image.
    image = render()
    assert image.shape == shape and image.dtype == np.uint8
    assert np.all(image[..., 3] == 255)  # opaque
    assert len(np.unique(image.reshape(-1, 4), axis=0)) > 10  # something was drawn


def test_renders_depend_on_the_values():
    assert not np.array_equal(render_stem([5.0, 2.0], "t"), render_stem([5.0, -2.0], "t"))
    first = render_heatmap(np.eye(2), "t", "x", "y")
    assert not np.array_equal(first, render_heatmap(np.ones((2, 2)), "t", "x", "y"))
    np.testing.assert_array_equal(first, render_heatmap(np.eye(2), "t", "x", "y"))


def test_draw_stem_plots_values_against_their_rank():
    axes = agg_figure(5.0, 3.2).add_subplot(1, 1, 1)
    draw_stem(axes, [4.0, 1.5, 0.25], "top-3", ylabel="λ")
    markers = axes.containers[0].markerline
    np.testing.assert_array_equal(markers.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(markers.get_ydata(), [4.0, 1.5, 0.25])
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("top-3", "rank", "λ")


def test_draw_density_is_log_scale_with_a_floor():
    axes = agg_figure(5.0, 3.2).add_subplot(1, 1, 1)
    draw_density(axes, [0.0, 1.0, 2.0], [0.5, 0.0, -1e-3], "density")
    line = axes.get_lines()[0]
    assert axes.get_yscale() == "log"
    np.testing.assert_array_equal(line.get_xdata(), [0.0, 1.0, 2.0])
    # Zero and (round-off) negative densities are drawn at 1e-12, not dropped.
    np.testing.assert_array_equal(line.get_ydata(), [0.5, 1e-12, 1e-12])


def test_no_pyplot_figures_are_left_behind():
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_fignums()
    render_stem([1.0], "t")
    render_heatmap(np.eye(2), "t", "x", "y")
    assert plt.get_fignums() == before
