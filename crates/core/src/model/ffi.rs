//! What the C++ autograd functions of csrc/ hand back: a status, a new `at::Tensor*` and an error
//! message in a caller-owned buffer.
use std::ffi::{c_char, CStr};

use anyhow::{bail, Result};
use tch::Tensor;
use torch_sys::C_tensor;

/// The tensor a C++ entry point wrote to `out` (ownership passes to the caller), or its error:
/// `rc` non-zero or a null `out` means failure, with the NUL-terminated message in `err`.
pub(crate) fn tensor_from_ffi(rc: i32, out: *mut C_tensor, err: &[c_char], what: &str) -> Result<Tensor> {
    if rc != 0 || out.is_null() {
        // SAFETY: the C++ side always NUL-terminates the buffer (and it starts zeroed)
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
        bail!("{what}: {msg}");
    }
    // SAFETY: `out` is a new at::Tensor* handed over to us
    Ok(unsafe { Tensor::from_ptr(out) })
}
