"""The stubs' shared-memory regions a killed Triton leaves behind (devstack/triton_server.py), swept from a real
folder against the real /proc: a region this process maps stands for a live server's. The regions of a real
Triton killed mid-task are checked in tests/test_failures.py."""

import mmap
import os
import time
from pathlib import Path

from posemesh.devstack.triton_server import (
    SHM_REGION_PREFIX,
    mapped_shm_regions,
    remove_shm_regions_left_by,
    sweep_orphaned_shm_regions,
)


def region(folder, name: str, age_s: float):
    path = folder / f"{SHM_REGION_PREFIX}{name}"
    path.write_bytes(b"\0" * 4096)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_an_old_region_nobody_maps_is_removed_and_a_mapped_or_young_one_kept(tmp_path):
    orphan, young = region(tmp_path, "orphan", 120), region(tmp_path, "young", 1)
    live = region(tmp_path, "live", 120)
    other = tmp_path / "posemesh-pictures-ring"  # not a stub's region
    other.write_bytes(b"x")
    os.utime(other, (time.time() - 120, time.time() - 120))
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096) as _mapped:
        assert live in mapped_shm_regions([os.getpid()])
        assert sweep_orphaned_shm_regions(tmp_path, min_age_s=30) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, live.name, other.name])
    assert sweep_orphaned_shm_regions(tmp_path, min_age_s=30) == [live]  # once nobody maps it any more


def test_a_gone_servers_regions_go_by_its_prefix_and_no_other_server_loses_one(tmp_path):
    """A Triton stopped while it loads its models, or killed, leaves regions made a moment ago: once its process
    group is gone, the regions under its own prefix that nobody maps are removed, however young; another
    server's (another prefix) stay, and so does one of its own that a process still maps."""
    ours = f"{SHM_REGION_PREFIX}0123abcd_"
    young, mapped = region(tmp_path, "0123abcd_young", 0), region(tmp_path, "0123abcd_mapped", 0)
    other = region(tmp_path, "fedc9876_other", 0)
    no_group = max(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) + 1000  # no process has it
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096) as _mapped:
        assert remove_shm_regions_left_by(ours, no_group, shm_dir=tmp_path, wait_s=0) == [young]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mapped.name, other.name])
