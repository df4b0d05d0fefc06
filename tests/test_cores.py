"""WORKERS=auto: the CPUs a process may use, from its affinity and cgroup v2 quotas; and how
many connections each worker's listening socket may queue."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from service import cores
from service.config import ConfigError, load_settings
from service.lifecycle import LISTEN_BACKLOG
from tests.conftest import Proxy


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),
        ("max\n", None),
        ("100000 100000\n", 1),
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up
        ("50000 100000\n", 1),  # half a CPU: still one worker
        ("400000 100000\n", 4),
        ("200000 50000\n", 4),  # another period
        ("250000\n", 3),  # period left out: the kernel's default 100000
        ("", None),
        ("garbage 100000", None),
        ("0 100000", None),
    ],
)
def test_quota_cpus_reads_cpu_max(cpu_max: str, expected: int | None) -> None:
    assert cores.quota_cpus(cpu_max) == expected


def test_cgroup_dir_is_the_v2_line_of_proc_self_cgroup() -> None:
    hybrid = "12:cpu,cpuacct:/kubepods/pod1\n0::/kubepods.slice/pod1/ctr\n"
    assert cores.cgroup_dir(hybrid) == "/kubepods.slice/pod1/ctr"
    assert cores.cgroup_dir("0::/\n") == "/"
    assert cores.cgroup_dir("4:memory:/x\n") is None


def _tree(tmp_path: Path, quotas: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for folder, cpu_max in quotas.items():
        path = root / folder.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        (path / "cpu.max").write_text(cpu_max)
    own = tmp_path / "proc-self-cgroup"
    own.write_text("0::/pod/ctr\n")
    (root / "pod" / "ctr").mkdir(parents=True, exist_ok=True)
    return root, own


def test_the_smallest_quota_on_the_way_up_wins(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root, own = _tree(tmp_path, {"/pod/ctr": "max 100000\n", "/pod": "100000 100000\n", "/": "max 100000\n"})
    assert cores.usable_cpus(root, own) == 1
    root, own = _tree(tmp_path / "b", {"/pod/ctr": "max 100000\n"})
    assert cores.usable_cpus(root, own) == affinity  # no quota: the affinity alone


def test_affinity_bounds_a_larger_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root, own = _tree(tmp_path, {"/pod/ctr": f"{(affinity + 8) * 100000} 100000\n"})
    assert cores.usable_cpus(root, own) == affinity


def test_no_cgroup_files_at_all_is_the_affinity(tmp_path: Path) -> None:
    assert cores.usable_cpus(tmp_path / "none", tmp_path / "none-either") == len(os.sched_getaffinity(0))


def test_workers_auto_is_the_usable_cpus() -> None:
    settings = load_settings({"UPSTREAM_URL": "http://127.0.0.1:9", "WORKERS": "auto"}, [])
    assert settings.workers == cores.usable_cpus() >= 1
    assert load_settings({"UPSTREAM_URL": "http://127.0.0.1:9"}, ["--workers", "AUTO"]).workers >= 1


@pytest.mark.parametrize("value", ["automatic", "0", "-1", "1.5", "257"])
def test_bad_workers_values_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^WORKERS"):
        load_settings({"UPSTREAM_URL": "http://127.0.0.1:9", "WORKERS": value}, [])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_backlog_holds_a_burst_of_new_streams(proxy: Proxy) -> None:
    """Sanic's default backlog (100) overflows when hundreds of clients open streams at once;
    the proxy listens with LISTEN_BACKLOG (ss shows a listening socket's backlog as Send-Q)."""
    port = proxy.port
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    expected = min(LISTEN_BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    assert int(listing[2]) == expected, listing
