// The C side of align-dist: a c10d process group (ProcessGroupGloo over a TCPStore, both compiled
// into libtorch) and its collectives on tch's tensors. Tensors cross as tch's `at::Tensor*`;
// every function returns 0, or non-zero with the C++ exception's message in `err` (always
// NUL-terminated), so that no exception crosses into Rust.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (len == 0) return;
  size_t n = std::min(len - 1, msg.size());
  std::memcpy(err, msg.data(), n);
  err[n] = 0;
}

template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp::SUM;
    case 1:
      return c10d::ReduceOp::MAX;
    case 2:
      return c10d::ReduceOp::MIN;
    default:
      throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
}

}  // namespace

extern "C" {

// Joins the group: a TCPStore at host:port (served by rank 0, or by torchrun's agent when
// `agent_store`), namespaced by `prefix`, and a Gloo backend on `device_host` (an address of
// this machine to bind; empty: the interface named by `device_iface`, else gloo's default).
int align_dist_new(const char* host, int port, int rank, int size, int64_t timeout_ms, int agent_store,
                   const char* prefix, const char* device_host, const char* device_iface, void** out, char* err,
                   size_t err_len) {
  return guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = !agent_store && rank == 0;
    opts.numWorkers = size;
    opts.waitWorkers = !agent_store;
    opts.timeout = timeout;
    opts.multiTenant = !agent_store;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (device_host && *device_host) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(device_host)));
    } else if (device_iface && *device_iface) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(std::string(device_iface)));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    auto* g = new Group{store, backend};
    *out = g;
  });
}

void align_dist_free(void* group) {
  delete static_cast<Group*>(group);
}

int align_dist_all_reduce(void* group, at::Tensor* t, int op, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    wait(static_cast<Group*>(group)->backend->allreduce(ts, o));
  });
}

int align_dist_reduce(void* group, at::Tensor* t, int root, int op, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::ReduceOptions o;
    o.reduceOp = reduce_op(op);
    o.rootRank = root;
    wait(static_cast<Group*>(group)->backend->reduce(ts, o));
  });
}

int align_dist_broadcast(void* group, at::Tensor* t, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    wait(static_cast<Group*>(group)->backend->broadcast(ts, o));
  });
}

// `output` holds `size` inputs back to back (rank order).
int align_dist_all_gather(void* group, at::Tensor* output, at::Tensor* input, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    wait(static_cast<Group*>(group)->backend->_allgather_base(*output, *input));
  });
}

// `input` holds `size` blocks back to back; rank r receives the reduction of block r.
int align_dist_reduce_scatter(void* group, at::Tensor* output, at::Tensor* input, int op, char* err,
                              size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(op);
    wait(static_cast<Group*>(group)->backend->_reduce_scatter_base(*output, *input, o));
  });
}

int align_dist_barrier(void* group, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { wait(static_cast<Group*>(group)->backend->barrier()); });
}

// Sets the gradient of `param` to `grad` (a zero gradient where a rank computed none).
int align_dist_set_grad(at::Tensor* param, at::Tensor* grad, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { param->mutable_grad() = *grad; });
}

// Drops the gradient of `param` (ZeRO-2: it lives on its owner only).
int align_dist_release_grad(at::Tensor* param, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { param->mutable_grad().reset(); });
}

}  // extern "C"
