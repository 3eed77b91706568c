"""Our single-row kernels (gpt.native): they agree with PyTorch on every flavour this CPU can run,
the layers that use them give the numbers they gave before, and without them everything still
runs on PyTorch's kernels."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt
import gpt.native as native
import gpt.native_build as native_build
from gpt.layers import Linear
from gpt.quantization import Int8Linear

needs_kernels = pytest.mark.skipif(
    not native.f32_available(), reason=f"no native kernels here: {native.status()}"
)


def _cpu_has(*flags: str) -> bool:
    return all(f in native._cpu_flags().split() for f in flags)


@pytest.fixture
def without_native(monkeypatch):
    """PyTorch's kernels, as on a machine where ours could not be built."""
    monkeypatch.setattr(native, "_isa", lambda: 0)


SHAPES = [(1, 1, 1), (1, 7, 5), (1, 37, 200), (1, 64, 3072), (2, 9, 130), (5, 100, 64), (3, 4, 65)]


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float32_kernel_matches_torch(M, N, K):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    torch.testing.assert_close(torch.ops.gpt.gemv_f32(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.ops.gpt.gemv_f32(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_kernel_gives_the_exact_integer_products(M, N, K):
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)  # -128 too: no weight value is off limits
    shifted = (x.int() + 128).to(torch.uint8)
    y = torch.ops.gpt.gemv_u8s8(shifted, native.interleave_int8(w), w.sum(1, dtype=torch.int32))
    assert y.dtype == torch.int32 and torch.equal(y.long(), x.long() @ w.long().t())


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_the_whole_int8_layer_in_one_call_gives_torchs_numbers_to_the_bit(M, N, K):
    """linear_u8s8 quantizes each row, multiplies and rescales in C: the same float operations
    as gpt.quantization's tensor code, so the same numbers, a zero row and no bias included."""
    x = torch.randn(M, K) * torch.logspace(-3, 3, M)[:, None]
    x[-1, : K // 2] = 0.0
    if M > 1:
        x[0] = 0.0
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scale, bias = torch.rand(N) * 0.01, torch.randn(N)
    rows, sums = native.interleave_int8(w), w.sum(1, dtype=torch.int32)
    for b in (bias, None):
        y = torch.ops.gpt.linear_u8s8(x, rows, sums, scale, b)
        assert torch.equal(y, native._linear_u8s8_reference(x, w, scale, b))
        assert torch.equal(
            torch.ops.gpt.linear_u8s8(x[-1:], rows, sums, scale, b), y[-1:]
        )  # alone as in a batch


@needs_kernels
@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (3, 300), (32, 50257)])
def test_argmax_and_logsumexp_over_rows_match_torch(B, V):
    x = torch.randn(B, V) * 8
    x[0, V // 2 :] = x[0].max()  # ties: the first largest wins
    if B > 2:
        x[1] = -float("inf")  # a fully masked row, then one with a single live token
        x[2, :] = -float("inf")
        x[2, V - 1] = 3.0
    assert torch.equal(native.argmax(x), x.argmax(-1))
    torch.testing.assert_close(native.logsumexp(x), torch.logsumexp(x, -1), atol=2e-6, rtol=1e-6)
    assert torch.equal(native.argmax(x.double()), x.double().argmax(-1))  # other dtypes: PyTorch's


@needs_kernels
def test_a_nan_in_a_row_is_found_as_torch_finds_it():
    x = torch.randn(2, 1000)
    x[1, 17] = x[1, 400] = float("nan")
    assert torch.equal(native.argmax(x), x.argmax(-1))
    assert torch.isnan(native.logsumexp(x)[1]) and torch.isfinite(native.logsumexp(x)[0])


@needs_kernels
def test_logsumexp_of_many_equal_logits_keeps_its_precision():
    """Float32 running sums of equal small terms drift (4e-5 here before the blocked sum)."""
    x = torch.full((1, 50257), -8.5)
    x[0, 0] = 0.0
    want = torch.logsumexp(x.double(), -1).float()
    torch.testing.assert_close(native.logsumexp(x), want, atol=1e-6, rtol=0)


@needs_kernels
def test_the_kernels_weight_layout_is_a_reordering_that_the_kernel_depends_on():
    w = torch.randint(
        -128, 128, (10, 200), dtype=torch.int8
    )  # two blocks of four rows, two plain rows, a K tail
    rows = native.interleave_int8(w)
    assert rows.shape == w.shape and torch.equal(rows.view(-1).sort().values, w.view(-1).sort().values)
    assert torch.equal(rows[8:], w[8:]) and not torch.equal(rows[:8], w[:8])
    x = torch.randint(0, 256, (1, 200), dtype=torch.uint8)
    want = (x.long() - 128) @ w.long().t()
    sums = w.sum(1, dtype=torch.int32)
    assert torch.equal(torch.ops.gpt.gemv_u8s8(x, rows, sums).long(), want)
    assert not torch.equal(torch.ops.gpt.gemv_u8s8(x, w, sums)[:, :8].long(), want[:, :8])


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
    monkeypatch.setattr(
        native_build, "FLAGS", [f for f in native_build.FLAGS if f != "-march=native"] + flags
    )
    monkeypatch.setenv("GPT_KERNEL_CACHE", str(tmp_path))
    lib = native._bind(native._compile(cc))
    assert lib.gemv_isa() >> 4 == isa and lib.gemv_isa() & 1
    # raises on any disagreement: both kernels, one and several rows, full 64-byte blocks, a short
    # last block of rows and a K tail, int8 weights of -128 included
    native._self_check(lib.gemv_isa(), lib, *native._ctypes_ops(lib))


@needs_kernels
@pytest.mark.parametrize(
    "rows", [1, 5]
)  # several rows run on our kernel where oneDNN int8 is inexact (no VNNI)
def test_an_int8_layer_gives_the_same_numbers_on_our_kernel_and_on_torchs(monkeypatch, rows):
    layer = Int8Linear.from_float(torch.randn(300, 200) * 0.05, torch.randn(300) * 0.1)
    x = torch.randn(rows, 200) * torch.logspace(-2, 2, rows)[:, None]
    with torch.inference_mode():
        ours = layer(x)
        monkeypatch.setattr(native, "_isa", lambda: 0)
        assert torch.equal(ours, layer(x))


@needs_kernels
def test_a_float32_layer_on_our_kernel_stays_within_rounding_of_torchs(monkeypatch):
    layer = Linear(768, 768)  # big enough for the fast paths (small layers stay on F.linear)
    x = torch.randn(1, 1, 768)
    with torch.no_grad():
        ours = layer(x)
        assert ours.shape == (1, 1, 768)
        monkeypatch.setattr(native, "_isa", lambda: 0)
        torch.testing.assert_close(ours, layer(x), atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        torch.testing.assert_close(
            layer(x.expand(3, 1, 768))[1], ours[0], atol=1e-5, rtol=1e-5
        )  # oneDNN, 3 rows


@needs_kernels
def test_training_never_runs_on_our_kernel():
    layer = Linear(768, 768)
    x = torch.randn(1, 768, requires_grad=True)
    layer(x).sum().backward()  # our op has no backward: with grad enabled the layer must not call it
    assert x.grad is not None and layer.weight.grad is not None


@needs_kernels
def test_the_kernels_copies_of_the_weight_follow_it_through_loading_and_in_place_edits():
    layer, other = (Int8Linear.from_float(torch.randn(40, 64)) for _ in range(2))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = other(x)
        layer.load_state_dict(other.state_dict())
        assert "weight_sum" not in layer.state_dict() and "weight_rows" not in layer.state_dict()  # derived
        assert torch.equal(layer(x), expected)
    with torch.no_grad():
        layer.weight_q[0].neg_()
        other.weight_q[0].neg_()
        other._sum_weights()
    with torch.inference_mode():
        assert torch.equal(layer(x), other(x))


@needs_kernels
def test_a_quantized_checkpoint_decodes_the_same_with_and_without_our_kernels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = gpt.build_model(gpt.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
    gpt.quantize(model, "int8")
    gpt.save(model, tmp_path / "m", tokenizer="byte")
    loaded, _ = gpt.load(tmp_path / "m")  # load_state_dict into fresh int8 layers: the sums follow
    prompt = [[1, 2, 3, 4]]

    def greedy():
        with torch.inference_mode():
            cache = loaded.new_cache(1)
            logits = [loaded.start(prompt, cache)]
            for _ in range(8):
                logits.append(loaded.step(logits[-1].argmax(-1).view(1, 1), cache))
            return torch.cat([t.view(1, -1) for t in logits])

    ours = greedy()
    # only the int8 products change hands (to torch._int_mm): the attention kernel stays, since
    # ours and PyTorch's agree within rounding, not to the bit (seen on an AVX2 CPU)
    monkeypatch.setattr(native, "int8_available", lambda: False)
    assert torch.equal(ours, greedy())


def _status_in_subprocess(env: dict) -> str:
    code = (
        "import gpt.native, torch; print(gpt.native.status()); "
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
def test_both_ways_of_calling_our_kernels_give_the_same_numbers(tmp_path):
    """The C++ registration (ops.cpp) and the ctypes one, on the same int8 and float32 inputs."""
    code = (
        "import torch, gpt.native as n; n.f32_available(); g = torch.Generator().manual_seed(5); "
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
        env = {**os.environ, "GPT_KERNEL_CACHE": str(tmp_path)}
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


def test_where_they_can_be_built_our_kernels_are_in_use():
    """So that a kernel broken by an edit fails here rather than quietly skipping the tests above."""
    import platform

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if (
        not (
            cc and platform.system() == "Linux" and platform.machine() == "x86_64" and _cpu_has("avx2", "fma")
        )
        or os.environ.get("GPT_NATIVE_KERNELS") == "0"
    ):
        pytest.skip("not an x86-64 Linux machine with AVX2 and a C compiler")
    assert native.f32_available() and native.int8_available(), native.status()


@needs_kernels
@pytest.mark.parametrize("B,H,D,L", [(1, 1, 1, 1), (3, 2, 8, 12), (4, 12, 64, 130), (2, 3, 80, 1030)])
def test_attention_kernel_writes_the_new_keys_and_attends_like_torch(B, H, D, L):
    g = torch.Generator().manual_seed(B * 1000 + L)
    kc, vc = torch.randn(2, B + 2, H, L + 1, D, generator=g).unbind(0)
    q, k, v = torch.randn(3, B, H, D, generator=g).unbind(0)
    rows = torch.randperm(B + 2, generator=g)[:B]  # any rows, in any order
    pos = torch.randint(0, L, (B,), generator=g)  # each row its own length
    want_k, want_v = kc.clone(), vc.clone()
    want = native._attend_reference(q, k, v, want_k, want_v, rows, pos)
    got = torch.ops.gpt.attend_one(q, k, v, kc, vc, rows, pos)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@needs_kernels
@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_decoding_on_our_attention_stays_within_rounding_of_torchs(preset, monkeypatch):
    model = gpt.build_model(gpt.preset(preset)).eval()
    tok = gpt.get_tokenizer("byte")
    prompts = ["Once upon a time", "x", "rows of different lengths"]
    params = [gpt.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (20, 7, 12)]
    with torch.inference_mode():
        ours = gpt.complete(model, tok, prompts, params)
        monkeypatch.setattr(native, "_isa", lambda: 0)
        theirs = gpt.complete(model, tok, prompts, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


needs_f16_attention = pytest.mark.skipif(
    not native.attention_f16_available(), reason=f"no float16-cache attention kernel here: {native.status()}"
)


@needs_f16_attention
@pytest.mark.parametrize("B,H,D,L", [(1, 1, 8, 1), (3, 2, 16, 12), (4, 12, 64, 130), (2, 3, 80, 1030)])
def test_float16_cache_attention_kernel_rounds_the_new_keys_and_attends_like_torch(B, H, D, L):
    g = torch.Generator().manual_seed(B * 1000 + L)
    kc, vc = (c.half() for c in torch.randn(2, B + 2, H, L + 1, D, generator=g).unbind(0))
    q, k, v = torch.randn(3, B, H, D, generator=g).unbind(0)
    rows = torch.randperm(B + 2, generator=g)[:B]
    pos = torch.randint(0, L, (B,), generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    want = native._attend_reference(q, k, v, want_k, want_v, rows, pos)  # float32 arithmetic on the halves
    got = torch.ops.gpt.attend_one(q, k, v, kc, vc, rows, pos)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # round to nearest, like torch's .half()


def _decode_logits(model, prompts, cache, n=10):
    """Each greedy step's logits of `prompts` decoded together in `cache` (rows 0..B-1)."""
    tok, rows, out = gpt.get_tokenizer("byte"), slice(0, len(prompts)), []
    with torch.inference_mode():
        logits = model.start([tok.encode(p) for p in prompts], cache, rows=rows)
        for _ in range(n):
            out.append(logits.float())
            logits = model.step(logits.argmax(-1)[:, None], cache, rows=rows)
    return torch.stack(out)


@needs_f16_attention
@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_a_float16_cache_decodes_like_torch_on_the_same_halves_and_near_a_float32_cache(preset, monkeypatch):
    """Our kernel on a float16 cache against PyTorch's attention on the same cache (converted to
    float32 as it reads): only float32 rounding apart. Against a float32 cache: the halves'
    rounding apart, and the same greedy tokens."""
    model = gpt.build_model(gpt.preset(preset)).eval()
    prompts = ["Once upon a time", "x", "rows of different lengths"]
    half = _decode_logits(model, prompts, model.new_cache(3, dtype=torch.float16))
    full = _decode_logits(model, prompts, model.new_cache(3))
    monkeypatch.setattr(native, "_isa", lambda: 0)
    theirs = _decode_logits(model, prompts, model.new_cache(3, dtype=torch.float16))
    torch.testing.assert_close(half, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half, full, atol=5e-3, rtol=0)
    assert torch.equal(half.argmax(-1), full.argmax(-1))
