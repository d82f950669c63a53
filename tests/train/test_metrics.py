"""MFU's denominators: the rated bf16 peak is found by the GPU's CUDA name, and only for cards whose figure we hold."""

import pytest
import torch

from commonlm.train.metrics import rated_peak_flops

NAMES = [  # names as torch.cuda.get_device_name gives them
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 NVL", None),  # not the SXM figure
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", None),  # not the L4's
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("Tesla T4", None),
]


@pytest.mark.parametrize("name, peak", NAMES)
def test_rated_peak_by_device_name(name, peak):
    assert rated_peak_flops(name) == peak


def test_measuring_the_peak_leaves_the_global_random_state_alone():
    """A run's dropout masks must not depend on whether the peak was measured or read from the cache."""
    from commonlm.train.metrics import measure_peak_flops

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_peak_flops(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.rand(4), expected)
