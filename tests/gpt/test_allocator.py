"""With glibc's thresholds set, memory a step frees stays with the process for the next step
instead of being handed back and faulted in again."""

import os
import subprocess
import sys

import pytest

# a step's activations: three 10 MiB tensors, all freed at its end; glibc gives back the top of
# its heap once more than twice its (by then 10 MiB) mmap threshold is free there
CODE = """
import resource, torch
from gpt import allocator
def step():
    ts = [torch.empty(10 << 18).fill_(1) for _ in range(3)]
    del ts
def faults_per_step(steps=10):
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
default = faults_per_step()
print(allocator.keep_freed_memory(), default, faults_per_step())
"""


def _run(**env_extra) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    run = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env={**env, **env_extra}, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keeping_freed_memory_ends_the_page_faults_of_every_step():
    # The baseline hands every freed tensor back: a fixed mmap threshold below the tensors' size
    # (glibc's own default moves, and whether it trims the heap's top depends on what else was
    # allocated above it, so it faulted in some runs and not in others). keep_freed_memory then
    # leaves that setting alone.
    applied, baseline, _ = _run(MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False" and float(baseline) > 100  # the pattern faults when memory goes back
    applied, _, kept = _run()
    if applied != "True":
        pytest.skip("not glibc")
    assert float(kept) < float(baseline) / 10, (baseline, kept)


def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    from gpt import allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not allocator.keep_freed_memory()
