// The autograd function of a frozen quantised linear (`y = x Wᵀ`, W never trained): forward and
// backward each rebuild W in the compute dtype through a callback into align (the dequantisation
// of model/quant.rs), so the graph keeps only the quantised state, never the full-precision
// weight, as bitsandbytes' MatMul4Bit does. Tensors cross as tch's `at::Tensor*`; C++ exceptions
// are caught at the boundary and returned as an error message.
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Rebuilds the weight from the saved state: on success writes a new `at::Tensor*` (ownership
// passes to the caller) to `out` and returns 0; on failure writes a NUL-terminated message to
// `err` (at most `err_len` bytes) and returns non-zero.
typedef int (*align_rebuild_weight_fn)(at::Tensor* const* state, int64_t n_state, const int64_t* params,
                                       int64_t n_params, at::Tensor** out, char* err, size_t err_len);
}

namespace {

struct Recipe {
  std::vector<at::Tensor> state;
  std::vector<int64_t> params;
  align_rebuild_weight_fn rebuild;
};

at::Tensor rebuild(const std::vector<at::Tensor>& state, const std::vector<int64_t>& params,
                   align_rebuild_weight_fn fn) {
  std::vector<at::Tensor*> ptrs;
  ptrs.reserve(state.size());
  for (const auto& t : state) ptrs.push_back(const_cast<at::Tensor*>(&t));
  at::Tensor* out = nullptr;
  char err[1024] = {0};
  int rc = fn(ptrs.data(), static_cast<int64_t>(ptrs.size()), params.data(), static_cast<int64_t>(params.size()),
              &out, err, sizeof(err));
  if (rc != 0 || out == nullptr) {
    throw std::runtime_error(std::string("rebuilding a quantised weight: ") + err);
  }
  at::Tensor w = *out;
  delete out;
  return w;
}

struct RecomputedLinear : public torch::autograd::Function<RecomputedLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const Recipe* recipe) {
    at::Tensor w = rebuild(recipe->state, recipe->params, recipe->rebuild);
    ctx->saved_data["state"] = c10::List<at::Tensor>(recipe->state);
    ctx->saved_data["params"] = c10::List<int64_t>(recipe->params);
    ctx->saved_data["fn"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(recipe->rebuild));
    return at::linear(x, w);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto state_list = ctx->saved_data["state"].toTensorList();
    std::vector<at::Tensor> state(state_list.begin(), state_list.end());
    auto params_list = ctx->saved_data["params"].toIntList();
    std::vector<int64_t> params(params_list.begin(), params_list.end());
    auto fn = reinterpret_cast<align_rebuild_weight_fn>(static_cast<intptr_t>(ctx->saved_data["fn"].toInt()));
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      at::Tensor w = rebuild(state, params, fn);
      grad_x = grads[0].matmul(w);
    }
    // one entry per forward argument: x, then the recipe (not a tensor)
    return {grad_x, at::Tensor()};
  }
};

void write_error(const char* what, char* err, size_t err_len) {
  if (err_len == 0) return;
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

}  // namespace

extern "C" {

// `y = x Wᵀ` with W rebuilt by `fn` from `state` / `params` in forward and again in backward.
// Returns 0 and writes a new `at::Tensor*` to `out`, or non-zero with a message in `err`.
int align_recomputed_linear(const at::Tensor* x, at::Tensor* const* state, int64_t n_state, const int64_t* params,
                            int64_t n_params, align_rebuild_weight_fn fn, at::Tensor** out, char* err,
                            size_t err_len) {
  try {
    Recipe recipe;
    recipe.state.reserve(static_cast<size_t>(n_state));
    for (int64_t i = 0; i < n_state; ++i) recipe.state.push_back(*state[i]);
    recipe.params.assign(params, params + n_params);
    recipe.rebuild = fn;
    at::Tensor y = RecomputedLinear::apply(*x, &recipe);
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
