#![no_main]
//! Fuzz target: see `nemo_tool::testkit::hostile::zip_reader`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nemo_tool::testkit::hostile::zip_reader(data));
