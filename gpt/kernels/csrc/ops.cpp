// The C kernels (gemv.c, attention.c, rows.c, gelu.c) as PyTorch's CPU implementations of the gpt:: ops
// that gpt/kernels/ops.py declares. Called through the dispatcher directly, a kernel pays no
// Python call and no argument conversion, which the Python implementations that gpt/kernels
// falls back to (ctypes_ops.py) pay on every call, and a decode step makes one call per layer's
// product.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

extern "C" {
// weak: a build for a CPU without the instruction set leaves a kernel out (gpt/kernels then
// never routes calls to it)
void gemv_f32(const float *, const float *, const float *, float *, long, long, long) __attribute__((weak));
void gemv_u8s8(const uint8_t *, const int8_t *, const int32_t *, int32_t *, long, long, long)
    __attribute__((weak));
void linear_u8s8(const float *, const int8_t *, const int32_t *, const float *, const float *, float *,
                 uint8_t *, float *, long, long, long) __attribute__((weak));
void argmax_rows(const float *, int64_t *, long, long);
void logsumexp_rows(const float *, float *, long, long);
void gelu_tanh_fwd(const float *, float *, long);
void gelu_tanh_bwd(const float *, const float *, float *, long);
void attend_one(const float *, const float *, const float *, float *, float *, long, long, long,
                const int64_t *, const int64_t *, float *, long, long, long, float);
void attend_one_f16(const float *, const float *, const float *, uint16_t *, uint16_t *, long, long, long,
                    const int64_t *, const int64_t *, float *, long, long, long, float) __attribute__((weak));
}

namespace {

at::Tensor gemv_f32_op(const at::Tensor &x, const at::Tensor &w, const std::optional<at::Tensor> &bias) {
    TORCH_CHECK(gemv_f32, "gpt::gemv_f32: this build has no float32 kernel");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, xc.options());
    gemv_f32(xc.data_ptr<float>(), w.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
             y.data_ptr<float>(), M, N, K);
    return y;
}

at::Tensor gemv_u8s8_op(const at::Tensor &x, const at::Tensor &w, const at::Tensor &w_sum) {
    TORCH_CHECK(gemv_u8s8, "gpt::gemv_u8s8: this build has no int8 kernel");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, xc.options().dtype(at::kInt));
    gemv_u8s8(xc.data_ptr<uint8_t>(), w.data_ptr<int8_t>(), w_sum.data_ptr<int32_t>(), y.data_ptr<int32_t>(),
              M, N, K);
    return y;
}

at::Tensor linear_u8s8_op(const at::Tensor &x, const at::Tensor &w, const at::Tensor &w_sum,
                          const at::Tensor &w_scale, const std::optional<at::Tensor> &bias) {
    TORCH_CHECK(linear_u8s8, "gpt::linear_u8s8: this build has no int8 kernel");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, xc.options());
    at::Tensor xq = at::empty({M, K}, xc.options().dtype(at::kByte)), xs = at::empty({M}, xc.options());
    linear_u8s8(xc.data_ptr<float>(), w.data_ptr<int8_t>(), w_sum.data_ptr<int32_t>(),
                w_scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(),
                xq.data_ptr<uint8_t>(), xs.data_ptr<float>(), M, N, K);
    return y;
}

at::Tensor argmax_rows_op(const at::Tensor &x) {
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({xc.size(0)}, xc.options().dtype(at::kLong));
    argmax_rows(xc.data_ptr<float>(), out.data_ptr<int64_t>(), xc.size(0), xc.size(1));
    return out;
}

at::Tensor logsumexp_rows_op(const at::Tensor &x) {
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({xc.size(0)}, xc.options());
    logsumexp_rows(xc.data_ptr<float>(), out.data_ptr<float>(), xc.size(0), xc.size(1));
    return out;
}

at::Tensor gelu_tanh_op(const at::Tensor &x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "gpt::gelu_tanh: float32 only");
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty(xc.sizes(), xc.options());
    gelu_tanh_fwd(xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel());
    return out;
}

at::Tensor gelu_tanh_backward_op(const at::Tensor &grad, const at::Tensor &x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat &&
                    grad.sizes() == x.sizes(),
                "gpt::gelu_tanh_backward: float32 tensors of one shape only");
    const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
    at::Tensor out = at::empty(xc.sizes(), xc.options());
    gelu_tanh_bwd(gc.data_ptr<float>(), xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel());
    return out;
}

at::Tensor attend_one_op(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &k_cache,
                         at::Tensor &v_cache, const at::Tensor &rows, const at::Tensor &pos) {
    TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
                "gpt::attend_one: the caches need contiguous head dimensions and the same strides");
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor r = rows.contiguous().to(at::kLong), p = pos.contiguous().to(at::kLong);
    const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(2);
    at::Tensor out = at::empty({B, H, D}, qc.options());
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    if (k_cache.scalar_type() == at::kHalf) {
        TORCH_CHECK(attend_one_f16 && D % 8 == 0 && D <= 256 && v_cache.scalar_type() == at::kHalf,
                    "gpt::attend_one: no float16-cache kernel for this build or head size");
        attend_one_f16(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                       reinterpret_cast<uint16_t *>(k_cache.data_ptr<at::Half>()),
                       reinterpret_cast<uint16_t *>(v_cache.data_ptr<at::Half>()), k_cache.stride(0),
                       k_cache.stride(1), k_cache.stride(2), r.data_ptr<int64_t>(), p.data_ptr<int64_t>(),
                       out.data_ptr<float>(), B, H, D, scale);
        return out;
    }
    attend_one(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               r.data_ptr<int64_t>(), p.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, D, scale);
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gpt, CPU, m) {
    m.impl("gemv_f32", gemv_f32_op);
    m.impl("gemv_u8s8", gemv_u8s8_op);
    m.impl("linear_u8s8", linear_u8s8_op);
    m.impl("argmax_rows", argmax_rows_op);
    m.impl("logsumexp_rows", logsumexp_rows_op);
    m.impl("attend_one", attend_one_op);
    m.impl("gelu_tanh", gelu_tanh_op);
    m.impl("gelu_tanh_backward", gelu_tanh_backward_op);
}
