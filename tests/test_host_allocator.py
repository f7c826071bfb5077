"""pipeline.host_allocator: with the thresholds set, a model's batches reuse freed memory instead
of faulting fresh pages in (measured in fresh processes, with and without)."""
import json
import subprocess
import sys

import pytest

BATCHES = """
import json, resource, sys
import torch
from pipeline.host_allocator import retain_freed_memory
accepted = retain_freed_memory() if sys.argv[1] == "retain" else None
torch.set_num_threads(1)
conv = torch.nn.Conv2d(3, 64, 3, padding=1)
x = torch.rand(64, 3, 32, 32)  # 16 MiB of activations per batch: above glibc's adaptive mmap threshold at start
with torch.inference_mode():
    conv(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        conv(x).relu().sum()
print(json.dumps({"accepted": accepted, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def batch_faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", BATCHES, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_batches_reuse_freed_memory_instead_of_faulting_pages_in():
    default, retained = batch_faults("default"), batch_faults("retain")
    assert retained["accepted"] is True
    pages_per_batch = 2 * 64 * 64 * 32 * 32 * 4 // 4096  # the conv output and its relu
    assert default["faults"] > 10 * pages_per_batch  # the default allocator faults every batch in again
    assert retained["faults"] < default["faults"] / 10  # retained: reused, not faulted in again
