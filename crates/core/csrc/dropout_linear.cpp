// The autograd function of a LoRA adapter's first product under dropout, `h = d(x) Aᵀ` with
// `d(x) = x · mask / (1 − p)`: it saves x (which the layer's other adapters and modules share),
// the boolean mask and A, and rebuilds `d(x)` in backward for `∂L/∂A`. Plain autograd
// (`dropout(x).linear(A)`) keeps a float noise tensor and the dropped copy of x alive per adapter
// from forward until backward — eight bytes per input element per adapter instead of one.
// Tensors cross as tch's `at::Tensor*`; C++ exceptions are caught at the boundary and returned as
// an error message.
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <cstring>
#include <string>

namespace {

at::Tensor dropped(const at::Tensor& x, const at::Tensor& mask, double scale) {
  return x.mul(scale).masked_fill_(mask.logical_not(), 0);
}

struct DropoutLinear : public torch::autograd::Function<DropoutLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask,
                            const at::Tensor& a, double scale) {
    ctx->save_for_backward({x, mask, a});
    ctx->saved_data["scale"] = scale;
    return at::linear(dropped(x, mask, scale), a);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& mask = saved[1];
    const at::Tensor& a = saved[2];
    double scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor& g = grads[0];
    at::Tensor grad_x, grad_a;
    if (ctx->needs_input_grad(0)) {
      grad_x = g.matmul(a).mul_(scale).masked_fill_(mask.logical_not(), 0);
    }
    if (ctx->needs_input_grad(2)) {
      int64_t in = x.size(-1);
      grad_a = g.reshape({-1, g.size(-1)}).t().mm(dropped(x, mask, scale).reshape({-1, in}));
    }
    // one entry per forward argument: x, mask, A, scale
    return {grad_x, at::Tensor(), grad_a, at::Tensor()};
  }
};

void write_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace

extern "C" {

// `(x · mask · scale) Aᵀ`, saving x, mask and A only. Returns 0 and writes a new `at::Tensor*` to
// `out`, or non-zero with a NUL-terminated message in `err` (at most `err_len` bytes).
int align_dropout_linear(const at::Tensor* x, const at::Tensor* mask, const at::Tensor* a, double scale,
                         at::Tensor** out, char* err, size_t err_len) {
  try {
    at::Tensor y = DropoutLinear::apply(*x, *mask, *a, scale);
    *out = new at::Tensor(y);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return 1;
  } catch (...) {
    write_error("unknown C++ exception", err, err_len);
    return 1;
  }
}

}  // extern "C"
