"""The stubs' shared-memory regions a killed Triton leaves behind (devstack/triton_server.py), swept from a real
folder against the real /proc: a region this process maps stands for a live server's. The regions of a real
Triton killed mid-task are checked in tests/test_failures.py."""

import mmap
import os
import time

from posemesh.devstack.triton_server import SHM_REGION_PREFIX, mapped_shm_regions, sweep_orphaned_shm_regions


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


def test_once_a_server_is_gone_the_regions_made_since_it_started_go_however_young(tmp_path):
    """A Triton stopped while it loads its models leaves regions made a moment ago: a server's own stop
    removes those made since it started that nobody maps, and leaves older young ones (another server's
    margin) and mapped ones."""
    earlier = region(tmp_path, "earlier", 10)
    started = time.time() - 3
    made, mapped = region(tmp_path, "made", 1), region(tmp_path, "mapped", 1)
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096) as _mapped:
        assert sweep_orphaned_shm_regions(tmp_path, made_since=started) == [made]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([earlier.name, mapped.name])
