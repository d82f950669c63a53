"""MFU's denominators: the rated bf16 peak is found by the GPU's CUDA name, and only for cards whose figure we hold."""

import pytest

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
