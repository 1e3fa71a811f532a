//! Build script of align-dist: libtorch's rpath (build/link_libtorch.rs) and the c10d shim
//! (csrc/c10d.cpp) compiled against the libtorch headers tch links to, with the gloo headers the
//! wheel does not ship (csrc/gloo, see its README).
#[path = "../../build/libtorch_cpp.rs"]
mod libtorch_cpp;
#[path = "../../build/link_libtorch.rs"]
mod link_libtorch;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=csrc/c10d.cpp");
    println!("cargo:rerun-if-changed=csrc/gloo");
    libtorch_cpp::build().include("csrc/gloo").file("csrc/c10d.cpp").compile("align_c10d");
}
