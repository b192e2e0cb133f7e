#![no_main]
//! Fuzz target: see `nemo_tool::hostile::tar_index`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nemo_tool::hostile::tar_index(data));
