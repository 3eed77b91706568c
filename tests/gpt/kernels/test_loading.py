"""Building and loading our kernels: every instruction-set flavour this CPU runs is exact, the
C++ and ctypes registrations give the same numbers, and without a compiler (or turned off)
PyTorch's kernels run instead, saying why."""

import os
import shutil
import subprocess
import sys

import pytest

import gpt.kernels as kernels
from gpt.kernels import build, ctypes_ops, loader

needs_kernels = pytest.mark.skipif(
    not kernels.f32_available(), reason=f"no native kernels here: {kernels.status()}"
)


def _cpu_has(*flags: str) -> bool:
    return all(f in build.cpu_flags().split() for f in flags)


FLAVOURS = {  # the instruction sets gemv.c picks from, each built on purpose where this CPU runs it
    "avx2": (["-march=x86-64-v3"], ("avx2", "fma"), 3),
    "avx-vnni": (["-march=x86-64-v3", "-mavxvnni"], ("avx2", "fma", "avx_vnni"), 2),
    "avx512-vnni": (["-march=x86-64-v4", "-mavx512vnni"], ("avx512f", "avx512bw", "avx512_vnni"), 1),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_instruction_set_flavour_is_exact(flavour, tmp_path, monkeypatch):
    flags, cpu_flags, isa = FLAVOURS[flavour]
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not _cpu_has(*cpu_flags):
        pytest.skip(f"needs a C compiler and a CPU with {', '.join(cpu_flags)}")
    monkeypatch.setattr(build, "FLAGS", [f for f in build.FLAGS if f != "-march=native"] + flags)
    monkeypatch.setenv("GPT_KERNEL_CACHE", str(tmp_path))
    lib = ctypes_ops.bind(build.compile_kernels(cc))
    assert lib.gemv_isa() >> 4 == isa and lib.gemv_isa() & 1
    # raises on any disagreement: both kernels, one and several rows, full 64-byte blocks, a short
    # last block of rows and a K tail, int8 weights of -128 included
    loader.check(lib, ctypes_ops.ops(lib))


def _status_in_subprocess(env: dict) -> str:
    code = (
        "import gpt.kernels, torch; print(gpt.kernels.status()); "
        "import gpt; m = gpt.build_model(gpt.ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, "
        "n_embd=512)).eval(); gpt.quantize(m, 'int8'); c = m.new_cache(1); m.start([[1, 2]], c); "
        "print(m.step(torch.ones(1, 1, dtype=torch.long), c).shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_turning_our_kernels_off_leaves_torchs_running():
    out = _status_in_subprocess({"GPT_NATIVE_KERNELS": "0"})
    assert "turned off by GPT_NATIVE_KERNELS=0" in out and "torch.Size([1, 64])" in out


def test_without_a_compiler_torchs_kernels_run(tmp_path):
    out = _status_in_subprocess({"CC": str(tmp_path / "no-such-cc"), "GPT_KERNEL_CACHE": str(tmp_path)})
    assert out.startswith("PyTorch's (") and "torch.Size([1, 64])" in out


@needs_kernels
def test_without_a_cpp_compiler_the_ops_reach_our_kernels_through_ctypes(tmp_path):
    out = _status_in_subprocess({"GPT_NATIVE_OPS": "ctypes", "GPT_KERNEL_CACHE": str(tmp_path)})
    assert "called through ctypes" in out and "torch.Size([1, 64])" in out


@needs_kernels
@pytest.mark.slow
def test_both_ways_of_calling_our_kernels_give_the_same_numbers():
    """The C++ registration (ops.cpp) and the ctypes one, on the same int8 and float32 inputs."""
    code = (
        "import torch, gpt.kernels as n; n.f32_available(); g = torch.Generator().manual_seed(5); "
        "x = torch.randn(1, 300, generator=g); w = torch.randn(70, 300, generator=g); "
        "xq = torch.randint(0, 256, (1, 300), generator=g, dtype=torch.uint8); "
        "wq = torch.randint(-128, 128, (70, 300), generator=g, dtype=torch.int8); "
        "q, k, v = torch.randn(3, 2, 4, 16, generator=g).unbind(0); kc, vc = torch.zeros(2, 3, 4, "
        "20, 16).unbind(0); "
        "a = torch.ops.gpt.attend_one(q, k, v, kc, vc, torch.tensor([2, 0]), torch.tensor([0, 5])); "
        "print(n.status()); print(torch.ops.gpt.gemv_f32(x, w, None).sum().item(), "
        "torch.ops.gpt.gemv_u8s8(xq, n.interleave_int8(wq), wq.sum(1, dtype=torch.int32)).sum().item(), "
        "a.sum().item(), torch.ops.gpt.linear_u8s8(x, n.interleave_int8(wq), wq.sum(1, dtype=torch.int32), "
        "torch.rand(70, generator=g), None).sum().item())"
    )
    outs = {}
    for how in ("C++", "ctypes"):
        # the build cache every process shares: building is tested above, the numbers here
        env = dict(os.environ)
        if how == "ctypes":
            env["GPT_NATIVE_OPS"] = "ctypes"
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        status, numbers = run.stdout.splitlines()
        if f"called through {how}" not in status:
            pytest.skip(f"no {how} build here: {status}")
        outs[how] = [float(v) for v in numbers.split()]
    assert outs["C++"][1] == outs["ctypes"][1]  # exact integer products
    assert outs["C++"][3] == outs["ctypes"][3]  # the same C code behind both
    assert outs["C++"][0] == pytest.approx(outs["ctypes"][0], rel=1e-6)
    assert outs["C++"][2] == pytest.approx(outs["ctypes"][2], rel=1e-5)


def _skip_unless_buildable() -> None:
    import platform

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if (
        not (
            cc and platform.system() == "Linux" and platform.machine() == "x86_64" and _cpu_has("avx2", "fma")
        )
        or os.environ.get("GPT_NATIVE_KERNELS") == "0"
    ):
        pytest.skip("not an x86-64 Linux machine with AVX2 and a C compiler")


@pytest.mark.parametrize(
    "first_call",
    [
        "gpt.quantize(m, 'int8')",  # under no_grad: where `gpt-serve --quantize int8` first calls them
        "gpt.generate(m, gpt.get_tokenizer('byte'), [1, 2], max_new_tokens=2)",  # under inference_mode
    ],
)
def test_kernels_first_loaded_under_no_grad_or_inference_mode_are_in_use(first_call):
    """Their self-check differentiates GELU. It once failed under no_grad, leaving every int8
    server on torch's kernels, and then under inference_mode, leaving all of gpt.generate's."""
    _skip_unless_buildable()
    code = (
        "import gpt; m = gpt.build_model(gpt.ModelConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, "
        f"n_embd=512)).eval(); {first_call}; print(gpt.kernels.status())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("native"), out.stdout


def test_where_they_can_be_built_our_kernels_are_in_use():
    """So that a kernel broken by an edit fails here rather than quietly skipping the tests above."""
    _skip_unless_buildable()
    assert kernels.f32_available() and kernels.int8_available(), kernels.status()


def test_machine_facts_carry_the_mark_torch_compilers_own_decorator_leaves():
    """`kernels.machine_fact` stands in for `torch.compiler.assume_constant_result` (which imports
    dynamo): a torch that marks constant results another way must fail here."""

    def fact():
        return True

    def ours():
        return True

    torch_marked = vars(__import__("torch").compiler.assume_constant_result(fact))
    assert torch_marked and vars(kernels.machine_fact(ours)) == torch_marked


def test_importing_gpt_does_not_import_the_compiler():
    """Every command and server imports gpt at start-up; dynamo alone took about half of that."""
    code = "import sys, gpt, gpt.speculative; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
