//! Build script of align-core: what every align crate's build script does (build/link_libtorch.rs:
//! libtorch's rpath, libtorch_cuda kept linked), and compiles the C++ autograd functions of the
//! quantised linears (csrc/recomputed_linear.cpp) and of LoRA dropout (csrc/dropout_linear.cpp) against the libtorch headers tch links to,
//! with libtorch's C++ ABI (build/libtorch_cpp.rs).
#[path = "../../build/libtorch_cpp.rs"]
mod libtorch_cpp;
#[path = "../../build/link_libtorch.rs"]
mod link_libtorch;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=csrc/recomputed_linear.cpp");
    println!("cargo:rerun-if-changed=csrc/dropout_linear.cpp");
    libtorch_cpp::build()
        .file("csrc/recomputed_linear.cpp")
        .file("csrc/dropout_linear.cpp")
        .compile("align_autograd_functions");
}
