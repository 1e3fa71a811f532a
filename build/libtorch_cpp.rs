//! Build-script helper of the crates that compile C++ against libtorch (align-core's autograd
//! function, align-dist's c10d shim): a `cc::Build` with the headers of the libtorch tch links to
//! and libtorch's C++ ABI.
use std::path::{Path, PathBuf};
use std::process::Command;

/// `_GLIBCXX_USE_CXX11_ABI` of the libtorch in use: `LIBTORCH_CXX11_ABI` when set, else asked of
/// the Python torch (as torch-sys does under `LIBTORCH_USE_PYTORCH`), else 1 (every torch wheel
/// since 2.7 and the libtorch zips).
fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    if let Ok(v) = std::env::var("LIBTORCH_CXX11_ABI") {
        return v;
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if std::env::var_os("VIRTUAL_ENV").is_some() { "python" } else { "python3" };
        let out =
            Command::new(python).args(["-c", "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"]).output();
        if let Ok(out) = out {
            let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if v == "0" || v == "1" {
                return v;
            }
        }
        println!("cargo:warning=could not ask {python} for torch's C++ ABI; assuming _GLIBCXX_USE_CXX11_ABI=1");
    }
    "1".to_string()
}

/// A C++17 build with libtorch's include folders (beside the lib folder torch-sys links to) and
/// its ABI.
pub fn build() -> cc::Build {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not say where libtorch is");
    // <torch>/lib → <torch>/include (the wheel and the libtorch zips lay it out so)
    let root: PathBuf = Path::new(&lib).parent().map(Path::to_path_buf).unwrap_or_default();
    let include = root.join("include");
    assert!(
        include.join("ATen").join("ATen.h").is_file(),
        "libtorch headers not found at {} (expected beside {lib})",
        include.display()
    );
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", cxx11_abi()))
        .flag("-DGLOG_USE_GLOG_EXPORT");
    b
}
