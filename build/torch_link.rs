//! Build script shared by every crate whose artifacts link libtorch (binaries and test harnesses).
//!
//! Two things the default link line gets wrong:
//! - With `--as-needed`, `libtorch_cuda.so` is dropped because nothing references it directly, and
//!   `tch::Cuda::is_available()` then silently returns false on a GPU machine. We force-link it.
//! - Without an rpath the artifacts need `LD_LIBRARY_PATH=<torch>/lib`. We embed torch's lib dir (as
//!   a RUNPATH, so `LD_LIBRARY_PATH` still overrides it on a machine whose torch lives elsewhere).
//!
//! torch-sys (`links = "tch"`) publishes its lib dir as `DEP_TCH_LIBTORCH_LIB` to direct dependents.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report libtorch's lib dir; is torch-sys a direct dependency?");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
