//! Build script. Without the `distill` feature it does nothing, so the I/O commands build in
//! seconds without torch. With it: compiles the C++ shim over libtorch's c10d (`csrc/`) and
//! sets an rpath to the torch libraries so binaries and tests run without LD_LIBRARY_PATH.
//! See docs/distill-engine.md.

fn main() {
    #[cfg(feature = "distill")]
    distill::build();
}

#[cfg(feature = "distill")]
mod distill {
    use std::env;
    use std::path::{Path, PathBuf};

    pub fn build() {
        println!("cargo:rerun-if-changed=csrc");
        println!("cargo:rerun-if-changed=build.rs");
        // torch-sys (links = "tch") exports its library folder to direct dependents.
        let Some(lib) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
            panic!("DEP_TCH_LIBTORCH_LIB is unset: torch-sys must be a direct dependency");
        };
        let Some(torch_root) = lib.parent().map(Path::to_path_buf) else {
            panic!("torch library folder {} has no parent", lib.display());
        };
        let inc = torch_root.join("include");

        // torch-sys passes its rpath only to its own objects: ours reaches every bin, test,
        // example and doctest of this package.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

        let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .std("c++17")
            // the PyPI wheels are cxx11-ABI; =0 compiles but leaves TCPStore(std::string) undefined
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            // ProcessGroupGloo.hpp is empty without USE_C10D_GLOO
            .define("USE_C10D_GLOO", None)
            .define("USE_DISTRIBUTED", None)
            .define("GLOG_USE_GLOG_EXPORT", None)
            // the wheel ships no gloo headers; a declaration-only stub is enough (csrc/gloo_stub)
            .include("csrc/gloo_stub")
            .include(&inc)
            .include(inc.join("torch/csrc/api/include"))
            .flag_if_supported("-Wno-unused-parameter")
            .file("csrc/c10d_shim.cpp")
            .file("csrc/tp_autograd.cpp");
        if cuda {
            // headers from the pip packages torch depends on (nvidia-cuda-*, nvidia-nccl-cu13)
            let nv = torch_root
                .parent()
                .map(|p| p.join("nvidia"))
                .unwrap_or_default();
            b.define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .include(nv.join("cu13/include"))
                .include(nv.join("nccl/include"))
                // c10/cuda/CUDAEvent.h lays out a struct with hardware_destructive_interference_size:
                // pin the value of the GCC 13 torch was built with (64 on x86_64)
                .flag("--param=destructive-interference-size=64")
                .flag_if_supported("-Wno-interference-size")
                .file("csrc/c10d_nccl.cpp");
            // cuda_runtime.h needs crt/ and nv/target, which torch's runtime deps lack:
            // `pip install "cuda-toolkit[crt,cccl]==13.0.2"` into the venv, or point
            // NEMO_CUDA_INCLUDE (':'-separated) at their include folders
            println!("cargo:rerun-if-env-changed=NEMO_CUDA_INCLUDE");
            if let Some(extra) = env::var_os("NEMO_CUDA_INCLUDE") {
                for dir in env::split_paths(&extra) {
                    b.include(dir);
                }
            }
        }
        b.compile("nemo_c10d_shim");
        if cuda {
            println!("cargo:rustc-link-lib=dylib=torch_cuda");
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
            // without --no-as-needed the linker drops libtorch_cuda (no symbol referenced
            // directly) and tch::Cuda::is_available() is silently false
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
        println!("cargo:rustc-link-lib=dylib=torch_cpu");
        println!("cargo:rustc-link-lib=dylib=c10");
    }
}
