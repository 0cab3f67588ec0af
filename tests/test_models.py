import pytest
import torch

from lgd_ray.models import build_classifier


@pytest.mark.parametrize("name, channels, size", [
    ("convnet2", 1, 8), ("convnet3", 1, 28), ("convnet6", 3, 128), ("resnetap10", 1, 8), ("resnetap10", 3, 128),
    ("resnet18", 1, 28), ("resnet18", 3, 128),
])
def test_classifiers_take_the_data_set_size(name, channels, size):
    model = build_classifier(name, channels, size, num_classes=7).eval()
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 7)
    # Instance norm only: an image's logits do not depend on the rest of its batch.
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_unknown_and_too_deep():
    with pytest.raises(ValueError, match="convnet<D>"):
        build_classifier("vgg11", 3, 32, 10)
    with pytest.raises(ValueError, match="too small"):
        build_classifier("convnet4", 1, 8, 10)
