#![no_main]
//! Fuzz target: see `nemo_tool::testkit::hostile::pickle_vm`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nemo_tool::testkit::hostile::pickle_vm(data));
