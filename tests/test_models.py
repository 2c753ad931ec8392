"""Reference models: shapes, sizes and argument checks."""

import numpy as np
import pytest

from keras_curv import models
from keras_curv.models import resnet9


def _resnet9_params(channels: int, width: int, classes: int) -> tuple[int, int]:
    """(total, trainable) parameters of the paper's ResNet9, counted from its layer list."""
    w = width
    convs = [(channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w),
             (4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]  # fmt: skip
    kernels = sum(9 * cin * cout for cin, cout in convs)
    bn_channels = sum(cout for _, cout in convs)
    dense = 8 * w * classes + classes
    return kernels + 4 * bn_channels + dense, kernels + 2 * bn_channels + dense


def test_resnet9_has_the_papers_6_5m_parameters():
    model = resnet9((32, 32, 3), 10)
    total, trainable = _resnet9_params(3, 64, 10)
    assert model.count_params() == total == 6_577_610
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == trainable


def test_resnet9_small_width_on_small_images():
    model = resnet9((8, 8, 1), 7, width=2)
    assert model.count_params() == _resnet9_params(1, 2, 7)[0]
    out = model(np.zeros((3, 8, 8, 1), np.float32))
    assert out.shape == (3, 7)


@pytest.mark.parametrize(
    "shape, width", [((4, 4, 1), 4), ((32, 32), 4), ((32, 32, 3), 0), ((32, 32, 3), 2.5)]
)
def test_resnet9_rejects_bad_arguments(shape, width):
    with pytest.raises(ValueError, match="resnet9|width"):
        resnet9(shape, 10, width=width)


def test_batchnorm_resnet_and_mobilenet_v2_sizes():
    resnet = models.batchnorm_resnet((16, 16, 3), 10)
    # Kernels: stem, block 1 (two 16->16), block 2 (16->32, 32->32, 1x1 shortcut); BN
    # channels: 16 + 2 x 16 + 3 x 32 (gamma, beta trainable; mean, variance not); Dense.
    kernels = 9 * 3 * 16 + 2 * 9 * 16 * 16 + 9 * 16 * 32 + 9 * 32 * 32 + 16 * 32
    bn = 16 + 2 * 16 + 3 * 32
    trainable = kernels + 2 * bn + 32 * 10 + 10
    assert sum(int(np.prod(v.shape)) for v in resnet.trainable_weights) == trainable == 19_994
    assert resnet.count_params() == trainable + 2 * bn
    assert tuple(resnet(np.zeros((2, 16, 16, 3), "float32")).shape) == (2, 10)
    mobilenet = models.mobilenet_v2()
    assert sum(int(np.prod(v.shape)) for v in mobilenet.trainable_weights) == 408_938
    with pytest.raises(ValueError, match="h, w, c"):
        models.batchnorm_resnet((16, 16), 10)
